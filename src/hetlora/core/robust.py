"""Norm-inflation defence for norm-weighted aggregation (reliability issue).

Sparsity weights w_k = ‖B_k A_k‖_F reward a client that inflates its update, and a
client can also scale B up and A down without changing the product. With bound x,
each client's ‖B‖, ‖A‖ and ‖BA‖ — each divided by √rank so ranks compare — are
checked against x times the round's median, and its aggregation weight is capped at
x times the median weight. A median is robust while fewer than half the clients lie.

**[decision]** A norm beyond x × median marks an outlier, and an outlier is scaled
to the median itself, not to x × median: clipping to the bound would still let one
inflated client push its update (x − 1) = 50 % further than an honest one, which
moved the global ΔW more than dropping an honest client did in our tests. Honest
clients inside the bound are untouched, so the result barely changes without attack.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Sequence

from .adapter import ClientUpdate, adapter_rank, factor_norms, scale_adapter, update_norm


def _clip_factor(value: float, reference: float, bound: float) -> float:
    """1 if ``value`` ≤ bound · reference, else the multiplier that brings it to ``reference``."""
    if reference <= 0.0 or value <= bound * reference:
        return 1.0
    return reference / value


def bound_updates(updates: Sequence[ClientUpdate], bound: float) -> list[ClientUpdate]:
    """Scale every client's B, A and B·A norms (per √rank) beyond ``bound`` × the round median to the median."""
    if bound <= 0:
        raise ValueError(f"norm_bound must be positive, got {bound}")
    roots = [math.sqrt(adapter_rank(u.adapter)) for u in updates]
    norms = [factor_norms(u.adapter) for u in updates]
    med_b = statistics.median(nb / s for (nb, _), s in zip(norms, roots))
    med_a = statistics.median(na / s for (_, na), s in zip(norms, roots))
    clipped = [
        scale_adapter(
            u.adapter,
            b_scale=_clip_factor(nb / s, med_b, bound),
            a_scale=_clip_factor(na / s, med_a, bound),
        )
        for u, (nb, na), s in zip(updates, norms, roots)
    ]
    products = [update_norm(a) / s for a, s in zip(clipped, roots)]
    med_p = statistics.median(products)
    return [
        replace(u, adapter=scale_adapter(a, b_scale=_clip_factor(p, med_p, bound)))
        for u, a, p in zip(updates, clipped, products)
    ]


def cap_weights(weights: Sequence[float], bound: float) -> list[float]:
    """w_k ← min(w_k, bound · median(w)): no client outweighs the typical one by more than ×bound."""
    med = statistics.median(weights)
    if med <= 0:
        return list(weights)
    return [min(w, bound * med) for w in weights]
