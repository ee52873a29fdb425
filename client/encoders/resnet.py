"""ResNet-50 (bottleneck, torchvision/timm key naming) loading a local state_dict.

A checkpoint without `layer4.*` keys, or the name `resnet50_trunc`, gives the truncated trunk
used by CLAM (up to layer3, 1024-d); otherwise the full trunk (2048-d).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedslide.client.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LayerOutputs,
    PatchEncoder,
    load_checkpoint,
    load_strict,
    normalization,
    require_weights,
    sha256_file,
)
from fedslide.common.config.preprocess import EncoderConfig

BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand, with a projection shortcut where shapes change."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(h + shortcut)


class ResNet50(PatchEncoder):
    """ResNet-50 trunk (`stages`=4: 2048-d, stride 32; `stages`=3: 1024-d, stride 16)."""

    def __init__(
        self,
        *,
        name: str,
        weights_hash: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        stages: int = 4,
    ) -> None:
        if stages not in (3, 4):
            raise ValueError(f"ResNet-50 trunk has 3 or 4 stages; got {stages}")
        super().__init__(
            name=name,
            dim=WIDTHS[stages - 1] * EXPANSION,
            weights_hash=weights_hash,
            mean=mean,
            std=std,
            has_feature_map=True,
        )
        self.stages = stages
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        for i in range(stages):
            blocks = []
            for j in range(BLOCKS[i]):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(Bottleneck(in_ch, WIDTHS[i], stride))
                in_ch = WIDTHS[i] * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward_features(self, x: Tensor) -> Tensor:
        """Output of the last stage [B, dim, h, w] of a normalised batch."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def layer_modules(self) -> list[nn.Module]:
        """The bottleneck blocks of every stage in order (16 with layer4, 13 without); the stem is no layer."""
        return [block for i in range(self.stages) for block in getattr(self, f"layer{i + 1}")]

    def forward_layers(self, x: Tensor, layers: Sequence[int]) -> LayerOutputs:
        """Embedding [B, dim] and the outputs of the requested bottleneck blocks."""
        wanted = set(layers)
        maps: dict[int, Tensor] = {}
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for i, block in enumerate(self.layer_modules()):
            x = self.run_layer(block, x)
            if i in wanted:
                maps[i] = x
        summaries = {i: m.mean(dim=(2, 3)) for i, m in maps.items()}
        return LayerOutputs(embedding=x.mean(dim=(2, 3)), maps=maps, summaries=summaries)

    def identity(self) -> dict[str, object]:
        """Base identity plus the number of stages."""
        return {**super().identity(), "stages": self.stages}


def _build(cfg: EncoderConfig, truncate: bool) -> ResNet50:
    path = require_weights(cfg)
    state = load_checkpoint(path)
    stages = 3 if truncate or not any(k.startswith("layer4.") for k in state) else 4
    mean, std = normalization(cfg, IMAGENET_MEAN, IMAGENET_STD)
    model = ResNet50(name=cfg.name, weights_hash=sha256_file(path), mean=mean, std=std, stages=stages)
    ignore = ("fc.", "layer4.") if stages == 3 else ("fc.",)
    load_strict(model, state, ignore=ignore, source=path, what=f"{cfg.name} ({stages} stages)")
    return model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit Module.to(memory_format=)


def build(cfg: EncoderConfig) -> ResNet50:
    """ResNet-50 from `encoder.weights`; truncated after layer3 when the checkpoint has no layer4."""
    return _build(cfg, truncate=False)


def build_truncated(cfg: EncoderConfig) -> ResNet50:
    """ResNet-50 up to layer3 (1024-d, as CLAM), ignoring layer4 of a full checkpoint."""
    return _build(cfg, truncate=True)
