"""TransMIL (Shao et al. 2021): Nystrom-attention transformer with a PPEG positional encoder."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import init_linear, resolve_mask


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each [..., m, m] matrix by the Nystromformer iteration."""
    abs_m = matrix.abs()
    scale = abs_m.sum(dim=-1).amax(dim=-1) * abs_m.sum(dim=-2).amax(dim=-1)
    z = matrix.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    for _ in range(iterations):
        mz = matrix @ z
        z = 0.25 * z @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with Nystrom landmarks (Xiong et al. 2021), one bag at a time.

    Landmarks are the means of `landmarks` contiguous segments of the sequence; with no more
    tokens than landmarks the attention is computed exactly. A depthwise convolution over the
    values (kernel 33) is added as in the Nystromformer.
    """

    def __init__(
        self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.landmarks = heads, dim // heads, landmarks
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [1, n, dim] -> (output [1, n, dim], exact attention row of token 0 [heads, n])."""
        _, n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # each [heads, n, d]
        q = q / math.sqrt(self.head_dim)
        if n <= self.landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            segment = torch.arange(n, device=x.device) * self.landmarks // n  # every segment non-empty
            counts = torch.bincount(segment, minlength=self.landmarks).to(x.dtype)[:, None]
            q_l = q.new_zeros(self.heads, self.landmarks, self.head_dim).index_add(1, segment, q) / counts
            k_l = k.new_zeros(self.heads, self.landmarks, self.head_dim).index_add(1, segment, k) / counts
            kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
            kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
            kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
            out = (kernel_1 @ iterative_pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        first_row = torch.softmax(q[:, :1] @ k.transpose(-1, -2), dim=-1)[:, 0]
        return self.out(out.transpose(0, 1).reshape(1, n, dim)), first_row


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention layer."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, pinv_iterations, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, first_row = self.attn(self.norm(x))
        return x + out, first_row


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(1, x.shape[-1], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """fc, class token, TransLayer, PPEG, further TransLayers, LayerNorm, head on the class token.

    Each bag is processed alone with its padded instances dropped (so padding cannot change
    its output); its tokens are then squared up by repeating its first instances.
    attention: [B, N] exact softmax attention of the class token over the bag's instances in
    the last layer (head-averaged, renormalised over the real instances).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        heads: int = 8,
        layers: int = 2,
        landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"TransMIL needs at least one layer, got {layers}")
        self.in_dim = in_dim
        landmarks = landmarks or hidden_dim // 2
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(
            TransLayer(hidden_dim, heads, landmarks, pinv_iterations, dropout) for _ in range(layers)
        )
        self.ppeg = PPEG(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        mask = resolve_mask(features, mask, self.in_dim)
        embeddings, attention = [], features.new_zeros(mask.shape)
        for b in range(features.shape[0]):
            index = mask[b].nonzero().squeeze(1)
            emb, attn = self._bag(features[b, index].unsqueeze(0))
            embeddings.append(emb)
            attention[b, index] = attn
        embedding = torch.cat(embeddings)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention)

    def _bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag [1, n, D] -> (class-token embedding [1, H], attention over its n instances [n])."""
        n = x.shape[1]
        h = self.fc(x)
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % n]], dim=1)
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, first_row = self.layers[0](h)
        h = self.ppeg(h, side)
        for layer in self.layers[1:]:
            h, first_row = layer(h)
        attn = first_row[:, 1 : n + 1].mean(dim=0)
        return self.norm(h)[:, 0], attn / attn.sum()
