"""``fed-plora``: Fed-PLoRA's Select-N-Fold (Zhang, Hu & Xu, ICLR 2026, arXiv 2602.16936; docs/algorithm.md
"fed-plora").

The server keeps R = r_max rank-1 modules per layer. Client k trains the r_k modules K_k it selected (uniformly,
from (seed, round, client): :func:`hetlora.core.sketch.selected_modules`, re-derived here) with the others folded
into its frozen weights. Module j of the new global adapter is the average of B_{k,j} and A_{k,j} over the clients
that trained it, weighted by n_k; a module no client trained keeps its value:

    B_j ← Σ_{k: j∈K_k} n_k B_{k,j} / Σ_{k: j∈K_k} n_k     (A_j likewise)

**Read from** the paper's abstract and secondary accounts of its §3 (its PDF and its code,
TNI-playground/Fed-PLoRA, could not be read here). **[decision]**s where those leave it open: the weights are n_k
(FedAvg's; the paper's noise bound has 1/|Q_j|, the uniform mean), the fold uses the run's LoRA scaling s (so the
client's model at the start is exactly the global model), and an untrained module keeps its previous value.
"""

from __future__ import annotations

from typing import Sequence

from ..core.accumulate import PaddedSum
from ..core.adapter import Adapter, ClientUpdate, adapter_rank
from ..core.sketch import selected_modules
from ..core.validation import InvalidUpdate
from .base import AggregationContext, AggregationMethod


class FedPLoRA(AggregationMethod):
    name = "fed-plora"
    client_kind = "plora"
    needs_round = True
    client_folds = True
    module_separable = True  # per-module rule, per-client weights and selections: docs/algorithm.md §7.2

    @staticmethod
    def selection(u: ClientUpdate, ctx: AggregationContext) -> list[int]:
        """K_k of the update's client, re-derived from the rank the server sent it: an update of another size would
        be read against the wrong modules, so it is refused."""
        rank = adapter_rank(u.adapter)
        sent = ctx.ranks.get(str(u.client_id)) if ctx.ranks is not None else None
        if sent is not None and sent != rank:
            raise InvalidUpdate(u.client_id, f"sent {rank} trained modules, but was asked to train {sent}")
        return selected_modules(ctx.seed, ctx.round_index, str(u.client_id), sent or rank, ctx.r_max)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        acc = PaddedSum(ctx.r_max)
        for u in updates:
            acc.add(u.adapter, float(u.num_examples), indices=self.selection(u, ctx))
        return acc.slice_average(ctx.previous)
