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

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, per_module_factors
from .hetlora import per_layer_sparsity_weights, sparsity_weights


def slice_average(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], r_max: int,
                  previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with component j = Σ_{k: r_k > j} w_k (B_k, A_k)_j / Σ_{k: r_k > j} w_k; uncovered j keep ``previous``."""
    b0, a0 = factors[0]
    acc_b = torch.zeros(b0.shape[0], r_max, dtype=torch.float64)
    acc_a = torch.zeros(r_max, a0.shape[1], dtype=torch.float64)
    mass = torch.zeros(r_max, dtype=torch.float64)
    for w, (b, a) in zip(weights, factors):
        r = a.shape[0]
        acc_b[:, :r] += w * b.double()
        acc_a[:r] += w * a.double()
        mass[:r] += w
    covered = mass > 0
    acc_b[:, covered] /= mass[covered]
    acc_a[covered] /= mass[covered][:, None]
    if previous is not None:
        acc_b[:, ~covered] = previous[0][:, ~covered].double()
        acc_a[~covered] = previous[1][~covered].double()
    return acc_b.float(), acc_a.float()


class HetLoRAKeep(AggregationMethod):
    name = "hetlora-keep"
    prunes = True
    options = ("per_layer",)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        if ctx.options.get("per_layer", False):
            weights = per_layer_sparsity_weights(updates, ctx.norm_bound)
        else:
            shared = sparsity_weights(updates, ctx.norm_bound)
            weights = {m: shared for m in per_module_factors(updates)}
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            prev = (ctx.previous[module + B_SUFFIX], ctx.previous[module + A_SUFFIX]) if ctx.previous is not None else None
            out[module + B_SUFFIX], out[module + A_SUFFIX] = slice_average(factors, weights[module], ctx.r_max, prev)
        return out
