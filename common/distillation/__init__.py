"""High -> low distillation: LRMIL cross-resolution adapter, D&D clusters/experts, KD students, student bundles."""

from fedslide.common.distillation.bundle import BundleMeta, BundleMismatchError, StudentBundle

__all__ = ["BundleMeta", "BundleMismatchError", "StudentBundle"]
