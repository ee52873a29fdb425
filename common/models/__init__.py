"""MIL model zoo: one interface (MILModel -> MILOutput), built by name from a ModelConfig."""

from fedslide.common.config.model import MODEL_NAMES, ModelConfig
from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import CKAHead, make_head
from fedslide.common.models.registry import build_model

__all__ = ["MODEL_NAMES", "CKAHead", "MILModel", "MILOutput", "ModelConfig", "build_model", "make_head"]
