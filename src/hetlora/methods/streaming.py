"""A round aggregated as its replies arrive: each validated once, folded into running sums, then let go
(docs/algorithm.md §7.2).

A weighted-sum rule Σ_k w_k pad(x_k) / Σ_k w_k whose weight w_k depends on client k alone
(:attr:`AggregationMethod.stream_weight`: hetlora's ‖ΔW_k‖, or n_k) needs no update twice: the sum
is kept unnormalised in float64 (:class:`~hetlora.core.accumulate.PaddedSum`) and divided by Σ w_k at the end,
so a server holds the global adapter, one accumulator and O(K) scalars, never K adapters.

The norm bound (docs/algorithm.md §5) scales an update by factors that depend on the whole round's medians.
They are computed from a few scalars per update (:class:`~hetlora.core.robust.UpdateNorms`), so a bounded
round makes two passes: the first keeps each update's norms and hands the update to a :class:`ReplyStore`
(the server spills it to disk); once every reply is in, the scales are fixed and the second pass reads each
update back once, scales it and folds it in. The result is :func:`hetlora.methods.aggregate_round`'s, the
list reference, within float rounding (tested for every streaming method, bound on and off).

Pure tensor code: the store is the caller's (hetlora.server.spill writes safetensors files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol

from ..core.accumulate import PaddedSum, ProductSum
from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, adapter_rank, lora_pairs, update_norm
from ..core.base_delta import DENSE_SUFFIX
from ..core.robust import BoundScales, UpdateNorms, bound_scales, cap_weights
from ..core.validation import DUPLICATE, InvalidUpdate
from . import as_fp32
from .base import AggregationContext, AggregationMethod


class ReplyStore(Protocol):
    """Where a bounded round's updates wait for the second pass: each put once and taken back once, in order."""

    def put(self, index: int, update: ClientUpdate) -> None: ...

    def take(self, index: int) -> ClientUpdate: ...


def streams(method: AggregationMethod, ctx: AggregationContext) -> bool:
    """Whether ``method`` can aggregate this round as its replies arrive (per-layer weights need a list)."""
    return method.stream_weight is not None and not ctx.options.get("per_layer", False)


@dataclass
class StreamedRound:
    """One round of a streaming rule: :meth:`offer` each reply as it arrives, then :meth:`result`.

    ``check(update)`` is the method's validation of one update (raises :class:`InvalidUpdate`); ``kept`` ends
    as the accepted updates *without their tensors* (what a round's report needs), ``dropped`` as
    ``(client, reason)``; ``bytes_up`` sums ``upload_bytes`` over the kept ones."""

    method: AggregationMethod
    ctx: AggregationContext
    check: Callable[[ClientUpdate], ClientUpdate]
    store: ReplyStore | None = None
    upload_bytes: Callable[[ClientUpdate], int] = lambda u: 0
    kept: list[ClientUpdate] = field(default_factory=list)
    dropped: list[tuple[str | None, str]] = field(default_factory=list)
    bytes_up: int = 0
    _norms: list[UpdateNorms] = field(default_factory=list)
    _fold: "_WeightedFold | None" = None
    _seen: set[str] = field(default_factory=set)
    _rank: int | None = None
    _products: ProductSum | None = None

    def __post_init__(self) -> None:
        if not streams(self.method, self.ctx):
            raise ValueError(f"method {self.method.name!r} aggregates a list, not a stream")
        if self.bounded and self.store is None:
            raise ValueError("a bounded round needs a ReplyStore for its second pass")
        if self.method.stream_residual and self.method.stream_weight == "update_norm":
            raise ValueError("a streamed residual needs weights fixed per client (examples or uniform), not update norms")
        self._fold = None if self.bounded else _WeightedFold(self.method.stream_weight, self.ctx.r_max, fallback=True)
        self._products = ProductSum() if self.method.stream_residual else None

    @property
    def bounded(self) -> bool:
        return self.ctx.norm_bound is not None and self.method.bounded

    def offer(self, update: ClientUpdate) -> bool:
        """Validate one reply and fold it in (bounded: keep its norms and store it); False if it was dropped."""
        try:
            update, norms = self._accept(update)
        except InvalidUpdate as err:
            self.dropped.append((err.client, err.problem))
            return False
        if update.client_id is not None:
            self._seen.add(update.client_id)
        self.bytes_up += self.upload_bytes(update)
        self.kept.append(replace(update, adapter={}))
        if norms is not None:
            self.store.put(len(self._norms), update)
            self._norms.append(norms)
        return True

    def _accept(self, update: ClientUpdate) -> tuple[ClientUpdate, UpdateNorms | None]:
        """The validated update (fp32 at least) and, bounded, its norms; unbounded, it is folded in here."""
        if update.client_id is not None and update.client_id in self._seen:
            raise InvalidUpdate(update.client_id, DUPLICATE)
        update = as_fp32(self.check(update))
        if self.method.uniform_rank:
            rank = adapter_rank(update.adapter)
            if self._rank is not None and rank != self._rank:
                raise InvalidUpdate(update.client_id, f"{self.method.name} needs every client at one rank: rank {rank}, "
                                                      f"not the round's {self._rank}")
            self._rank = rank
        if not self.bounded:
            weight = self._fold.add(update)
            if self._products is not None:
                self._products.add(update.adapter, 1.0, weight)
            return update, None
        return update, finite_norms(update)

    def result(self) -> Adapter | None:
        """The round's aggregate (None with no kept update); bounded: the second pass runs here."""
        if not self.kept:
            return None
        if self.bounded:
            self._second_pass()
        return self.method.finish(self._fold.total(), self.ctx)

    def _second_pass(self) -> None:
        scales = bound_scales(self._norms, self.ctx.norm_bound)
        weights = _bounded_weights(self.method.stream_weight, scales, self.ctx.norm_bound)
        self._fold = _WeightedFold(self.method.stream_weight, self.ctx.r_max, fallback=False)  # weights known: no fallback sum
        # in client order, whatever order the replies came in: the same bits for the same round on every engine
        for index in sorted(range(len(scales)), key=lambda i: str(self._norms[i].client)):
            sc, weight = scales[index], weights[index]
            update = self.store.take(index)
            self._fold.add_scaled(update.adapter, weight, sc)
            if self._products is not None:
                self._products.add(update.adapter, sc.b, weight * sc.a)
            del update

    def base_update(self, aggregated: Adapter) -> Adapter | None:
        """The method's base update from the streamed sums: R = Σ w_k B_k A_k / Σ w_k − B̄ Ā per module (None for a
        method without one). A module whose products are still stacked gets the list rule's exact factors
        [B_1 … B_K, B̄] [w_1 A_1; …; w_K A_K; −Ā] (w_k normalised); a dense one gets R itself, written over the fp32
        sum it came from (no second matrix of the model's size)."""
        if self._products is None or not self.kept:
            return None
        total = self._fold.weight
        out: Adapter = {}
        for module, b_bar, a_bar in lora_pairs(aggregated):
            if module in self._products.stacked:
                out[module + B_SUFFIX], out[module + A_SUFFIX] = self._products.residual_factors(module, b_bar, a_bar, total)
            else:
                out[module + DENSE_SUFFIX] = self._products.dense.pop(module).div_(total).addmm_(b_bar.float(), a_bar.float(), alpha=-1.0)
        return out


