"""``rbla``: rank-based LoRA aggregation — each rank slice averaged over its owners only.

Slice i (column i of B, row i of A) is averaged with weights q_k renormalised over
the clients with r_k > i, so high-rank slices are not diluted by the zeros that
zero-padding gives low-rank clients. A slice no client trained keeps its previous
global value (zero without one).
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors, slice_average


class RBLA(AggregationMethod):
    name = "rbla"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        q = data_weights(updates)
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            out[module + B_SUFFIX], out[module + A_SUFFIX] = slice_average(factors, q, ctx.r_max, ctx.previous_factors(module))
        return out
