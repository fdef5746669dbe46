"""``recon-svd``: reconstruct ΔW = Σ_k q_k B_k A_k per layer, then SVD back to rank r_max.

B^g = U[:, :r_max] Σ[:r_max], A^g = Vᵀ[:r_max] (SPEC.md, Methods), so truncating the
global adapter hands each client the best rank-r_k approximation (Eckart–Young).

The SVD is taken of the low-rank product without forming the out × in matrix:
stack [q_1 B_1 … q_K B_K] = Q_B R_B and [A_1; …; A_K]ᵀ = Q_A R_A (thin QR), so
ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and only the small R × R core needs an SVD.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors


def low_rank_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vᵀ) of the product B A, computed from the factors."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def svd_factors(b: Tensor, a: Tensor, rank: int, split: str = "sigma-on-b") -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors (B', A') of B A, zero-padded if B A has lower rank.

    ``split`` puts the singular values on B ("sigma-on-b": B' = UΣ, A' = Vᵀ) or
    splits them evenly ("balanced": B' = U√Σ, A' = √Σ Vᵀ); B'A' is the same.
    """
    u, s, vh = low_rank_svd(b.double(), a.double())
    k = min(rank, s.shape[0])
    if split == "sigma-on-b":
        left, right = s[:k], torch.ones_like(s[:k])
    elif split == "balanced":
        left = right = s[:k].sqrt()
    else:
        raise ValueError(f"unknown singular-value split {split!r}; use sigma-on-b or balanced")
    b_out = b.new_zeros(b.shape[0], rank, dtype=torch.float64)
    a_out = a.new_zeros(rank, a.shape[1], dtype=torch.float64)
    b_out[:, :k] = u[:, :k] * left
    a_out[:k] = right[:, None] * vh[:k]
    return b_out, a_out


def svd_aggregate(updates: Sequence[ClientUpdate], r_max: int, split: str) -> Adapter:
    """ΔW_ℓ = Σ q_k B_k A_k, then its best rank-r_max factors, for every module ℓ."""
    q = data_weights(updates)
    out: Adapter = {}
    for module, factors in per_module_factors(updates).items():
        dtype = torch.promote_types(factors[0][0].dtype, torch.float32)
        stacked_b = torch.cat([w * b.double() for w, (b, _) in zip(q, factors)], dim=1)
        stacked_a = torch.cat([a.double() for _, a in factors], dim=0)
        b_g, a_g = svd_factors(stacked_b, stacked_a, r_max, split)
        out[module + B_SUFFIX] = b_g.to(dtype)
        out[module + A_SUFFIX] = a_g.to(dtype)
    return out


class ReconSVD(AggregationMethod):
    name = "recon-svd"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return svd_aggregate(updates, ctx.r_max, split="sigma-on-b")
