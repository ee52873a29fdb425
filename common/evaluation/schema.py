"""The evaluation study's metrics.json: schema name, the settings' wording, and a JSON Schema to check it.

`JSON_SCHEMA` (draft 2020-12) pins the parts a later run is compared on (`fedslide compare`):
models -> setting -> overall / per_site -> metric -> {estimate, lo, hi}; undefined values are null.
"""

from __future__ import annotations

from typing import Any

from fedslide.common.metrics import METRIC_NAMES

METRICS_SCHEMA = "fedslide.evaluation.metrics/1"


def settings_doc(held_out_split: str) -> dict[str, dict[str, str]]:
    """What the two evaluation settings mean (written into metrics.json and the report)."""
    held = "every labelled slide" if held_out_split == "all" else "the test split"
    return {
        "in_distribution": {
            "slides": "the site's test split",
            "models": "models that trained on the site: its site-local model; the LOSO federations and centralized "
            "models of the folds that hold out another site (pooled over those folds)",
        },
        "out_of_site": {
            "slides": f"{held} of the held-out site",
            "models": "models that never saw the site: the federation and the centralized model of its LOSO fold; the "
            "other sites' site-local models (pooled)",
        },
    }


_NUM = {"type": ["number", "null"]}
_INTERVAL = {
    "type": "object",
    "required": ["estimate", "lo", "hi", "n_boot_valid"],
    "properties": {"estimate": _NUM, "lo": _NUM, "hi": _NUM, "n_boot_valid": {"type": "integer"}},
}
_ENTRY = {
    "type": ["object", "null"],
    "required": [*METRIC_NAMES, "n", "n_slides", "n_patients", "n_models", "class_counts", "bootstrap"],
    "properties": {
        **{m: _INTERVAL for m in METRIC_NAMES},
        "n": {"type": "integer", "minimum": 1},
        "n_slides": {"type": "integer"},
        "n_patients": {"type": "integer"},
        "n_models": {"type": "integer"},
        "class_counts": {"type": "array", "items": {"type": "integer"}},
        "bootstrap": {"enum": ["stratified-slide", "patient-cluster"]},
    },
}
_POINTS = {"type": "object", "properties": {m: _NUM for m in METRIC_NAMES}, "required": list(METRIC_NAMES)}
_SETTING = {
    "type": "object",
    "required": ["overall", "mean_over_sites", "per_site"],
    "properties": {
        "overall": _ENTRY,
        "mean_over_sites": _POINTS,
        "per_site": {"type": "object", "additionalProperties": _ENTRY},
    },
}
_MODEL = {
    "type": "object",
    "required": ["in_distribution", "out_of_site", "gap"],
    "properties": {
        "in_distribution": _SETTING,
        "out_of_site": _SETTING,
        "gap": {
            "type": "object",
            "required": ["overall", "mean_over_sites", "per_site"],
            "properties": {
                "overall": _POINTS,
                "mean_over_sites": _POINTS,
                "per_site": {"type": "object", "additionalProperties": _POINTS},
            },
        },
    },
}
_PAIRED = {
    "type": "object",
    "required": ["a", "b", "setting", "site"],
    "properties": {
        "a": {"type": "string"},
        "b": {"type": "string"},
        "setting": {"enum": ["in_distribution", "out_of_site"]},
        "site": {"type": "string"},
        "auc_a": _NUM,
        "auc_b": _NUM,
        "diff": _NUM,
        "lo": _NUM,
        "hi": _NUM,
        "p_value": _NUM,
        "se": _NUM,
        "method": {"enum": ["delong", "bootstrap"]},
        "n": {"type": "integer"},
        "skipped": {"type": "string"},
    },
    "oneOf": [
        {"required": ["skipped"]},
        {"required": ["auc_a", "auc_b", "diff", "lo", "hi", "p_value", "method", "n"]},
    ],
}
_SITE = {
    "type": "object",
    "required": [
        "name",
        "dir",
        "slides",
        "patients",
        "splits",
        "classes",
        "magnification",
        "mpp",
        "scanner",
        "masks",
        "held_out_slides",
    ],
    "properties": {
        "name": {"type": "string"},
        "dir": {"type": "string"},
        "slides": {"type": "integer"},
        "patients": {"type": "integer"},
        "splits": {"type": "object"},
        "classes": {"type": "object"},
        "magnification": {"type": "array", "items": {"type": "number"}},
        "mpp": {"type": "array", "items": {"type": "number"}},
        "scanner": {"type": ["string", "null"]},
        "masks": {"type": "integer"},
        "held_out_slides": {"type": "integer"},
    },
}
_HEATMAP = {
    "type": "object",
    "required": ["site", "slide_id", "label", "source", "model", "fold", "caption", "path", "probs", "predicted"],
    "properties": {
        "source": {"enum": ["site", "centralized"]},
        "path": {"type": "string"},
        "probs": {"type": "array", "items": {"type": "number"}},
    },
}

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": METRICS_SCHEMA,
    "type": "object",
    "required": [
        "schema",
        "study_id",
        "classes",
        "regimes",
        "sites",
        "settings",
        "bootstrap",
        "models",
        "transfer",
        "paired_tests",
        "folds",
        "federation",
        "cost",
        "heatmaps",
        "predictions",
        "config",
        "timings",
    ],
    "properties": {
        "schema": {"const": METRICS_SCHEMA},
        "study_id": {"type": "string"},
        "classes": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "regimes": {"type": "array", "items": {"enum": ["local", "federated", "centralized"]}},
        "sites": {"type": "array", "items": _SITE, "minItems": 2},
        "settings": {"type": "object", "required": ["in_distribution", "out_of_site"]},
        "bootstrap": {"type": "object", "required": ["n_boot", "alpha", "seed", "paired_test"]},
        "models": {
            "type": "object",
            "propertyNames": {"pattern": r"^(local|federated|centralized)\.(teacher_high|student_low|baseline_low)$"},
            "additionalProperties": _MODEL,
        },
        "transfer": {"type": "object"},
        "paired_tests": {"type": "array", "items": _PAIRED},
        "folds": {"type": "object"},
        "federation": {"type": "object"},
        "cost": {"type": "object"},
        "heatmaps": {"type": "array", "items": _HEATMAP},
        "predictions": {"type": "string"},
        "config": {"type": "object"},
        "timings": {"type": "object"},
    },
}
