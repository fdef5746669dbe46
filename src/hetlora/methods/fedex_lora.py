"""``fedex-lora``: FedEx-LoRA, exact aggregation (Singhal et al., ACL 2025; docs/algorithm.md, "fedex-lora").

The clients' factors are averaged, B̄ = Σ w_k B_k, Ā = Σ w_k A_k, and the error that
averaging factors makes, R = Σ w_k B_k A_k − B̄ Ā, is folded into the frozen base weights
(W0 ← W0 + s·R), so the global model W0 + s·B̄Ā equals W0 + s·Σ w_k B_k A_k exactly.
Clients start the next round from (B̄, Ā) — truncated to their rank — on the updated W0.

R travels as exact low-rank factors, R = [B_1 … B_K, B̄] · [w_1 A_1; …; w_K A_K; −Ā]
(rank Σ r_k + r), folded into the cumulative base delta (hetlora.core.base_delta), which
is sent to every client with its adapter.

**Where we differ from the authors' code** (RaghavSinghal10/fedex-lora, ``fed_agg.py``,
``aggregate_models_ours``): they weigh clients uniformly (w_k = 1/K) — we do too; they
require one rank for all — we extend to mixed ranks by zero-padding (products are
unchanged by the padding, so the fold stays exact); they add Rᵀ to every base weight,
which is right for GPT-2's Conv1D but transposes R for ``nn.Linear`` — we add R in the
``nn.Linear`` orientation (out × in); they compute R densely — we keep it factored while
that is smaller.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, per_module_factors, weighted_padded_sum


class FedExLoRA(AggregationMethod):
    name = "fedex-lora"
    folds_into_base = True
    stream_weight = "uniform"  # w_k = 1/K: folded with weight 1, divided by the count at the end
    stream_residual = True  # R from Σ B_k A_k kept as it streams (stacked factors, then one dense matrix per module)

    @staticmethod
    def weights(updates: Sequence[ClientUpdate]) -> list[float]:
        return [1.0 / len(updates)] * len(updates)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return weighted_padded_sum(updates, ctx.r_max, self.weights(updates))

    def base_update(self, updates: Sequence[ClientUpdate], aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """R = Σ w_k B_k A_k − B̄ Ā as factors [B_1 … B_K, B̄] [w_1 A_1; …; w_K A_K; −Ā]."""
        w = self.weights(updates)
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            b_bar, a_bar = aggregated[module + B_SUFFIX], aggregated[module + A_SUFFIX]
            out[module + B_SUFFIX] = torch.cat([b.float() for b, _ in factors] + [b_bar], dim=1)
            out[module + A_SUFFIX] = torch.cat([wk * a.float() for wk, (_, a) in zip(w, factors)] + [-a_bar], dim=0)
        return out
