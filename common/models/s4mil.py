"""S4MIL (Fillioux et al. 2023): diagonal structured state-space (S4D) layers over the instance sequence."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import (
    AttentionPool,
    InstanceEncoder,
    gather_rows,
    init_linear,
    masked_max,
    masked_mean,
    prepare_bags,
    real_first_order,
    scatter_rows,
)


class S4D(nn.Module):
    """S4D layer (Gu et al. 2022): per-channel diagonal complex SSM, S4D-Lin init, ZOH, causal FFT convolution."""

    def __init__(self, dim: int, state_dim: int = 32, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        if state_dim % 2:
            raise ValueError(f"S4D state_dim must be even (complex conjugate pairs), got {state_dim}")
        modes = state_dim // 2
        log_dt = torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_a_real = nn.Parameter(torch.log(0.5 * torch.ones(dim, modes)))
        self.a_imag = nn.Parameter(math.pi * torch.arange(modes).float().repeat(dim, 1))
        self.c = nn.Parameter(torch.randn(dim, modes, 2) * 0.5**0.5)
        self.d = nn.Parameter(torch.randn(dim))

    def kernel(self, length: int) -> torch.Tensor:
        """Convolution kernel K_l = 2 Re(sum_m C_m z_m^l) [dim, length], z = exp(dt A).

        z^(kP+j) = z^(kP) z^j with P ~ sqrt(length), so the sum over modes is one small batched
        matmul and no [dim, modes, length] tensor is built.
        """
        dt = self.log_dt.exp().unsqueeze(-1)  # [H, 1]
        a = torch.complex(-self.log_a_real.exp(), self.a_imag)  # [H, M]
        dta = a * dt
        c = torch.view_as_complex(self.c.contiguous()) * (torch.exp(dta) - 1.0) / a  # ZOH
        step = max(1, math.isqrt(length - 1) + 1)
        blocks = -(-length // step)
        low = torch.exp(dta.unsqueeze(-1) * torch.arange(step, device=a.device, dtype=dt.dtype))  # [H, M, P]
        high = torch.exp(dta.unsqueeze(-1) * (torch.arange(blocks, device=a.device, dtype=dt.dtype) * step))
        k = torch.einsum("hmj,hmk->hkj", c.unsqueeze(-1) * low, high).reshape(a.shape[0], blocks * step)
        return 2 * k[:, :length].real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, H] -> y [B, L, H]; y_t depends on u_0..u_t only."""
        length = u.shape[1]
        n_fft = 2 * length
        k_f = torch.fft.rfft(self.kernel(length), n=n_fft)  # [H, F]
        u_f = torch.fft.rfft(u.transpose(1, 2), n=n_fft)  # [B, H, F]
        y = torch.fft.irfft(u_f * k_f, n=n_fft)[..., :length].transpose(1, 2)
        return y + u * self.d


class S4Block(nn.Module):
    """Pre-norm residual block: LayerNorm, S4D, GELU, dropout, Linear."""

    def __init__(self, dim: int, state_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.s4 = S4D(dim, state_dim)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.s4(self.norm(x)))


class S4MIL(MILModel):
    """Instance MLP, S4D blocks over the bag's instance sequence, masked mean / max / attention pooling.

    Padded instances are moved behind each bag's real ones (order kept) and zeroed; the
    SSM is causal, so they cannot reach the real ones. attention: [B, N] for 'attention'
    pooling, else None.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        state_dim: int = 32,
        layers: int = 1,
        pooling: Literal["attention", "mean", "max"] = "attention",
        attention_dim: int = 128,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        if pooling not in ("attention", "mean", "max"):
            raise ValueError(f"pooling must be 'attention', 'mean' or 'max', got {pooling!r}")
        self.in_dim, self.pooling = in_dim, pooling
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.blocks = nn.ModuleList(S4Block(hidden_dim, state_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.pool = AttentionPool(hidden_dim, attention_dim, gated=True) if pooling == "attention" else None
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        order = real_first_order(mask)
        mask_sorted = torch.gather(mask, 1, order)
        keep = mask_sorted.unsqueeze(-1).to(features.dtype)
        h = self.encoder(gather_rows(features, order)) * keep
        for block in self.blocks:
            h = block(h) * keep
        h = self.norm(h)
        attention = None
        if self.pool is not None:
            embedding, attn_sorted = self.pool(h, mask_sorted)
            attention = scatter_rows(attn_sorted, order)
        elif self.pooling == "mean":
            embedding = masked_mean(h, mask_sorted)
        else:
            embedding = masked_max(h, mask_sorted)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention)
