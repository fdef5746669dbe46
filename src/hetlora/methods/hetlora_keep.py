"""``hetlora-keep``: HetLoRA whose global adapter keeps its rank (docs/algorithm.md, "hetlora-keep").

Zero-padded averaging (``hetlora``) sets every component above the round's largest client
rank to zero in both factors, and a component whose A row and B column are both zero
never trains again: the global adapter's live rank can only fall. Here component j
(column j of B, row j of A) is averaged with the sparsity weights p_k ∝ ‖B_k A_k‖_F
renormalised over the clients that cover it (r_k > j), and a component no client of the
round covered keeps its previous global value, so no component dies for lack of a
high-rank client in one round. Clients prune as in HetLoRA.
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, slice_average
from .hetlora import per_layer_sparsity_weights, sparsity_weights


class HetLoRAKeep(AggregationMethod):
    name = "hetlora-keep"
    prunes = True
    options = ("per_layer",)
    stream_weight = "update_norm"  # p_k ∝ ‖ΔW_k‖: client k's alone, so a server folds each reply in as it arrives
    stream_finish = "slices"  # the slice average: each component over the clients that reached it (docs/algorithm.md §7.2)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        weigh = per_layer_sparsity_weights if ctx.options.get("per_layer", False) else sparsity_weights
        return slice_average(updates, ctx.r_max, weigh(updates, ctx.norm_bound), ctx.previous)
