"""Why `fedslide train` refused its input; every message names the files or slide ids at fault."""

from __future__ import annotations


class TrainingInputError(ValueError):
    """The labels, feature files or splits cannot be trained on; nothing was trained."""


class LabelsError(TrainingInputError):
    """The labels CSV is missing, malformed or inconsistent."""


class FeatureDataError(TrainingInputError):
    """One or more feature files are missing, empty, unreadable, non-finite or of mismatched dims."""


class MissingDataError(TrainingInputError):
    """Slides with labels but no feature file, or feature files without labels."""


class SplitError(TrainingInputError):
    """A train/val/test split cannot be used (too few patients, a class missing from training, ...)."""
