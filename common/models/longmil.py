"""LongMIL-style local-window attention for very long bags, then global attention pooling.

Instances are put in a spatial order (Morton / Z-order of their grid cell when coords are
given, else their given order) and cut into windows of `window` instances; self-attention
runs inside each window only, so memory and time grow as O(N * window), never O(N^2).
Successive layers shift the window boundaries by half a window so information crosses
windows. With coords, a 2-D ALiBi bias (minus a per-head slope times the grid distance)
favours near neighbours. With window >= N the layer is exactly full self-attention.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import (
    AttentionPool,
    InstanceEncoder,
    init_linear,
    resolve_mask,
)


def grid_cells(coords: torch.Tensor) -> torch.Tensor:
    """Level-0 coords [n, 2] -> integer grid cells [n, 2], the cell size being the smallest coordinate step."""
    c = coords.to(torch.float64)
    c = c - c.amin(dim=0)
    steps = []
    for d in range(2):
        values = torch.unique(c[:, d])
        gaps = values[1:] - values[:-1]
        gaps = gaps[gaps > 1e-6]
        if gaps.numel():
            steps.append(gaps.min())
    step = torch.stack(steps).min() if steps else c.new_ones(())
    return torch.round(c / step).to(torch.int64)


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Insert a zero bit between the low 21 bits of each int64 (for Morton codes)."""
    v = v & 0x1FFFFF
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    v = (v | (v << 2)) & 0x1249249249249249
    v = (v | (v << 1)) & 0x1555555555555555
    return v


def morton_order(cells: torch.Tensor) -> torch.Tensor:
    """Permutation sorting integer grid cells [n, 2] (x, y) along the Z-order curve."""
    code = _spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << 1)
    return torch.sort(code, stable=True).indices


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes 2^(-8 i / heads), i = 1..heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    shift: int = 0,
    positions: torch.Tensor | None = None,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of q, k, v [heads, n, d] inside windows of `window` consecutive tokens.

    Window boundaries sit at multiples of `window` minus `shift`. `positions` [n, 2] (grid
    units) with `slopes` [heads] add the bias -slope * distance. window None or >= n: one
    window holding every token, i.e. full attention. Peak memory O(n * window * heads).
    """
    heads, n, d = q.shape
    if window is None or window >= n:
        window, shift = n, 0
    shift = shift % window
    total = math.ceil((n + shift) / window) * window
    pad = (shift, total - n - shift)
    chunks = total // window

    def split(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0) + pad).view(heads, chunks, window, -1).transpose(0, 1)  # [chunks, heads, w, d]

    valid = F.pad(torch.ones(n, dtype=torch.bool, device=q.device), pad).view(chunks, 1, window)
    if positions is not None:
        assert slopes is not None, "positions need ALiBi slopes"
        with torch.no_grad():
            pos = F.pad(positions.to(q.dtype).T, pad).T.reshape(chunks, window, 2)
            dist = torch.cdist(pos, pos).masked_fill_(~valid, float("inf"))  # [chunks, w, w]; padded keys: inf
            attn_mask: torch.Tensor | None = dist.unsqueeze(1) * -slopes.to(q.dtype).view(1, heads, 1, 1)
    else:
        attn_mask = valid.unsqueeze(1) if (pad[0] or pad[1]) else None
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    out = out.transpose(0, 1).reshape(heads, total, d)
    return out[:, shift : shift + n]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None = None,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference full self-attention that builds the n x n score matrix explicitly (small n only)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if positions is not None:
        assert slopes is not None, "positions need ALiBi slopes"
        p = positions.to(q.dtype)
        scores = scores - slopes.to(q.dtype).view(-1, 1, 1) * torch.cdist(p, p).unsqueeze(0)
    return torch.softmax(scores, dim=-1) @ v


class LocalAttentionLayer(nn.Module):
    """Pre-norm residual multi-head self-attention inside windows, then a pre-norm residual MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        window: int | None,
        shift: int,
        positions: torch.Tensor | None,
        dense: bool = False,
        group: int = 4096,
    ) -> torch.Tensor:
        """x [n, dim] of one bag in window order.

        Long bags run in groups of whole windows (about `group` tokens); while gradients are
        recorded each group is checkpointed, so only the layer's input and output stay in memory.
        """
        n = x.shape[0]
        if dense or window is None or window >= n or n <= group:
            return self._block(x, window, shift, positions, dense)
        per_group = max(1, group // window) * window
        bounds = [0, *range(per_group - shift % window, n, per_group), n]
        outs = []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if end <= start:
                continue
            pos = positions[start:end] if positions is not None else None
            args = (x[start:end], window, shift if i == 0 else 0, pos, False)
            if torch.is_grad_enabled():
                outs.append(checkpoint(self._block, *args, use_reentrant=False))
            else:
                outs.append(self._block(*args))
        return torch.cat(outs)

    def _block(
        self, x: torch.Tensor, window: int | None, shift: int, positions: torch.Tensor | None, dense: bool
    ) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        slopes = cast("torch.Tensor | None", self.slopes)  # a buffer (None without ALiBi)
        if dense:
            out = dense_attention(q, k, v, positions, slopes)
        else:
            out = windowed_attention(q, k, v, window, shift, positions, slopes)
        x = x + self.proj(out.transpose(0, 1).reshape(n, dim))
        return x + self.mlp(self.norm_mlp(x))


class LongMIL(MILModel):
    """Instance MLP, `layers` local-window attention layers (alternately shifted), gated attention pooling.

    `window=None` switches to dense full attention (reference / small bags). attention: [B, N]
    of the global pooling. Bags are processed one at a time with padding dropped.
    """

    attention_pooling = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        heads: int = 8,
        layers: int = 2,
        window: int | None = 256,
        shift_windows: bool = True,
        alibi: bool = True,
        attention_dim: int = 128,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.in_dim, self.window, self.shift_windows, self.alibi = in_dim, window, shift_windows, alibi
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.layers = nn.ModuleList(LocalAttentionLayer(hidden_dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.pool = AttentionPool(hidden_dim, attention_dim, gated=True)
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        mask = resolve_mask(features, mask, self.in_dim)
        if coords is not None and coords.shape[:2] != mask.shape:
            raise ValueError(f"coords must be [B, N, 2] = {tuple(mask.shape)} + (2,), got {tuple(coords.shape)}")
        embeddings, attention = [], features.new_zeros(mask.shape)
        for b in range(features.shape[0]):
            index = mask[b].nonzero().squeeze(1)
            h = self.encoder(features[b] if index.numel() == mask.shape[1] else features[b, index])
            positions = None
            if coords is not None:
                cells = grid_cells(coords[b, index])
                order = morton_order(cells)
                h, index = h[order], index[order]
                positions = cells[order] if self.alibi else None
            emb, attn = self._bag(h, positions)
            embeddings.append(emb)
            attention[b, index] = attn
        embedding = torch.stack(embeddings)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention)

    def _bag(self, h: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag's instance embeddings [n, H] in window order -> (embedding [H], attention [n])."""
        window = self.window
        for i, layer in enumerate(self.layers):
            shift = (window // 2) if (self.shift_windows and window is not None and i % 2) else 0
            h = layer(h, window, shift, positions, dense=window is None)
        ones = torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device)
        emb, attn = self.pool(self.norm(h).unsqueeze(0), ones)
        return emb[0], attn[0]
