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

from torch import Tensor

from ..core.accumulate import PaddedSum, ProductSum
from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, adapter_rank, lora_pairs, scale_adapter, update_norm
from ..core.base_delta import DENSE_SUFFIX
from ..core.robust import BoundScales, UpdateNorms, bound_scales, cap_weights, change_factors
from ..core.validation import DUPLICATE, InvalidUpdate
from . import as_fp32
from .base import AggregationContext, AggregationMethod


class ReplyStore(Protocol):
    """Where a round's updates wait for the second pass: each put once, then taken back once (a weighted-sum
    round) or read a module at a time (a module-wise round; the store drops them when the round ends)."""

    def put(self, index: int, update: ClientUpdate) -> None: ...

    def take(self, index: int) -> ClientUpdate: ...

    def read(self, index: int, keys: list[str]) -> dict[str, Tensor]: ...


def streams(method: AggregationMethod, ctx: AggregationContext) -> bool:
    """Whether ``method`` can aggregate this round as its replies arrive (per-layer weights need a list)."""
    return method.stream_weight is not None and not ctx.options.get("per_layer", False)


def modulewise(method: AggregationMethod, ctx: AggregationContext) -> bool:
    """Whether ``method``'s list rule can run a module at a time over spilled replies (:class:`ModulewiseRound`)."""
    return method.module_separable and not streams(method, ctx) and not method.stream_change


def one_at_a_time(method: AggregationMethod, ctx: AggregationContext) -> bool:
    """Whether a server takes ``method``'s replies one at a time (:func:`stream_round`), never holding K of them."""
    return streams(method, ctx) or method.stream_change or modulewise(method, ctx)


@dataclass
class _Intake:
    """A round's replies taken one at a time: each validated once (``check`` raises :class:`InvalidUpdate`),
    refused by name or accepted (:meth:`_accept`, the round's own). ``kept`` ends as the accepted updates
    *without their tensors* (what a round's report needs), ``dropped`` as ``(client, reason)``; ``bytes_up`` sums
    ``upload_bytes`` over the kept ones; an update with norms returned by :meth:`_accept` goes to the store."""

    method: AggregationMethod
    ctx: AggregationContext
    check: Callable[[ClientUpdate], ClientUpdate]
    store: ReplyStore | None = None
    upload_bytes: Callable[[ClientUpdate], int] = lambda u: 0
    kept: list[ClientUpdate] = field(default_factory=list)
    dropped: list[tuple[str | None, str]] = field(default_factory=list)
    bytes_up: int = 0
    _norms: list[UpdateNorms] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    @property
    def bounded(self) -> bool:
        """Whether the norm bound scales this round's updates (docs/algorithm.md §5)."""
        return self.ctx.norm_bound is not None and self.method.bounded

    def offer(self, update: ClientUpdate) -> bool:
        """Validate one reply and take it in (stored with its norms when the round needs it again); False if dropped."""
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

    def _validated(self, update: ClientUpdate) -> ClientUpdate:
        if update.client_id is not None and update.client_id in self._seen:
            raise InvalidUpdate(update.client_id, DUPLICATE)
        return as_fp32(self.check(update))

    def _accept(self, update: ClientUpdate) -> tuple[ClientUpdate, UpdateNorms | None]:
        raise NotImplementedError


@dataclass
class StreamedRound(_Intake):
    """One round of a streaming rule: :meth:`offer` each reply as it arrives, then :meth:`result`."""

    _fold: "_WeightedFold | None" = None
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

    def _accept(self, update: ClientUpdate) -> tuple[ClientUpdate, UpdateNorms | None]:
        """The validated update (fp32 at least) and, bounded, its norms; unbounded, it is folded in here."""
        update = self._validated(update)
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
        return self.method.finish(self._fold.total(self.method.stream_finish, self.ctx.previous), self.ctx)

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


@dataclass
class ModulewiseRound(_Intake):
    """A list rule run a module at a time (docs/algorithm.md §7.2): for a method whose aggregate of module ℓ needs
    only module ℓ of every update and per-client scalars (:attr:`AggregationMethod.module_separable`).

    First pass: each reply is validated, its norms kept (O(K) scalars) and the update stored (the server spills it
    to disk). Once every reply is in, the bound's scales are fixed from the norms; then for each module the round
    reads that module's factors of every update back (in client order), scales them as the bound would have, and
    runs the method's own list rule (:func:`hetlora.methods.aggregate_round`) on them. The server holds one
    module's factors of the round, Σ_k r_k (out_ℓ + in_ℓ) numbers, and the result: not K adapters. The result is
    the list round's, since each module's arithmetic is the same (tested, bound on and off)."""

    _base: Adapter | None = None

    def __post_init__(self) -> None:
        if not modulewise(self.method, self.ctx):
            raise ValueError(f"method {self.method.name!r} does not aggregate a module at a time")
        if self.store is None or self.ctx.shapes is None:
            raise ValueError("a module-wise round needs a ReplyStore for its second pass and the layer shapes")

    def _accept(self, update: ClientUpdate) -> tuple[ClientUpdate, UpdateNorms]:
        return (update := self._validated(update)), finite_norms(update)

    def result(self) -> Adapter | None:
        """The round's aggregate (None with no kept update); its base update is kept for :meth:`base_update`."""
        if not self.kept:
            return None
        from . import aggregate_round

        order = sorted(range(len(self._norms)), key=lambda i: self._norms[i].client or "")  # the list round's order
        scales = bound_scales(self._norms, self.ctx.norm_bound) if self.bounded else None
        ctx = replace(self.ctx, norm_bound=None)  # the scales below are the bound
        new: Adapter = {}
        base: Adapter = {}
        for module in sorted(self.ctx.shapes):
            updates = [self._module_update(i, module, scales) for i in order]
            module_new, module_base = aggregate_round(self.method, updates, ctx)
            new |= module_new
            base |= module_base or {}
        self._base = base or None
        return new

    def _module_update(self, index: int, module: str, scales: list[BoundScales] | None) -> ClientUpdate:
        adapter = self.store.read(index, [module + B_SUFFIX, module + A_SUFFIX])
        meta = replace(self.kept[index], adapter=adapter)
        if scales is None:
            return meta
        sc = scales[index]
        return replace(meta, adapter=scale_adapter(adapter, b_scale=sc.b, a_scale=sc.a), num_examples=sc.examples)

    def base_update(self, aggregated: Adapter) -> Adapter | None:
        """The method's base update, formed module by module with the aggregate."""
        return self._base


