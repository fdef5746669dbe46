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
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from torch import Tensor

from .adapter import A_SUFFIX, ClientUpdate, adapter_rank, gram_norms, scale_adapter
from .validation import InvalidUpdate

# The lower median: with two clients it is the smaller value, so one inflated client of
# two cannot set the reference it is measured against (the mean of two would let 1e30 pass).
median = statistics.median_low


def require_finite_norms(updates: Sequence[ClientUpdate], norms: Sequence[float], what: str) -> None:
    """A norm that overflowed (finite factors, float64 included) drops its client: InvalidUpdate names it."""
    for u, n in zip(updates, norms):
        if not math.isfinite(n):
            raise InvalidUpdate(u.client_id, f"{what} is not finite ({n})")


def _clip_factor(value: float, reference: float, bound: float) -> float:
    """1 if ``value`` ≤ bound · reference, else the multiplier that brings it to ``reference``."""
    if reference <= 0.0 or value <= bound * reference:
        return 1.0
    return reference / value


@dataclass(frozen=True)
class UpdateNorms:
    """What the bound needs of one update, and all it keeps of it: ‖B‖_F, ‖A‖_F and ‖BA‖_F over all modules,
    its rank and its example count. A streaming server holds these for every client of a round (O(K) scalars)
    and the updates themselves only one at a time (docs/algorithm.md §7.2)."""

    client: str | None
    b: float
    a: float
    product: float
    rank: int
    examples: int

    @classmethod
    def of(cls, update: ClientUpdate) -> "UpdateNorms":
        nb, na, product = gram_norms(update.adapter)
        return cls(update.client_id, nb, na, product, adapter_rank(update.adapter), int(update.num_examples))


@dataclass(frozen=True)
class BoundScales:
    """What the bound does to one update: B × ``b``, A × ``a``, n capped to ``examples``; ``norm`` is the
    bounded update's ‖B A‖_F (its sparsity weight before any cap)."""

    b: float
    a: float
    examples: int
    norm: float


def bound_scales(norms: Sequence[UpdateNorms], bound: float) -> list[BoundScales]:
    """The bound from the round's norms alone (docs/algorithm.md §5): ‖B‖ and ‖A‖ per √rank beyond ``bound`` ×
    the round median are scaled to the median; then ‖BA‖ per √rank of the scaled updates (scaling B by β and A
    by α scales BA by βα, so no update is needed) likewise, through B; n is capped at ``bound`` × its median."""
    if bound <= 0:
        raise ValueError(f"norm_bound must be positive, got {bound}")
    roots = [math.sqrt(n.rank) for n in norms]
    _require_finite(norms, [n.b * n.a for n in norms], "‖B‖·‖A‖")
    med_b = median(n.b / s for n, s in zip(norms, roots))
    med_a = median(n.a / s for n, s in zip(norms, roots))
    b_scales = [_clip_factor(n.b / s, med_b, bound) for n, s in zip(norms, roots)]
    a_scales = [_clip_factor(n.a / s, med_a, bound) for n, s in zip(norms, roots)]
    products = [bs * as_ * n.product / s for n, s, bs, as_ in zip(norms, roots, b_scales, a_scales)]
    _require_finite(norms, products, "‖ΔW‖")
    med_p = median(products)
    med_n = median(n.examples for n in norms)
    out = []
    for n, s, bs, as_, p in zip(norms, roots, b_scales, a_scales, products):
        ps = _clip_factor(p, med_p, bound)
        out.append(BoundScales(bs * ps, as_, cap_examples(n.examples, med_n, bound), ps * p * s))
    return out


def _require_finite(norms: Sequence[UpdateNorms], values: Sequence[float], what: str) -> None:
    for n, v in zip(norms, values):
        if not math.isfinite(v):
            raise InvalidUpdate(n.client, f"{what} is not finite ({v})")


def bound_updates(updates: Sequence[ClientUpdate], bound: float) -> list[ClientUpdate]:
    """Scale every client's B, A and B·A norms (per √rank) beyond ``bound`` × the round median to the median
    (:func:`bound_scales`, applied)."""
    scales = bound_scales([UpdateNorms.of(u) for u in updates], bound)
    return [replace(u, adapter=scale_adapter(u.adapter, b_scale=sc.b, a_scale=sc.a), num_examples=sc.examples)
            for u, sc in zip(updates, scales)]


def cap_examples(n: int, median_n: float, bound: float) -> int:
    """A client's data-size weight n_k, capped at bound × the round's median: a client's claim
    of 10³⁰ examples must not make a data-weighted average its own adapter."""
    return min(n, max(1, int(bound * median_n)))


def cap_weights(weights: Sequence[float], bound: float) -> list[float]:
    """w_k ← min(w_k, bound · median(w)): no client outweighs the typical one by more than ×bound."""
    med = median(weights)
    if med <= 0:
        return list(weights)
    return [min(w, bound * med) for w in weights]



def bound_changes(updates: Sequence[ClientUpdate], changes: Sequence[Mapping[str, Tensor]], bound: float,
                  group: Callable[[str], str] = lambda key: "") -> list[dict[str, Tensor]]:
    """Bound each client's *change* from what it was sent, not its tensors (docs/algorithm.md §5).

    For methods whose update is "the tensors sent plus a change" (FSLoRA's sketch, full
    fine-tuning's weights), scaling the tensors themselves would pull an honest client's
    update towards zero; the change Δ_k is what a client controls. Keys are grouped by
    ``group(key)`` (one group: one flat norm; fft: a group per tensor). In each group, a
    client whose ‖Δ‖ (divided by √rank, so sketches of different sizes compare) exceeds
    ``bound`` × the round's lower median is scaled to that median, as :func:`bound_updates`
    does. Norms are formed in float64; one that is not finite drops its client.
    """
    if bound <= 0:
        raise ValueError(f"norm_bound must be positive, got {bound}")
    names = sorted({group(k) for change in changes for k in change})
    norms = {g: [change_norm(u.adapter, {k: v for k, v in change.items() if group(k) == g}) for u, change in zip(updates, changes)]
             for g in names}
    for g, values in norms.items():
        require_finite_norms(updates, values, f"‖Δ‖ of {g or 'the update'}")
    factors = {g: change_factors(values, bound) for g, values in norms.items()}
    return [{k: v * factors[group(k)][i] if factors[group(k)][i] != 1.0 else v for k, v in change.items()}
            for i, change in enumerate(changes)]


def change_norm(adapter: Mapping[str, Tensor], change: Mapping[str, Tensor]) -> float:
    """‖Δ‖ over ``change``'s tensors in float64, divided by √rank for a LoRA update (sketches of different sizes
    compare): what :func:`bound_changes` holds against the round's median, one client at a time."""
    root = math.sqrt(max(1, adapter_rank(adapter))) if _is_lora(adapter) else 1.0
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in change.values())) / root


def change_factors(norms: Sequence[float], bound: float) -> list[float]:
    """Each change's multiplier: 1, or what brings a norm above ``bound`` × the round's lower median down to it."""
    reference = median(norms)
    return [_clip_factor(v, reference, bound) for v in norms]


def _is_lora(adapter: Mapping[str, Tensor]) -> bool:
    return any(k.endswith(A_SUFFIX) for k in adapter)
