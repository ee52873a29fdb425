"""Class sets of a synthetic cohort and how each lesion class looks.

binary: normal / tumor. subtyping (BRACS-style typing): normal / benign / carcinoma. A lesion is drawn
where the slide's lesion mask is; each class has its own 20x cue (the nuclei inside the lesion: size,
crowding, shape, darkness) and a weaker 5x cue (the lesion's mean stain: nuclei too small to resolve at
2 µm/px leave only their mean hematoxylin, plus the diffuse eosin/hematoxylin change):

- carcinoma (= the binary task's tumor): crowded small hyperchromatic pleomorphic nuclei; more eosin and
  less diffuse hematoxylin between them.
- benign: elongated (spindle) nuclei, larger than carcinoma's and half as crowded; slightly less eosin and
  diffuse hematoxylin (at 5x: a few grey levels paler than normal tissue; carcinoma keeps normal's mean colour).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fedslide.client.synth.tissue_render import Appearance

SynthTask = Literal["binary", "subtyping"]

TASK_LABELS: dict[str, tuple[str, ...]] = {
    "binary": ("normal", "tumor"),
    "subtyping": ("normal", "benign", "carcinoma"),
}
NORMAL = "normal"

BENIGN_APPEARANCE = dataclasses.replace(
    Appearance(),
    tumor_nucleus_h=1.5,
    tumor_eosin_drop=0.05,
    tumor_hematoxylin_drop=0.2,
    tumor_cell_um=4.0,
    tumor_occupancy=0.6,
    tumor_radius_um=(1.0, 1.3),
    tumor_aspect=(0.3, 0.5),
)

_APPEARANCES: dict[str, Appearance] = {"tumor": Appearance(), "carcinoma": Appearance(), "benign": BENIGN_APPEARANCE}


def task_labels(task: str) -> tuple[str, ...]:
    """The class names a task writes into labels.csv, normal first."""
    try:
        return TASK_LABELS[task]
    except KeyError:
        raise ValueError(f"synth task {task!r} is not one of {', '.join(TASK_LABELS)}") from None


def plan_labels(task: str, count: int) -> list[str]:
    """`count` labels, as balanced as the classes allow (the remainder goes to normal), lesions first; the
    binary order is the one cohorts were always drawn with (so they stay byte-identical)."""
    labels = task_labels(task)
    lesions = labels[1:]
    per = count // len(labels)
    if task == "binary":
        per = count // 2
    out: list[str] = []
    for name in reversed(lesions):
        out += [name] * per
    return out + [NORMAL] * (count - len(out))


def is_lesion(label: str) -> bool:
    """Whether slides of this class carry a lesion (and a lesion mask)."""
    return label != NORMAL


def lesion_appearance(label: str) -> Appearance:
    """The rendering constants of a slide of class `label` (normal slides use the defaults; they draw no lesion)."""
    return _APPEARANCES.get(label, Appearance())