@dataclass(frozen=True)
class ChangeNorm:
    """All a bounded change round keeps of a client until the second pass: its id and ‖Δ_k‖ (core.robust.change_norm)."""

    client: str | None
    norm: float


@dataclass
class ChangeRound(_Intake):
    """A rule previous + F(Σ_k Δ_k) over each client's change on what it was sent (FSLoRA: Δ_k on its sketch,
    F(s) = η s / K; DP-FedAvg: Δ_k = clip(δ_k, C), F(s) = (s + noise) / K̄, never bounded), taken one reply at a time (docs/algorithm.md §7.2). Unbounded, each change is folded into a
    float64 padded sum on its components as it arrives. Bounded (the bound scales a change, not the update), the
    first pass keeps ‖Δ_k‖ and stores the update; once every reply is in, the factors are fixed from the round's
    median and the second pass folds each scaled change in, in client order. The server holds the global adapter,
    one accumulator of rank r_max and O(K) scalars; the result is the list round's (tested, bound on and off)."""

    _sum: PaddedSum | None = None

    def __post_init__(self) -> None:
        if not self.method.stream_change:
            raise ValueError(f"method {self.method.name!r} does not aggregate changes one at a time")
        if self.bounded and self.store is None:
            raise ValueError("a bounded round needs a ReplyStore for its second pass")
        if self.bounded and not (hasattr(self.method, "change_norm") and hasattr(self.method, "bound_one")):
            raise ValueError(f"method {self.method.name!r} is bounded but gives no change_norm / bound_one for its changes")
        self._sum = PaddedSum(self.ctx.r_max)

    def _accept(self, update: ClientUpdate) -> tuple[ClientUpdate, ChangeNorm | None]:
        update = self._validated(update)
        if not self.bounded:
            self.method.fold_change(self._sum, update, self.ctx)
            return update, None
        norm = self.method.change_norm(update, self.ctx)
        if not math.isfinite(norm):
            raise InvalidUpdate(update.client_id, f"‖Δ‖ of the update is not finite ({norm})")
        return update, ChangeNorm(update.client_id, norm)

    def result(self) -> Adapter | None:
        """The round's aggregate (None with no kept update); bounded: the second pass runs here."""
        if not self.kept:
            return None
        if self.bounded:
            factors = change_factors([n.norm for n in self._norms], self.ctx.norm_bound)
            for index in sorted(range(len(factors)), key=lambda i: str(self._norms[i].client)):  # the list's order
                update = self.method.bound_one(self.store.take(index), factors[index], self.ctx)
                self.method.fold_change(self._sum, update, self.ctx)
                del update
        return self.method.finish(self.method.finish_changes(self._sum, len(self.kept), self.ctx), self.ctx)

    def base_update(self, aggregated: Adapter) -> Adapter | None:
        return None


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
        self.sum.add(adapter, weight * scales.b, a_weight=weight * scales.a, mass=weight)
        self.weight += weight

    def add_weighted(self, adapter: Adapter, weight: float) -> None:
        self.sum.add(adapter, weight)
        self.weight += weight

    def total(self, finish: str = "mean", previous: Adapter | None = None) -> Adapter:
        """The rule's result (:attr:`AggregationMethod.stream_finish`): the weighted mean, or the slice average
        (a component no client reached keeps ``previous``)."""
        summed, weight = self.sum, self.weight
        if weight <= 0.0 and self.fallback is not None and self.fallback_weight > 0.0:
            summed, weight = self.fallback, self.fallback_weight
        if finish == "slices":
            return summed.slice_average(previous)
        # every weight zero and no fallback: the zero sum, as the list rule gives
        return summed.total(scale=1.0 / weight, spend=True) if weight > 0.0 else summed.total(spend=True)


def stream_round(method: AggregationMethod, ctx: AggregationContext, replies: Iterable[ClientUpdate],
                 check: Callable[[ClientUpdate], ClientUpdate], store: ReplyStore | None = None,
                 upload_bytes: Callable[[ClientUpdate], int] = lambda u: 0) -> StreamedRound | ChangeRound | ModulewiseRound:
    """Every reply offered as it comes; the returned round's ``result()`` is the aggregate (a weighted-sum method's
    :class:`StreamedRound`, a change rule's :class:`ChangeRound`, or a :class:`ModulewiseRound`)."""
    kind = StreamedRound if streams(method, ctx) else ChangeRound if method.stream_change else ModulewiseRound
    streamed = kind(method, ctx, check, store, upload_bytes)
    for reply in replies:
        streamed.offer(reply)
    return streamed
