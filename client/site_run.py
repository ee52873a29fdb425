"""One site's side of one federated run: its data (read once per process), run directory and caches.

Everything here stays at the site: `<runs-dir>/<run_id>/` holds cached teacher outputs, KD logits,
student bags, the final bundle and `egress.jsonl`. A warm SuperExec holds the site's feature files in memory
(`hold_site_features`) for the ClientApp tasks it forks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslide.common.atomic import atomic_path
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.floors import SiteFloors
from fedslide.common.device import resolve_device
from fedslide.common.distillation.data import DistillData, detect_encoder, load_sites
from fedslide.common.egress import EgressLedger
from fedslide.common.feature_store import FeatureStore
from fedslide.common.features import FeatureFileError, feature_path
from fedslide.common.federation.protocol import Facts
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.labels import read_labels
from fedslide.common.training.standardize import FeatureStats

log = logging.getLogger(__name__)

EGRESS_FILE = "egress.jsonl"
STAGE1_ENCODER = "pixel_stage1/low_encoder.pt"  # the global fine-tuned 5x encoder of federated pixel stage 1
STAGE1_RECORD = "pixel_stage1/low_encoder.json"  # its weights hash and the features/<name>/low folder it wrote

# The site's feature files held by this process (`hold_site_features`): set only in a warm SuperExec, whose forked
# ClientApp tasks inherit it. Flower calls a handler with the message and context alone, so the one way a task finds
# what its parent read is through a module of the app both share.
_held_features: FeatureStore | None = None


def hold_site_features(site_dir: Path, max_bytes: int) -> tuple[FeatureStore, int, int]:
    """Hold the low- and high-res feature files of the site's labelled slides (its one encoder) in this process,
    up to `max_bytes`, for the ClientApp tasks forked from it; called again, keep what is unchanged and re-read or
    drop the rest. Returns the store, the files read now and the files left on disk."""
    global _held_features
    rows = read_labels(site_dir / "labels.csv").rows
    encoder = detect_encoder([site_dir])
    files = [(feature_path(site_dir, encoder, r, row.slide_id), r == "low") for row in rows for r in ("low", "high")]
    if _held_features is None or _held_features.max_bytes != max_bytes:
        _held_features = FeatureStore(max_bytes)
    _, read, left = _held_features.hold(files)
    return _held_features, read, left


def held_features() -> FeatureStore | None:
    """The feature files this process holds (None outside a warm SuperExec and its tasks)."""
    return _held_features


def release_site_features() -> None:
    """Let go of the feature files this process holds (before the SuperExec imports another app version)."""
    global _held_features
    _held_features = None


PRIVATE_UMASK = 0o077  # site outputs: files 0600, directories 0700


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories made inside are private to the site's user (umask 077); the umask is restored after.
    Used as a decorator around each ClientApp step (which runs one at a time in its process)."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


class SiteConfigError(ValueError):
    """The SuperNode's node config does not name a usable site directory."""


class RunIdError(ValueError):
    """The server's run id is not one plain name: the site will not make a run directory from it."""


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_dir_for(runs_dir: Path, run_id: str) -> Path:
    """`runs_dir/run_id`, for a run id that is one plain name (letters, digits, `.`, `_`, `-`; starting with a letter
    or digit; at most 128 characters) and whose directory, links followed, stays directly under `runs_dir`."""
    if not _RUN_ID.fullmatch(run_id):
        raise RunIdError(
            f"run id {run_id[:80]!r} refused: a run id must be one name of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 128 characters (no '/', '..' or absolute path)"
        )
    run_dir = runs_dir / run_id
    if run_dir.resolve().parent != runs_dir.resolve():
        raise RunIdError(f"run id {run_id!r} refused: {run_dir} leads outside {runs_dir}")
    return run_dir


_NDARRAY = "__ndarray__"  # marks a numpy array stored as a tensor in a cache file


