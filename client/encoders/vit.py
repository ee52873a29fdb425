"""A plain-torch Vision Transformer loading timm-style state_dicts (UNI, Virchow, Phikon-style models).

Geometry (width, depth, patch size, MLP width, GLU MLP, layerscale, register tokens, which prefix
tokens carry a position embedding) is read from the checkpoint. Hugging Face `ViTModel` checkpoints
(Phikon) are renamed to timm keys first. The number of heads cannot be read from weights: it comes
from `encoder.vit-num-heads`, else 16 for the ViT-H/g widths 1280/1408, else width / 64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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

POOLINGS = ("cls", "mean", "cls+mean")
TIMM_LN_EPS = 1e-6
HF_LN_EPS = 1e-12
_WIDE_HEAD_WIDTHS = {1280: 16, 1408: 16}  # ViT-H and ViT-g use 80- and 88-wide heads


@dataclass(frozen=True)
class ViTGeometry:
    """Shape of a ViT as read from its state_dict."""

    embed_dim: int
    depth: int
    patch_size: int
    mlp_hidden: int
    glu_mlp: bool
    qkv_bias: bool
    layerscale: bool
    has_cls: bool
    num_reg: int
    pos_prefix: int  # how many leading prefix tokens (cls, then registers) carry a position embedding
    pos_grid: int  # side of the square patch grid the position embedding was trained for
    final_norm: bool
    fc_norm: bool
    ln_eps: float

    @property
    def num_prefix(self) -> int:
        """Class token plus register tokens."""
        return int(self.has_cls) + self.num_reg


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attention output [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (`gamma`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x * gamma."""
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, or the packed SwiGLU (fc1 -> SiLU(first half) * second half -> fc2)."""

    def __init__(self, dim: int, hidden: int, glu: bool) -> None:
        super().__init__()
        self.glu = glu
        self.fc1 = nn.Linear(dim, 2 * hidden if glu else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """MLP output [B, N, D]."""
        h = self.fc1(x)
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block with optional layerscale."""

    def __init__(self, geo: ViTGeometry, heads: int) -> None:
        super().__init__()
        d = geo.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=geo.ln_eps)
        self.attn = Attention(d, heads, geo.qkv_bias)
        self.ls1 = LayerScale(d) if geo.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=geo.ln_eps)
        self.mlp = Mlp(d, geo.mlp_hidden, geo.glu_mlp)
        self.ls2 = LayerScale(d) if geo.layerscale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Block output [B, N, D]."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a strided conv); trailing pixels that fill no patch are dropped."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        """Patch feature map [B, D, H // p, W // p]."""
        return self.proj(x)


