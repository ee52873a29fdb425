"""Classifier heads: linear, and the Chebyshev Kolmogorov-Arnold (CKA) head of AHDMIL."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HeadName = Literal["linear", "cka"]


class CKAHead(nn.Module):
    """Chebyshev-polynomial Kolmogorov-Arnold layer: y_o = b_o + sum_i sum_k c[i,o,k] T_k(tanh(norm(x)_i)).

    Each input-output pair has its own learnable univariate function, a Chebyshev series of
    degree `degree` on the tanh-squashed (layer-normalised) input.
    """

    def __init__(self, in_dim: int, out_dim: int, degree: int = 4, normalize: bool = True) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"CKA degree must be >= 1, got {degree}")
        self.in_dim, self.out_dim, self.degree = in_dim, out_dim, degree
        self.norm: nn.Module = nn.LayerNorm(in_dim) if normalize else nn.Identity()
        self.coeffs = nn.Parameter(torch.empty(in_dim, out_dim, degree + 1))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.coeffs, mean=0.0, std=(in_dim * (degree + 1)) ** -0.5)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """Chebyshev polynomials T_0..T_K of tanh(norm(x)): [B, in] -> [B, in, K+1]."""
        t = torch.tanh(self.norm(x))
        polys = [torch.ones_like(t), t]
        for _ in range(2, self.degree + 1):
            polys.append(2 * t * polys[-1] - polys[-2])
        return torch.stack(polys, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bik,iok->bo", self.basis(x), self.coeffs) + self.bias


def make_head(head: HeadName, in_dim: int, num_classes: int, cka_degree: int = 4) -> nn.Module:
    """The classifier head named `head` mapping a slide embedding [B, in_dim] to logits [B, num_classes]."""
    if head == "linear":
        layer = nn.Linear(in_dim, num_classes)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer
    if head == "cka":
        return CKAHead(in_dim, num_classes, cka_degree)
    raise ValueError(f"unknown head {head!r}; choose 'linear' or 'cka'")
