"""Teacher/expert logits computed once per slide and cached in `RUN_DIR/cache/logits.pt`.

An entry is reused only when the model's weights fingerprint, the slide keys and the data
signature all match; anything else recomputes it (and rewrites the file atomically).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedslide.common.atomic import atomic_path

CACHE_FORMAT = "fedslide.logit-cache/1"
CACHE_FILE = "logits.pt"


def model_fingerprint(model: nn.Module, extra: Any = None) -> str:
    """sha256 of the model's parameter/buffer names, shapes and bytes (and `extra`, e.g. its config)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    if extra is not None:
        digest.update(repr(extra).encode())
    return digest.hexdigest()


def files_signature(paths: Sequence[Path | str]) -> str:
    """sha256 of each file's path, size and modification time: changes when a feature file is rewritten."""
    digest = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class LogitCache:
    """Named logits tensors [n, K] over a list of slide keys, persisted in one weights-only .pt file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                payload = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # unreadable or partial cache: start afresh
                payload = {}
            if isinstance(payload, dict) and payload.get("format") == CACHE_FORMAT:
                self.entries = dict(payload.get("entries", {}))
        self.hits = 0
        self.misses = 0

    def get_or_compute(
        self,
        name: str,
        fingerprint: str,
        keys: Sequence[str],
        compute: Callable[[], torch.Tensor],
        data_signature: str = "",
    ) -> torch.Tensor:
        """The cached logits of `name` if fingerprint, keys and data signature match; else `compute()` and store."""
        keys = [str(k) for k in keys]
        entry = self.entries.get(name)
        if (
            entry is not None
            and entry.get("fingerprint") == fingerprint
            and list(entry.get("keys", [])) == keys
            and entry.get("data_signature", "") == data_signature
        ):
            self.hits += 1
            return entry["logits"].clone()
        self.misses += 1
        logits = compute().detach().float().cpu()
        if logits.shape[0] != len(keys):
            raise ValueError(f"{name}: computed {logits.shape[0]} rows of logits for {len(keys)} slides")
        self.entries[name] = {
            "fingerprint": fingerprint,
            "keys": keys,
            "data_signature": data_signature,
            "logits": logits.clone(),
        }
        self._save()
        return logits

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"format": CACHE_FORMAT, "entries": self.entries}, tmp)
