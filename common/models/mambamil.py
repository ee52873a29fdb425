"""MambaMIL (Yang et al. 2024): selective state-space (Mamba) layers over the instance sequence, pure PyTorch.

Each layer runs a Mamba mixer on the sequence and, with sequence reordering (SR, rate R),
a second selective scan on the sequence read with stride R (instances 0, R, 2R, ..., 1,
R+1, ...), whose outputs are averaged before the gate. The selective scan
h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t is computed chunk by chunk:
inside a chunk in parallel with cumulative sums of log decays (falling back to a
logcumsumexp form where the decay range could overflow), across chunks sequentially; in training the chunks are checkpointed so memory stays small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.models.base import MILModel, MILOutput
from common.models.heads import HeadName, make_head
from common.models.layers import (
    AttentionPool,
    InstanceEncoder,
    gather_rows,
    init_linear,
    prepare_bags,
    real_first_order,
    scatter_rows,
)

_TINY = 1e-30
_MAX_LOG_RANGE = 60.0  # exp(60) ~ 1e26: the plain cumulative-sum path cannot overflow below this


def _scan_chunk(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the selective scan in parallel; returns (C_t h_t [B, T, E], last state [B, E, S]).

    h_t = exp(L_t) (h0 + sum_{s<=t} exp(-L_s) u_s) with L_t the cumulative log decay. When the
    decay inside the chunk spans more than exp(60) the sums run in log space (logcumsumexp,
    u split by sign) instead, which cannot overflow.
    """
    cum_dt = torch.cumsum(dt, dim=1)  # [B, T, E]; A is time-invariant, so L_t = cum_dt_t * A
    u = (dt * x).unsqueeze(-1) * b.unsqueeze(2)  # [B, T, E, S]
    if float((cum_dt[:, -1].amax(dim=0).unsqueeze(-1) * -a).max().detach()) <= _MAX_LOG_RANGE:
        growth = torch.exp(cum_dt.unsqueeze(-1) * -a)  # exp(-L_t) >= 1
        steps = x.shape[1]
        tril = torch.ones(steps, steps, dtype=x.dtype, device=x.device).tril()
        sums = torch.matmul(tril, (growth * u).flatten(2)).view_as(u)  # cumulative sum over t, as one matmul
        h = (h0.unsqueeze(1) + sums) * torch.exp(cum_dt.unsqueeze(-1) * a)
    else:
        log_decay = cum_dt.unsqueeze(-1) * a
        pos = torch.logcumsumexp(torch.log(u.clamp_min(_TINY)) - log_decay, dim=1)
        neg = torch.logcumsumexp(torch.log((-u).clamp_min(_TINY)) - log_decay, dim=1)
        h = torch.exp(log_decay) * h0.unsqueeze(1) + torch.exp(log_decay + pos) - torch.exp(log_decay + neg)
    return torch.einsum("btes,bts->bte", h, c), h[:, -1]


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    chunk: int = 32,
    checkpoint_chunks: bool | None = None,
) -> torch.Tensor:
    """Selective scan: x, dt [B, L, E]; a [E, S] (negative); b, c [B, L, S]; d [E] -> y [B, L, E].

    checkpoint_chunks None: checkpoint the chunks when gradients are recorded and the full
    state tensor [B, L, E, S] would exceed 2^24 elements.
    """
    bsz, length, inner = x.shape
    if checkpoint_chunks is None:
        checkpoint_chunks = torch.is_grad_enabled() and bsz * length * inner * a.shape[1] > 2**24
    h = x.new_zeros(bsz, inner, a.shape[1])
    ys = []
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        args = (x[:, part], dt[:, part], a, b[:, part], c[:, part], h)
        if checkpoint_chunks:
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys, dim=1) + x * d


def reference_scan(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """Step-by-step selective scan (slow; the ground truth for tests)."""
    h = x.new_zeros(x.shape[0], x.shape[2], a.shape[1])
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * x[:, t]).unsqueeze(-1) * b[:, t, None, :]
        ys.append((h * c[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + x * d


class SelectiveSSM(nn.Module):
    """Causal depthwise conv + SiLU, then a selective scan with input-dependent dt, B, C."""

    def __init__(self, inner: int, state_dim: int, conv_kernel: int, dt_rank: int, chunk: int) -> None:
        super().__init__()
        self.state_dim, self.dt_rank, self.chunk = state_dim, dt_rank, chunk
        self.conv = nn.Conv1d(inner, inner, conv_kernel, groups=inner, padding=conv_kernel - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state_dim, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state_dim + 1).float()).repeat(inner, 1))
        self.d = nn.Parameter(torch.ones(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, inner] -> [B, L, inner]; position t sees positions <= t only."""
        length = x.shape[1]
        x = F.silu(self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.state_dim, self.state_dim], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        return selective_scan(x, dt, -torch.exp(self.a_log), b, c, self.d, self.chunk)


def stride_order(counts: torch.Tensor, length: int, rate: int) -> torch.Tensor:
    """Per bag, the permutation [B, L] reading its first counts[b] positions with stride `rate`; the rest stay last."""
    i = torch.arange(length, device=counts.device).expand(counts.shape[0], length)
    key = torch.where(i < counts.unsqueeze(1), (i % rate) * length + i // rate, rate * length + i)
    return torch.argsort(key, dim=1)


class MambaMixer(nn.Module):
    """Mamba block: in-projection to (x, z), selective SSM on x (plus the SR branch), gate by SiLU(z), out-projection."""

    def __init__(
        self, dim: int, state_dim: int = 16, expand: int = 2, conv_kernel: int = 4, sr_rate: int = 10, chunk: int = 32
    ) -> None:
        super().__init__()
        inner, dt_rank = expand * dim, math.ceil(dim / 16)
        self.sr_rate = sr_rate
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.ssm = SelectiveSSM(inner, state_dim, conv_kernel, dt_rank, chunk)
        self.ssm_sr = SelectiveSSM(inner, state_dim, conv_kernel, dt_rank, chunk) if sr_rate > 1 else None
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] with each bag's counts[b] real instances first."""
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.ssm(x_in)
        if self.ssm_sr is not None:
            order = stride_order(counts, x.shape[1], self.sr_rate)
            y_sr = scatter_rows(self.ssm_sr(gather_rows(x_in, order)), order)
            y = 0.5 * (y + y_sr)
        return self.out_proj(y * F.silu(z))


class MambaMIL(MILModel):
    """Instance MLP, pre-norm residual Mamba (SR) layers, LayerNorm, attention pooling, head.

    Padded instances are moved behind each bag's real ones (order kept); every scan is
    causal, so they cannot reach the real ones. attention: [B, N].
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        layers: int = 2,
        state_dim: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        sr_rate: int = 10,
        chunk: int = 32,
        attention_dim: int = 128,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.mixers = nn.ModuleList(
            MambaMixer(hidden_dim, state_dim, expand, conv_kernel, sr_rate, chunk) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.pool = AttentionPool(hidden_dim, attention_dim, gated=False)
        init_linear(self.encoder)
        init_linear(self.pool)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        order = real_first_order(mask)
        mask_sorted = torch.gather(mask, 1, order)
        counts = mask.sum(dim=1)
        h = self.encoder(gather_rows(features, order))
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h), counts)
        embedding, attn_sorted = self.pool(self.norm(h), mask_sorted)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=scatter_rows(attn_sorted, order))