def finite_norms(update: ClientUpdate) -> UpdateNorms:
    """The update's norms, refused (InvalidUpdate) when ‖B‖·‖A‖ or ‖ΔW‖ is not finite: finite factors can still
    overflow fp32 in their product, and the aggregation would drop such a reply later."""
    norms = UpdateNorms.of(update)
    for value, what in ((norms.b * norms.a, "‖B‖·‖A‖"), (norms.product, "‖ΔW‖")):
        if not math.isfinite(value):
            raise InvalidUpdate(update.client_id, f"{what} is not finite ({value})")
    return norms


def _bounded_weights(rule: str, scales: list[BoundScales], bound: float) -> list[float]:
    """The weights of bounded updates, as the list rules form them: ‖ΔW‖ capped at bound × median (falling back
    to the capped n_k when every norm is zero), or the capped n_k, or 1."""
    if rule == "update_norm":
        norms = cap_weights([sc.norm for sc in scales], bound)
        return norms if sum(norms) > 0.0 else [float(sc.examples) for sc in scales]
    if rule == "examples":
        return [float(sc.examples) for sc in scales]
    return [1.0] * len(scales)


class _WeightedFold:
    """Σ_k w_k pad(x_k) and Σ_k w_k in float64; hetlora's weights fall back to n_k while every norm so far is 0
    (its list rule's fallback when all are: the first round, B = 0)."""

    def __init__(self, rule: str, r_max: int, fallback: bool):
        self.rule, self.r_max = rule, r_max
        self.sum, self.weight = PaddedSum(r_max), 0.0
        self.fallback: PaddedSum | None = PaddedSum(r_max) if rule == "update_norm" and fallback else None
        self.fallback_weight = 0.0

    def add(self, update: ClientUpdate) -> float:
        """One unbounded update with its own weight (returned)."""
        if self.rule == "update_norm":
            norm = update_norm(update.adapter)
            if not math.isfinite(norm):
                raise InvalidUpdate(update.client_id, f"‖ΔW‖ is not finite ({norm})")
            if self.fallback is not None and norm <= 0.0:
                self.fallback.add(update.adapter, float(update.num_examples))
                self.fallback_weight += float(update.num_examples)
            elif norm > 0.0:
                self.fallback = None  # some weight is positive: the fallback is never needed
            self.add_weighted(update.adapter, norm)
            return norm
        weight = float(update.num_examples) if self.rule == "examples" else 1.0
        self.add_weighted(update.adapter, weight)
        return weight

    def add_scaled(self, adapter: Adapter, weight: float, scales: BoundScales) -> None:
        """A bounded update: B × weight·β and A × weight·α folded in, no scaled copy made."""
        self.sum.add(adapter, weight * scales.b, a_weight=weight * scales.a)
        self.weight += weight

    def add_weighted(self, adapter: Adapter, weight: float) -> None:
        self.sum.add(adapter, weight)
        self.weight += weight

    def total(self) -> Adapter:
        if self.weight > 0.0:
            return self.sum.total(scale=1.0 / self.weight)
        if self.fallback is not None and self.fallback_weight > 0.0:
            return self.fallback.total(scale=1.0 / self.fallback_weight)
        return self.sum.total()  # every weight zero and no fallback: the zero sum, as the list rule gives


def stream_round(method: AggregationMethod, ctx: AggregationContext, replies: Iterable[ClientUpdate],
                 check: Callable[[ClientUpdate], ClientUpdate], store: ReplyStore | None = None,
                 upload_bytes: Callable[[ClientUpdate], int] = lambda u: 0) -> StreamedRound:
    """Every reply offered as it comes; the returned round's :meth:`StreamedRound.result` is the aggregate."""
    streamed = StreamedRound(method, ctx, check, store, upload_bytes)
    for reply in replies:
        streamed.offer(reply)
    return streamed
