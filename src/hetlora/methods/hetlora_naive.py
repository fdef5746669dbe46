"""``hetlora-naive``: zero-pad + truncate with data-size weights q_k and no pruning.

What most follow-up papers ran as "HetLoRA": the high-rank slices are diluted by the
zeros of low-rank clients (docs/algorithm.md).
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, weighted_padded_sum


class HetLoRANaive(AggregationMethod):
    name = "hetlora-naive"
    secure_weight = "examples"
    stream_weight = "examples"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return weighted_padded_sum(updates, ctx.r_max, data_weights(updates))
