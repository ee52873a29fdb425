"""Patch encoders: a registry of plain-torch networks mapping uint8 patches to embeddings."""

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.encoders.registry import DEFAULT_ENCODER, ENCODERS, available_encoders, build_encoder

__all__ = ["DEFAULT_ENCODER", "ENCODERS", "PatchEncoder", "available_encoders", "build_encoder"]
