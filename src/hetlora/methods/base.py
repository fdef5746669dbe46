"""What every aggregation method shares: its shape, its context, data-size weights and the
zero-padded weighted sum.

A method is one small class with the same shape as its siblings (like Flower's
``Strategy`` subclasses): a ``name``, the client kind it trains with (``hetlora.clients``),
and ``aggregate(updates, ctx) -> global adapter``. Updates reaching a method are already
validated, once, by :meth:`AggregationMethod.split_valid`. The rules are written out in
``docs/algorithm.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..core.accumulate import PaddedSum
from ..core.adapter import Adapter, ClientUpdate, lora_pairs
from ..core.robust import bound_updates
from ..core.validation import InvalidUpdate, LayerShapes, split_valid


@dataclass(frozen=True)
class AggregationContext:
    """Everything a method may use besides the updates.

    ``r_max``: rank of the global adapter; ``previous``: the global adapter before this
    round (None on a first call); ``norm_bound``: the robustness bound x (None: off);
    ``shapes``: module -> (out, in), else agreed by the clients; ``options``: the
    method's own keyword options (e.g. ``per_layer``); ``generator``: randomness a
    method may draw (DP noise), seeded per round by the runner; ``seed`` and
    ``round_index``: the run's seed and this round (0-based), for methods whose server
    re-derives what it sent (FSLoRA's sketches); ``ranks``: client -> the rank the server
    sent it this round (None: not known, e.g. the public :func:`hetlora.aggregate`).
    """

    r_max: int
    previous: Mapping[str, torch.Tensor] | None = None
    norm_bound: float | None = None
    shapes: LayerShapes | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    seed: int = 0
    round_index: int = 0
    ranks: Mapping[str, int] | None = None


class AggregationMethod:
    """Base class; subclasses set the class attributes and implement :meth:`aggregate`."""

    name: str = ""
    #: which client kind trains for it (hetlora.clients): "lora", "ffa", "flora", "fslora", "plora" or "fft".
    client_kind: str = "lora"
    #: whether clients apply rank self-pruning (docs/algorithm.md, local training).
    prunes: bool = False
    #: whether all clients must share one rank.
    uniform_rank: bool = False
    #: whether its clients train LoRA rank components (ordered dropout trains a prefix of them; a rank is checked
    #: against the layers' size).
    trains_rank_components: bool = True
    #: whether the norm-inflation bound (hetlora.core.robust) applies to its updates.
    bounded: bool = True
    #: whether :meth:`base_update` moves part of each aggregate into the frozen weights.
    folds_into_base: bool = False
    #: whether its clients fold part of what they receive into their frozen weights (Fed-PLoRA's unselected modules):
    #: like a method that folds, they need dense fp32 base weights to fold into.
    client_folds: bool = False
    #: keyword options :meth:`aggregate` understands (read from ``ctx.options``).
    options: tuple[str, ...] = ()
    #: whether it needs the round's context (seed, round) to re-derive what it sent (FSLoRA's sketches).
    needs_round: bool = False
    #: the weight rule under secure aggregation (hetlora.core.secure_sum): the rule is then Σ w_k pad(x_k) / Σ w_k
    #: with one client-computed scalar w_k; None: the rule is not such a sum and cannot run under SecAgg+.
    secure_weight: str | None = None
    #: the weight rule of a rule Σ_k w_k pad(x_k) / Σ_k w_k whose w_k is client k's alone (``update_norm``,
    #: ``examples``): a server folds each reply in as it arrives (hetlora.methods.streaming); None: a list.
    stream_weight: str | None = None
    #: how a streamed sum is finished: ``mean`` Σ_k w_k pad(x_k) / Σ_k w_k; ``slices`` each rank component over the
    #: clients that reached it, Σ_{k: r_k > j} w_k x_{k,j} / Σ_{k: r_k > j} w_k, one no client reached keeping its
    #: previous value (hetlora-keep's slice average, from the same accumulator's masses).
    stream_finish: str = "mean"
    #: whether the rule is previous + F(Σ_k Δ_k) over each client's change Δ_k on what it was sent (FSLoRA; DP-FedAvg's
    #: clipped changes): a server folds each change in as it arrives (streaming.ChangeRound; the method gives
    #: ``fold_change`` and ``finish_changes``, and, if the norm bound applies to it (bounded on the change),
    #: ``change_norm`` and ``bound_one``).
    stream_change: bool = False
    #: whether a streamed round also keeps Σ w_k B_k A_k (hetlora.core.accumulate.ProductSum) for a base update
    #: R = Σ w_k B_k A_k / Σ w_k − B̄ Ā (FedEx-LoRA's residual; docs/algorithm.md §7.2).
    stream_residual: bool = False
    #: whether the aggregate (and base update) of module ℓ needs only module ℓ of every update and per-client scalars
    #: (n_k, r_k): a server then runs the list rule a module at a time over spilled replies (streaming.ModulewiseRound)
    module_separable: bool = False

    @property
    def dp_capable(self) -> bool:
        """Whether DP-FedAvg can wrap it without changing what the method is (docs/algorithm.md §6): its clients
        train their slice of one persistent global adapter (the "lora" client kind; ffa, flora, fslora, plora and
        fft clients do not) **and** its rule is a weighted sum of zero-padded factors (``secure_weight``), which
        DP-FedAvg's clipped, equally weighted sum stands in for; whatever it does to the aggregate alone
        (:meth:`finish`) still runs on the release. A rule that is not such a sum (an SVD of the products, a
        residual folded into the base, rank-wise renormalisation) would be silently replaced, so it is refused."""
        return self.client_kind == "lora" and self.secure_weight is not None

    @property
    def can_prune(self) -> bool:
        """Whether its clients can self-prune (docs/algorithm.md §2.2): LoRA clients (the "lora" and "ffa" kinds) that
        each train a rank of their own. A uniform rank (HomLoRA) must come back at that rank (a pruned reply would be
        dropped, or zero the adapter's tail), and flora, fslora, plora and fft clients never prune."""
        return self.client_kind in ("lora", "ffa") and not self.uniform_rank

    @property
    def footprint_client(self) -> str | None:
        """Which memory footprint its clients have (hetlora.device.footprint; docs/algorithm.md §7), each calibrated
        apart, since a budget becomes a rank only through measured peaks of such clients:

        * ``"lora"``: a LoRA of the client's rank over a frozen base (ffa's clients train B of one, fslora's a LoRA of
          their sketch's rank);
        * ``"folding"``: the same LoRA over dense fp32 weights that a base delta the server sends is folded into
          (fedex-lora, flora, florist; measured with the delta dense on every adapted module, its largest form);
        * ``"plora"``: Fed-PLoRA's client, which receives every rank-1 module of the global adapter, folds the
          unselected ones into dense fp32 weights and trains its rank's worth;
        * None: full fine-tuning (the rank does not set its memory).
        """
        if self.client_kind == "fft":
            return None
        if self.client_folds:
            return "plora"
        return "folding" if self.folds_into_base else "lora"

    @property
    def footprint_calibrated(self) -> bool:
        """Whether a memory budget can turn into a rank for its clients at all (whether a calibration exists for the
        run's setting is asked when ranks are fitted: hetlora.device.footprint.footprint_model)."""
        return self.footprint_client is not None

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        raise NotImplementedError

    def finish(self, aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """What the method does to the aggregate itself, needing nothing of any client (hetlora-svd's
        re-factoring): applied to the plain aggregate and to a secure sum alike (docs/algorithm.md §6.1)."""
        return aggregated

    def bound(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> list[ClientUpdate]:
        """The norm-inflation bound (docs/algorithm.md §5) on LoRA factors: B, A and B·A per √rank.

        Methods whose update is "what was sent plus a change" override this to bound the change
        (hetlora.core.robust.bound_changes). Every method's aggregate and base update are formed
        from what this returns.
        """
        return bound_updates(updates, ctx.norm_bound)

    def base_update(self, updates: Sequence[ClientUpdate], aggregated: Adapter, ctx: AggregationContext) -> Adapter | None:
        """Low-rank factors to fold into the frozen base weights this round (None: nothing).

        For methods that move part of the aggregate out of the adapter (FLoRA, FedEx-LoRA);
        see hetlora.core.base_delta.
        """
        return None

    def split_valid(
        self,
        updates: Sequence[ClientUpdate],
        ctx: AggregationContext,
        assigned_ranks: Mapping[str, int] | None = None,
        round_index: int | None = None,
        exact_rank: bool = False,
    ) -> tuple[list[ClientUpdate], list[tuple[str | None, str]]]:
        """Keep the valid updates, list ``(client, reason)`` for the rest (LoRA adapters).

        ``exact_rank``: every update must have its assigned rank (a run without pruning)."""
        shapes = ctx.shapes if ctx.shapes is not None else _agreed_shapes(updates)
        return split_valid(updates, ctx.r_max, shapes, assigned_ranks=assigned_ranks, round_index=round_index, exact_rank=exact_rank)


def _agreed_shapes(updates: Sequence[ClientUpdate]) -> LayerShapes:
    from ..core.validation import reference_shapes

    return reference_shapes(updates)


def require_valid(method: AggregationMethod, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> None:
    """Raise :class:`InvalidUpdate` for the first update :meth:`split_valid` would drop."""
    _, dropped = method.split_valid(updates, ctx)
    if dropped:
        client, problem = dropped[0]
        raise InvalidUpdate(client, problem)


def data_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """q_k = n_k / Σ_j n_j."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def normalise(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def padded_sum(updates: Sequence[ClientUpdate], r_max: int, weights: Sequence[float] | Mapping[str, Sequence[float]]) -> PaddedSum:
    """Every update folded into one :class:`~hetlora.core.accumulate.PaddedSum` with its weight
    (``weights``: one p_k per client, or module -> p_k per client for per-layer weights)."""
    acc = PaddedSum(r_max)
    per_client = ([{m: ws[k] for m, ws in weights.items()} for k in range(len(updates))] if isinstance(weights, Mapping)
                  else list(weights))
    acc.add_all([u.adapter for u in updates], per_client)
    return acc


def weighted_padded_sum(updates: Sequence[ClientUpdate], r_max: int,
                        weights: Sequence[float] | Mapping[str, Sequence[float]]) -> Adapter:
    """B^g = Σ_k p_k pad(B_k), A^g = Σ_k p_k pad(A_k) (docs/algorithm.md, aggregation): float64 accumulation,
    fp32 result, no padded copies (hetlora.core.accumulate)."""
    return padded_sum(updates, r_max, weights).total()


def slice_average(updates: Sequence[ClientUpdate], r_max: int, weights: Sequence[float] | Mapping[str, Sequence[float]],
                  previous: Mapping[str, torch.Tensor] | None) -> Adapter:
    """Component j = Σ_{k: r_k > j} w_k x_{k,j} / Σ_{k: r_k > j} w_k; a component no client has keeps ``previous``.

    Each rank slice averaged over the clients that have it (rbla with data weights, hetlora-keep with
    sparsity weights); the same accumulator as the weighted sum."""
    return padded_sum(updates, r_max, weights).slice_average(previous)


def per_module_factors(updates: Sequence[ClientUpdate]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """module -> [(B_k, A_k) for every client], in client order."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for u in updates:
        for module, b, a in lora_pairs(u.adapter):
            out.setdefault(module, []).append((b, a))
    return out
