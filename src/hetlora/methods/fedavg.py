"""``fedavg`` — HomLoRA / FedIT: one rank r for all, B^g = Σ q_k B_k, A^g = Σ q_k A_k."""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate, adapter_rank
from .base import AggregationContext, AggregationMethod, data_weights, weighted_padded_sum


class FedAvg(AggregationMethod):
    name = "fedavg"
    uniform_rank = True
    secure_weight = "examples"
    stream_weight = "examples"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        ranks = sorted({adapter_rank(u.adapter) for u in updates})
        if len(ranks) > 1:
            raise ValueError(
                f"fedavg (HomLoRA) needs every client at one rank, got ranks {ranks}; "
                "use hetlora, hetlora-naive, rbla or recon-svd for mixed ranks"
            )
        return weighted_padded_sum(updates, ctx.r_max, data_weights(updates))
