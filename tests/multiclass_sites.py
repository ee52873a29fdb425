"""Tiny 3-class paired feature-file sites (normal / benign / carcinoma) in the exact FeatureWriter format."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from tests.feature_sites import D, _world, write_slide

CLASSES = ("normal", "benign", "carcinoma")  # labels.csv names; the label map sorts them: benign, carcinoma, normal


def class_worlds(seed: int = 123) -> list[dict[str, np.ndarray]]:
    """One 'physics' per class: the shared token -> child map, and a class direction on lesion tokens
    (normal: none; benign and carcinoma: two different random directions)."""
    base = _world(seed)
    rng = np.random.default_rng(seed + 1)
    return [base] + [{**base, "v": rng.normal(size=D) * 1.5} for _ in CLASSES[1:]]


def make_multiclass_site(root: Path, name: str, splits: dict[str, int], seed: int, **kw: Any) -> Path:
    """A site with `splits[split]` slides per split, the three classes in turn (labels.csv names: CLASSES)."""
    site = root / name
    site.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    worlds = class_worlds()
    rows = []
    for split, count in splits.items():
        for i in range(count):
            c = i % len(CLASSES)
            sid = f"{name}_{split}_{i}"
            write_slide(site, sid, int(c > 0), rng, worlds[c], n_low=int(rng.integers(4, 8)), **kw)
            rows.append((sid, CLASSES[c], split, f"p_{sid}"))
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "split", "patient_id"])
        writer.writerows(rows)
    return site
