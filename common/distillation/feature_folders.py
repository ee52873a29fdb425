"""Names of the feature folders that fine-tuned encoders write at a site, and finding a bundle's folder again.

Each fine-tuned encoder writes its own folder, named from its weights' sha256, so two runs (two LOSO folds, two
seeds, a centralised and a federated fine-tune) never overwrite each other's files:

- `features/<encoder>-ft-<hash12>/low`: 5x files of a pixel-stage-1 (LRMIL) encoder;
- `features/<encoder>-vib-<hash12>/{high,low}`: both levels of a VIB-fine-tuned encoder.

Re-encoding into the same folder resumes (same weights, same folder); new weights get a new folder. Such folders
never count as the site's own encoder folder (`is_finetuned_features`), nor does the older `<encoder>-finetuned`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

HASH_CHARS = 12  # hex digits of the weights' sha256 in a folder name
LEGACY_SUFFIX = "-finetuned"  # `<encoder>-finetuned` / `<encoder>-vib-finetuned`: one folder for every run
MARKS: dict[str, str] = {"lrmil": "ft", "vib": "vib"}  # objective -> folder-name mark
_NAMED = re.compile(rf"-(?:{'|'.join(MARKS.values())})-[0-9a-f]{{{HASH_CHARS}}}$")

Objective = Literal["lrmil", "vib"]
OBJECTIVES: tuple[Objective, ...] = ("lrmil", "vib")


def finetuned_features_name(encoder: str, weights_hash: str, objective: Objective = "lrmil") -> str:
    """`<encoder>-ft-<hash12>` (pixel stage 1) or `<encoder>-vib-<hash12>` (VIB): the feature folder of the
    encoder `encoder` fine-tuned to the weights whose sha256 is `weights_hash`."""
    digest = weights_hash.lower()
    if not re.fullmatch(rf"[0-9a-f]{{{HASH_CHARS},}}", digest):
        raise ValueError(
            f"weights hash {weights_hash[:80]!r}: expected a hex sha256 (at least {HASH_CHARS} hex digits) to name "
            f"the fine-tuned feature folder of {encoder!r}"
        )
    if objective not in MARKS:
        raise ValueError(f"objective {objective!r}: expected one of {sorted(MARKS)}")
    return f"{encoder}-{MARKS[objective]}-{digest[:HASH_CHARS]}"


def is_finetuned_features(name: str) -> bool:
    """Whether the feature folder `name` holds a fine-tuned encoder's files (not a site's own encoder folder)."""
    return bool(_NAMED.search(name)) or name.endswith(LEGACY_SUFFIX)


def find_finetuned_features(site_dir: Path | str, encoder: str, weights_hash: str) -> str | None:
    """The name of the site's feature folder of `encoder` fine-tuned to `weights_hash` (pixel stage 1's, else
    VIB's), or None when the site has neither."""
    for objective in OBJECTIVES:
        name = finetuned_features_name(encoder, weights_hash, objective)
        if (Path(site_dir) / "features" / name).is_dir():
            return name
    return None


__all__ = [
    "HASH_CHARS",
    "LEGACY_SUFFIX",
    "OBJECTIVES",
    "Objective",
    "finetuned_features_name",
    "find_finetuned_features",
    "is_finetuned_features",
]
