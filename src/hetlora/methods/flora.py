"""``flora``: stacking aggregation (FLoRA, Wang et al., NeurIPS 2024).

A^g = [q_1 A_1; …; q_K A_K] and B^g = [B_1, …, B_K], so B^g A^g = Σ_k q_k B_k A_k
exactly, whatever the ranks. The stacked rank is Σ r_k (download grows with K);
clients fold s·B^g A^g into their frozen weights and start a fresh LoRA each round.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors


class FLoRA(AggregationMethod):
    name = "flora"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2
    client_kind = "flora"
    folds_into_base = True

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        q = data_weights(updates)
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            out[module + B_SUFFIX] = torch.cat([b for b, _ in factors], dim=1)
            out[module + A_SUFFIX] = torch.cat([w * a for w, (_, a) in zip(q, factors)], dim=0)
        return out

    def base_update(self, updates: Sequence[ClientUpdate], aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """The whole stacked update goes into the frozen weights; clients start fresh LoRAs."""
        return aggregated
