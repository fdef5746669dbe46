"""HetLoRA's sparsity-weighted aggregation (Cho et al., EMNLP 2024; docs/algorithm.md §2.3).

p_k = w_k / Σ_j w_j with w_k = ‖ΔW_k‖_F, ‖ΔW_k‖_F² = Σ_ℓ ‖B_{k,ℓ} A_{k,ℓ}‖_F² (one
weight per client; ``per_layer=True`` weighs each module separately). The factors
are zero-padded to r_max and averaged. With every w_k = 0 (first round, B = 0) the
weights fall back to data size. Under ``norm_bound`` the weights are capped at
bound × their median (hetlora.core.robust).
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate, product_norm_sq, update_norm
from ..core.robust import cap_weights, require_finite_norms
from .base import AggregationContext, AggregationMethod, data_weights, normalise, per_module_factors, weighted_padded_sum


def sparsity_weights(updates: Sequence[ClientUpdate], norm_bound: float | None = None) -> list[float]:
    """p_k ∝ ‖ΔW_k‖_F, falling back to q_k when every norm is zero."""
    norms = [update_norm(u.adapter) for u in updates]
    require_finite_norms(updates, norms, "‖ΔW‖")
    if norm_bound is not None:
        norms = cap_weights(norms, norm_bound)
    if sum(norms) <= 0.0:
        return data_weights(updates)
    return normalise(norms)


def per_layer_sparsity_weights(
    updates: Sequence[ClientUpdate], norm_bound: float | None = None
) -> dict[str, list[float]]:
    """p_{k,ℓ} ∝ ‖B_{k,ℓ} A_{k,ℓ}‖_F for each module ℓ separately."""
    fallback = data_weights(updates)
    out = {}
    for module, factors in per_module_factors(updates).items():
        norms = [float(product_norm_sq(b, a).sqrt()) for b, a in factors]
        require_finite_norms(updates, norms, f"‖ΔW‖ of {module}")
        if norm_bound is not None:
            norms = cap_weights(norms, norm_bound)
        out[module] = normalise(norms) if sum(norms) > 0.0 else fallback
    return out


class HetLoRA(AggregationMethod):
    name = "hetlora"
    prunes = True
    options = ("per_layer",)
    secure_weight = "update_norm"
    stream_weight = "update_norm"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        per_layer = ctx.options.get("per_layer", False)
        weigh = per_layer_sparsity_weights if per_layer else sparsity_weights
        return weighted_padded_sum(updates, ctx.r_max, weigh(updates, ctx.norm_bound))