class VisionTransformer(PatchEncoder):
    """ViT trunk whose patch embedding is pooled per `pooling` (cls: D, mean: D, cls+mean: 2D)."""

    def __init__(
        self,
        *,
        name: str,
        geometry: ViTGeometry,
        heads: int,
        pooling: str,
        weights_hash: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        geo = geometry
        if pooling not in POOLINGS:
            raise ValueError(f"ViT pooling must be one of {POOLINGS}; got {pooling!r}")
        if pooling != "mean" and not geo.has_cls:
            raise ValueError(f"ViT pooling {pooling!r} needs a class token, and this checkpoint has none; use 'mean'")
        if heads < 1 or geo.embed_dim % heads:
            raise ValueError(
                f"ViT embed dim {geo.embed_dim} is not divisible into {heads} heads (encoder.vit-num-heads)"
            )
        dim = 2 * geo.embed_dim if pooling == "cls+mean" else geo.embed_dim
        super().__init__(name=name, dim=dim, weights_hash=weights_hash, mean=mean, std=std, has_feature_map=False)
        self.geometry = geo
        self.heads = heads
        self.pooling = pooling
        d = geo.embed_dim
        self.patch_embed = PatchEmbed(geo.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if geo.has_cls else None
        self.reg_token = nn.Parameter(torch.zeros(1, geo.num_reg, d)) if geo.num_reg else None
        self.pos_embed = nn.Parameter(torch.zeros(1, geo.pos_prefix + geo.pos_grid**2, d))
        self.blocks = nn.ModuleList(Block(geo, heads) for _ in range(geo.depth))
        self.norm = nn.LayerNorm(d, eps=geo.ln_eps) if geo.final_norm else None
        self.fc_norm = nn.LayerNorm(d, eps=geo.ln_eps) if geo.fc_norm else None

    def _patch_pos(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings of the patch tokens, bicubically resized (as timm) to the input grid."""
        g = self.geometry.pos_grid
        pos = self.pos_embed[:, self.geometry.pos_prefix :]
        if (grid_h, grid_w) == (g, g):
            return pos
        d = pos.shape[-1]
        grid = pos.float().reshape(1, g, g, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d).to(pos.dtype)

    def _embed_tokens(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Input tokens [B, prefix + h*w, D] (prefix tokens, then patches, position embeddings added) and (h, w)."""
        geo = self.geometry
        fmap = self.patch_embed(x)
        b, _, gh, gw = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2) + self._patch_pos(gh, gw)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if prefix:
            pre = torch.cat(prefix, dim=1)
            if geo.pos_prefix:
                pos_pre = self.pos_embed[:, : geo.pos_prefix]
                pre = torch.cat([pre[:, : geo.pos_prefix] + pos_pre, pre[:, geo.pos_prefix :]], dim=1)
            tokens = torch.cat([pre, tokens], dim=1)
        return tokens, gh, gw

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All output tokens [B, prefix + h*w, D] (class token, registers, patches) after the final norm."""
        tokens, _, _ = self._embed_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens) if self.norm is not None else tokens

    def layer_modules(self) -> list[nn.Module]:
        """The transformer blocks; the last one carries the final norms (they train with it)."""
        blocks: list[nn.Module] = list(self.blocks)
        tail = [m for m in (self.norm, self.fc_norm) if m is not None]
        if tail:
            blocks[-1] = nn.ModuleList([blocks[-1], *tail])
        return blocks

    def _pool(self, tokens: Tensor) -> Tensor:
        parts = []
        if self.pooling in ("cls", "cls+mean"):
            parts.append(tokens[:, 0])
        if self.pooling in ("mean", "cls+mean"):
            parts.append(tokens[:, self.geometry.num_prefix :].mean(dim=1))
        if self.fc_norm is not None:
            parts = [self.fc_norm(p) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward_layers(self, x: Tensor, layers: Sequence[int]) -> LayerOutputs:
        """Pooled embedding [B, dim] and, per requested block, its patch tokens as a map [B, D, h, w]."""
        wanted = set(layers)
        tokens, gh, gw = self._embed_tokens(x)
        prefix = self.geometry.num_prefix
        maps: dict[int, Tensor] = {}
        summaries: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            tokens = self.run_layer(block, tokens)
            if i in wanted:
                patches = tokens[:, prefix:]
                maps[i] = patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
                summaries[i] = tokens[:, 0] if self.geometry.has_cls else patches.mean(dim=1)
        final = self.norm(tokens) if self.norm is not None else tokens
        return LayerOutputs(embedding=self._pool(final), maps=maps, summaries=summaries)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled patch embedding [B, dim] of a normalised batch."""
        return self._pool(self.forward_tokens(x))

    def identity(self) -> dict[str, object]:
        """Base identity plus pooling and heads."""
        return {**super().identity(), "pooling": self.pooling, "heads": self.heads}


_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_vit(state: Mapping[str, Tensor]) -> bool:
    """Whether a state_dict uses Hugging Face `ViTModel` names (optionally under `vit.`)."""
    return any(k.removeprefix("vit.") == "embeddings.patch_embeddings.projection.weight" for k in state)


def hf_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face `ViTModel` state_dict to timm keys (q, k, v fused into qkv)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if key.startswith(("pooler.", "classifier.")) or key == "embeddings.mask_token":
            continue
        match = _HF_BLOCK.match(key)
        if match is None:
            out[_HF_TOP_NAMES.get(key, key)] = value
            continue
        idx, rest = int(match.group(1)), match.group(2)
        part = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if part is not None:
            qkv.setdefault((idx, part.group(2)), {})[part.group(1)] = value
            continue
        stem, _, leaf = rest.rpartition(".")
        out[f"blocks.{idx}.{_HF_BLOCK_NAMES.get(stem, stem)}.{leaf}"] = value
    for (idx, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"block {idx}: attention {leaf} lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"blocks.{idx}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def infer_geometry(state: Mapping[str, Tensor], ln_eps: float = TIMM_LN_EPS) -> ViTGeometry:
    """Read a ViT's shape from its timm-style state_dict; a clear error when a needed key is absent."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"not a timm-style ViT state_dict: key {key!r} is missing")
    proj, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if proj.dim() != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"patch_embed.proj.weight must be [D, 3, p, p]; got {tuple(proj.shape)}")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != embed_dim:
        raise ValueError(f"pos_embed must be [1, L, {embed_dim}]; got {tuple(pos.shape)}")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k)))
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    hidden = int(fc2.shape[1])
    glu = int(fc1.shape[0]) == 2 * hidden
    has_cls = "cls_token" in state
    num_reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    pos_len = int(pos.shape[1])
    pos_prefix, pos_grid = -1, 0
    for candidate in dict.fromkeys((int(has_cls) + num_reg, int(has_cls), 0)):
        side = _square_side(pos_len - candidate)
        if side is not None:
            pos_prefix, pos_grid = candidate, side
            break
    if pos_prefix < 0:
        raise ValueError(
            f"pos_embed has {pos_len} positions, which is no square patch grid plus the "
            f"{int(has_cls)} class and {num_reg} register tokens"
        )
    return ViTGeometry(
        embed_dim=embed_dim,
        depth=depth,
        patch_size=patch,
        mlp_hidden=hidden,
        glu_mlp=glu,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        layerscale="blocks.0.ls1.gamma" in state,
        has_cls=has_cls,
        num_reg=num_reg,
        pos_prefix=pos_prefix,
        pos_grid=pos_grid,
        final_norm="norm.weight" in state,
        fc_norm="fc_norm.weight" in state,
        ln_eps=ln_eps,
    )


def default_heads(embed_dim: int) -> int:
    """Heads when the config names none: 16 for ViT-H/g widths, else 64-wide heads."""
    return _WIDE_HEAD_WIDTHS.get(embed_dim, max(embed_dim // 64, 1))


def build(cfg: EncoderConfig) -> VisionTransformer:
    """A ViT from the local checkpoint at `encoder.weights` (timm or Hugging Face ViTModel keys)."""
    path = require_weights(cfg)
    state = load_checkpoint(path)
    ln_eps = TIMM_LN_EPS
    if is_hf_vit(state):
        state, ln_eps = hf_to_timm(state), HF_LN_EPS
    try:
        geometry = infer_geometry(state, ln_eps)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    mean, std = normalization(cfg, IMAGENET_MEAN, IMAGENET_STD)
    model = VisionTransformer(
        name=cfg.name,
        geometry=geometry,
        heads=cfg.vit_num_heads or default_heads(geometry.embed_dim),
        pooling=cfg.vit_pooling,
        weights_hash=sha256_file(path),
        mean=mean,
        std=std,
    )
    what = f"{cfg.name} (ViT width {geometry.embed_dim}, depth {geometry.depth}, patch {geometry.patch_size})"
    load_strict(model, state, ignore=("head.",), source=path, what=what)
    return model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit Module.to(memory_format=)
