"""The server's checkpoint of a run: `runs/<run_id>/checkpoint/` with state.json and one .npz per array set.

Written after every phase and every round (atomically: temp file + rename), so a run killed at any
point resumes from the last completed round with `resume = true`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslide.common.atomic import atomic_path, write_text_atomic

STATE_FILE = "state.json"


class Checkpoint:
    """Run state (JSON) and named ArrayRecords (npz) under `<run_dir>/checkpoint/`."""

    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir) / "checkpoint"
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / STATE_FILE
        self.state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    @property
    def exists(self) -> bool:
        """A state was saved before (something to resume)."""
        return (self.dir / STATE_FILE).is_file()

    def commit(self, **updates: Any) -> None:
        """Update the state and write it atomically."""
        self.state.update(updates)
        write_text_atomic(
            self.dir / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True, default=_json_default)
        )

    def save_arrays(self, name: str, record: ArrayRecord) -> None:
        """Write an ArrayRecord as `<name>.npz` (atomically)."""
        path = self.dir / f"{name}.npz"
        with atomic_path(path, suffix=".tmp.npz") as tmp:  # np.savez appends .npz to any other name
            np.savez(tmp, **{key: array.numpy() for key, array in record.items()})  # type: ignore[arg-type]  # numpy stubs: allow_pickle

    def load_arrays(self, name: str) -> ArrayRecord | None:
        """The ArrayRecord saved as `name`, or None."""
        path = self.dir / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return ArrayRecord({key: Array(np.array(data[key])) for key in data.files})

    def phase_done(self, phase: str) -> dict[str, Any] | None:
        """The summary of a completed phase, or None."""
        return self.state.get("phases", {}).get(phase)

    def finish_phase(self, phase: str, summary: dict[str, Any]) -> None:
        """Mark a phase complete (its arrays must be saved first)."""
        phases = dict(self.state.get("phases", {}))
        phases[phase] = summary
        self.commit(phases=phases, current=None)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
