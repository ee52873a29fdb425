"""The label map a config may declare: class names in class-index order."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator


def _split(value: object) -> object:
    """A comma-separated string (as Flower's flat run config carries lists) -> its names."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _check_class_names(value: list[str] | None) -> list[str] | None:
    if value is None:
        return value
    names = [str(v).strip() for v in value]
    if len(names) < 2 or "" in names or len(set(names)) != len(names):
        raise ValueError(f"need two or more distinct, non-empty class names, got {value}")
    return names


ClassNames = Annotated[list[str] | None, BeforeValidator(_split), AfterValidator(_check_class_names)]
CLASSES_HELP = (
    "label map: the class names in class-index order; a labels.csv label outside it is an error naming the file, "
    "line and value (default: the sorted labels found); names hold no commas"
)
