"""MambaMIL (Yang et al. 2024): selective state-space (Mamba) layers over the instance sequence, pure PyTorch.

Each layer runs a Mamba mixer on the sequence and, with sequence reordering (SR, rate R),
a second selective scan on the sequence read with stride R (instances 0, R, 2R, ..., 1,
R+1, ...), whose outputs are averaged before the gate. The selective scan
h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t runs as a sequential scan
over chunks with a hand-written adjoint (backward) scan, so memory stays O(L E) and CPU time
is a few fused operations per instance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import (
    AttentionPool,
    InstanceEncoder,
    gather_rows,
    init_linear,
    prepare_bags,
    real_first_order,
    scatter_rows,
)


def _chunk_states(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """States h_1..h_T [B, T, E, S] of one chunk from h_0 = h, and the decays exp(dt_t A) [B, T, E, S]."""
    decay = torch.exp(dt.unsqueeze(-1) * a)
    states = (dt * x).unsqueeze(-1) * b.unsqueeze(2)  # the inputs u_t, overwritten by the states
    for t in range(states.shape[1]):
        h = torch.addcmul(states[:, t], decay[:, t], h)
        states[:, t] = h
    return states, decay


class _SelectiveScan(torch.autograd.Function):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t . h_t: a sequential scan chunk by chunk.

    The time loop only does one fused multiply-add per step on [B, E, S]; everything else is
    vectorised over the chunk. Only the state at each chunk start is kept for backward, which
    recomputes a chunk's states and runs the adjoint scan backwards in time.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        dt: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        bsz, length, inner = x.shape
        h = x.new_zeros(bsz, inner, a.shape[1])
        starts, ys = [], []
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            starts.append(h)
            states, _ = _chunk_states(x[:, part], dt[:, part], a, b[:, part], h)
            ys.append(torch.einsum("btes,bts->bte", states, c[:, part]))
            h = states[:, -1].clone()
        ctx.save_for_backward(x, dt, a, b, c, torch.stack(starts))
        ctx.chunk = chunk  # type: ignore[attr-defined]  # FunctionCtx takes attributes at run time
        return torch.cat(ys, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor):
        x, dt, a, b, c, starts = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk = ctx.chunk  # type: ignore[attr-defined]
        grad_x, grad_dt = torch.zeros_like(x), torch.zeros_like(dt)
        grad_b, grad_c, grad_a = torch.zeros_like(b), torch.zeros_like(c), torch.zeros_like(a)
        carry = torch.zeros_like(starts[0])  # dL/dh_t arriving from step t+1
        for index in reversed(range(starts.shape[0])):
            part = slice(index * chunk, (index + 1) * chunk)
            xs, dts, bs, cs, gy = x[:, part], dt[:, part], b[:, part], c[:, part], grad_y[:, part]
            states, decay = _chunk_states(xs, dts, a, bs, starts[index])
            grad_c[:, part] = torch.einsum("bte,btes->bts", gy, states)
            grad_h = gy.unsqueeze(-1) * cs.unsqueeze(2)  # direct part, completed below in place
            for t in reversed(range(grad_h.shape[1])):
                carry = grad_h[:, t].add_(carry)
                carry = carry * decay[:, t]
            previous = torch.cat([starts[index].unsqueeze(1), states[:, :-1]], dim=1)  # h_{t-1}
            grad_exponent = grad_h * previous * decay  # dL/d(dt_t A)
            dtx = dts * xs
            grad_dtx = torch.einsum("btes,bts->bte", grad_h, bs)
            grad_b[:, part] = torch.einsum("btes,bte->bts", grad_h, dtx)
            grad_x[:, part] = grad_dtx * dts
            grad_dt[:, part] = grad_dtx * xs + torch.einsum("btes,es->bte", grad_exponent, a)
            grad_a += torch.einsum("btes,bte->es", grad_exponent, dts)
        return grad_x, grad_dt, grad_a, grad_b, grad_c, None


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    chunk: int = 64,
) -> torch.Tensor:
    """Selective scan: x, dt [B, L, E]; a [E, S] (negative); b, c [B, L, S]; d [E] -> y [B, L, E].

    Memory O(L E + (L / chunk + chunk) E S) in forward and backward: no [L, E, S] tensor is kept.
    """
    return _SelectiveScan.apply(x, dt, a, b, c, chunk) + x * d


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
    """Mamba block: in-projection to (x, z), selective SSM on x (plus SR branch), SiLU(z) gate, out-projection."""

    def __init__(
        self, dim: int, state_dim: int = 16, expand: int = 2, conv_kernel: int = 4, sr_rate: int = 10, chunk: int = 64
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
    causal, so they cannot reach the real ones. attention: [B, N]. Long bags are
    checkpointed layer by layer while gradients are recorded.
    """

    attention_pooling = True

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
        chunk: int = 64,
        attention_dim: int = 128,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.checkpoint_above = 2**22  # checkpoint layers of bags with more activations than this
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
        for i in range(len(self.mixers)):
            if torch.is_grad_enabled() and h.numel() > self.checkpoint_above:
                h = checkpoint(self._layer, i, h, counts, use_reentrant=False)  # keep one layer's activations
            else:
                h = self._layer(i, h, counts)
        embedding, attn_sorted = self.pool(self.norm(h), mask_sorted)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=scatter_rows(attn_sorted, order))

    def _layer(self, i: int, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Residual Mamba layer i."""
        return h + self.mixers[i](self.norms[i](h), counts)
