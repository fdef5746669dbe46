"""``rbla``: rank-based LoRA aggregation — each rank slice averaged over its owners only.

Slice i (column i of B, row i of A) is averaged with weights q_k renormalised over
the clients with r_k > i, so high-rank slices are not diluted by the zeros that
zero-padding gives low-rank clients. A slice no client trained keeps its previous
global value (zero without one).
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, slice_average


class RBLA(AggregationMethod):
    name = "rbla"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return slice_average(updates, ctx.r_max, data_weights(updates), ctx.previous)