def _to_safe(value: Any) -> Any:
    """`value` with numpy arrays and scalars turned into what `torch.load(weights_only=True)` reads back."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_safe(v) for v in value)
    return value


def _from_safe(value: Any) -> Any:
    """Inverse of `_to_safe`."""
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        return {k: _from_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_from_safe(v) for v in value)
    return value


@dataclass
class SiteRun:
    """A site's data and run directory for one federated run."""

    site_dir: Path
    run_dir: Path
    cfg: FederationConfig
    name: str
    facts: Facts | None = None
    ledger_syslog: str | None = None  # node config `ledger-syslog`: mirror the ledger to this syslog address
    own_low_features: bool = False  # read the site's own 5x files even after pixel stage 1 (the handshake does)
    feature_stats: FeatureStats | None = None  # the federation's standardisation of 20x instances (`standardize`)
    _data: DistillData | None = field(default=None, repr=False)

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], cfg: FederationConfig, run_id: str) -> "SiteRun":
        """From the SuperNode's `--node-config`: `site-dir` (required), `runs-dir`, `site-name` and the privacy
        floors (`SiteFloors`, optional). Raises SiteRefusal when the run config `cfg` goes below the floors and
        RunIdError when `run_id` would leave the runs directory."""
        raw = node_config.get("site-dir")
        if not raw:
            raise SiteConfigError(
                "node config has no 'site-dir' (start the SuperNode with --node-config 'site-dir=\"/path\"')"
            )
        site_dir = Path(str(raw)).expanduser()
        if not site_dir.is_dir():
            raise SiteConfigError(f"node config site-dir={str(raw)!r}: no such directory")
        runs_dir = Path(str(node_config.get("runs-dir") or site_dir / "runs")).expanduser()
        name = str(node_config.get("site-name") or site_dir.name)
        SiteFloors.from_node_config(node_config).check(cfg)
        syslog = str(node_config.get("ledger-syslog") or "") or None
        return cls(site_dir=site_dir, run_dir=run_dir_for(runs_dir, run_id), cfg=cfg, name=name, ledger_syslog=syslog)

    @property
    def ledger(self) -> EgressLedger:
        """The site's egress ledger of this run."""
        return EgressLedger(self.run_dir / EGRESS_FILE, self.ledger_syslog)

    @property
    def device(self) -> torch.device:
        """Where local training runs."""
        return resolve_device(self.cfg.device)

    def finetuned_low(self) -> dict[str, str] | None:
        """The run's fine-tuned 5x encoder once federated pixel stage 1 has re-encoded this site's files
        ({"weights_hash", "features"}); None without pixel stage 1 or with `own_low_features` (the handshake and
        stage 1 itself). Raises FeatureFileError when the run has pixel stage 1 but this site was not re-encoded."""
        path = self.run_dir / STAGE1_RECORD
        if not self.cfg.pixel_stage1 or self.own_low_features:
            return None
        if not path.is_file():
            raise FeatureFileError(
                f"{path} is missing: this run fine-tunes the 5x encoder (pixel-stage1 = true) and this site's 5x "
                "features were not re-encoded with it, so they cannot be read with the run's models"
            )
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}

    def data(self) -> DistillData:
        """The site's labelled slides with their low/high feature files (class order from the handshake); after
        federated pixel stage 1, the 5x files its global encoder wrote."""
        if self._data is None:
            classes = None if self.facts is None else self.facts.classes
            store = held_features()
            hits = store.hits if store is not None else 0
            tuned = self.finetuned_low()
            vib = tuned is not None and tuned.get("objective") == "vib"  # both levels re-encoded under a new name
            self._data = load_sites(
                [self.site_dir],
                tuned["features"] if tuned is not None and vib else self.cfg.encoder,
                seed=self.cfg.seed,
                classes=classes,
                store=store,
                carving=self.cfg.carve,
                low_features=tuned["features"] if tuned and not vib else None,
            )
            if tuned and str(self._data.low_attrs.get("encoder_weights_hash")) != tuned["weights_hash"]:
                found = self._data.low_attrs.get("encoder_weights_hash")
                self._data = None
                raise FeatureFileError(
                    f"{self.site_dir}/features/{tuned['features']}/low: files of encoder weights {found}, but this "
                    f"run's pixel stage 1 made {tuned['weights_hash']} ({self.run_dir / STAGE1_RECORD}); another run "
                    "re-encoded them since: rerun this one under a new run id"
                )
            if store is not None:
                log.info(
                    "site %s: %d of %d feature files from memory",
                    self.name,
                    store.hits - hits,
                    2 * len(self._data.slides),
                )
        return self._data

    def split(self, name: str) -> np.ndarray:
        """Indices of this site's slides in split `name`."""
        return self.data().split(name)

    def high_cohort(self) -> Cohort:
        """High-res bags (teacher, experts), standardised by `feature_stats` when the federation sent them."""
        data = self.data()
        return data.cohort(self.standardised(data.high_bags()))

    def standardised(
        self, bags: dict[str, tuple[np.ndarray, np.ndarray | None]]
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """`bags` with `feature_stats` applied to their instances (unchanged when there are none)."""
        stats = self.feature_stats
        if stats is None:
            return bags
        return {
            key: (stats.apply(torch.from_numpy(np.array(x, dtype=np.float32))).numpy(), c)
            for key, (x, c) in bags.items()
        }

    def low_cohort(self) -> Cohort:
        """Raw low-res bags (baseline)."""
        data = self.data()
        return data.cohort(data.low_bags())

    def save(self, name: str, payload: dict[str, Any]) -> Path:
        """Write a cache file atomically under the run directory (tensors, numpy arrays, plain values: a file that
        `load` reads without running code)."""
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(_to_safe(payload), tmp)
        return path

    def load(self, name: str, fingerprint: str | None = None) -> dict[str, Any] | None:
        """A cache file, or None when absent or made with another model (fingerprint mismatch). Read with
        `weights_only=True`: a file holding anything but tensors and plain values is refused, never run."""
        path = self.run_dir / name
        if not path.is_file():
            return None
        payload = _from_safe(torch.load(path, map_location="cpu", weights_only=True))
        if fingerprint is not None and payload.get("fingerprint") != fingerprint:
            return None
        return payload
