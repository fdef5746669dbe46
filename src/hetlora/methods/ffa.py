"""``ffa``: FFA-LoRA (Sun et al., ICLR 2024) — A frozen and shared, only B trained.

A is drawn once from a seed at rank r_max and never changes; client k trains B with
A[:r_k]. Then B^g = Σ q_k pad(B_k) gives B^g A = Σ q_k B_k A[:r_k] exactly, even under
mixed ranks. A^g is the previous global A (or, without one, the clients' shared rows).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors, weighted_padded_sum


def _shared_a(factors: list[tuple[torch.Tensor, torch.Tensor]], r_max: int, module: str) -> torch.Tensor:
    """Rebuild the frozen A from the clients' rows; every row must be covered."""
    deepest = max((a for _, a in factors), key=lambda a: a.shape[0])
    if deepest.shape[0] < r_max:
        raise ValueError(
            f"ffa: {module}: no client covers rows {deepest.shape[0]}..{r_max - 1} of the frozen A; "
            "pass previous=<global adapter>"
        )
    return deepest.clone()


class FFALoRA(AggregationMethod):
    name = "ffa"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2
    client_kind = "ffa"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        out = weighted_padded_sum(updates, ctx.r_max, data_weights(updates))
        for module, factors in per_module_factors(updates).items():
            key = module + A_SUFFIX
            out[key] = ctx.previous[key].clone() if ctx.previous is not None else _shared_a(factors, ctx.r_max, module)
        return out
