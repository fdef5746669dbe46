"""``florist``: the weighted sum's SVD, cut at an energy threshold, folded into the base (FLoRIST, Ramesh & Dass,
MLSys 2026, arXiv 2506.09199; docs/algorithm.md "florist").

ΔW_ℓ = Σ_k q_k B_k A_k (q_k = n_k / Σ n) is FLoRA's exact stacked sum. Its thin SVD U Σ Vᵀ is taken from the stacked
factors (thin QRs and the R × R core, never the out × in matrix, for a small stacked rank R; else the smaller Gram
matrix: :func:`hetlora.methods.recon_svd.top_svd`). Each module keeps the fewest components k whose energy
Σ_{i≤k} σ_i² reaches ``energy`` × Σ σ_i² (the paper's singular value threshold τ), so its rank is chosen per module
and per round. B^g = U_k Σ_k, A^g = V_kᵀ (the authors' split), and, as in FLoRA, the whole of B^g A^g goes into the
frozen weights: every client starts a fresh LoRA of its own rank next round, so heterogeneous ranks need no padding
and the download is the cut update, not FLoRA's stack of rank Σ r_k.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors
from .recon_svd import top_svd

DEFAULT_ENERGY = 0.9  # τ: the paper tunes it per task (FLoRIST-O / -E); the run config's default (--florist-energy)


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """The fewest leading components whose Σ σ_i² reaches ``energy`` × Σ σ_i² (1 when the sum is 0: one zero component)."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total <= 0.0:
        return 1
    reached = torch.cumsum(squares, 0) >= energy * total * (1 - 1e-12)  # a threshold of 1 keeps every nonzero component
    return int(reached.nonzero()[0, 0]) + 1


def thresholded_factors(b: Tensor, a: Tensor, energy: float) -> tuple[Tensor, Tensor]:
    """(U_k Σ_k, V_kᵀ) of B A in float64, k = :func:`energy_rank` of its singular values."""
    full = min(b.shape[1], b.shape[0], a.shape[1])
    u, s, vh = top_svd(b.double(), a.double(), full)
    k = energy_rank(s, energy)
    return u[:, :k] * s[:k], vh[:k]


class FLoRIST(AggregationMethod):
    name = "florist"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2
    client_kind = "flora"  # a fresh LoRA each round over the folded base (hetlora.clients.flora)
    folds_into_base = True
    options = ("energy",)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        energy = float(ctx.options.get("energy", DEFAULT_ENERGY))
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"florist's energy threshold must be in (0, 1], got {energy}")
        q = data_weights(updates)
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            dtype = torch.promote_types(factors[0][0].dtype, torch.float32)
            stacked_b = torch.cat([b.double() for b, _ in factors], dim=1)
            stacked_a = torch.cat([w * a.double() for w, (_, a) in zip(q, factors)], dim=0)
            b_g, a_g = thresholded_factors(stacked_b, stacked_a, energy)
            out[module + B_SUFFIX], out[module + A_SUFFIX] = b_g.to(dtype), a_g.to(dtype)
        return out

    def base_update(self, updates: Sequence[ClientUpdate], aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """The whole cut update goes into the frozen weights; clients start fresh LoRAs (as FLoRA)."""
        return aggregated
