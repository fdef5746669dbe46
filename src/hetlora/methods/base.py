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

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, lora_pairs, module_names
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

    def previous_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) of ``module`` in the global adapter before this round, None on a first call."""
        if self.previous is None:
            return None
        return self.previous[module + B_SUFFIX], self.previous[module + A_SUFFIX]


class AggregationMethod:
    """Base class; subclasses set the class attributes and implement :meth:`aggregate`."""

    name: str = ""
    #: which client kind trains for it (hetlora.clients): "lora", "ffa", "flora" or "fft".
    client_kind: str = "lora"
    #: whether clients apply rank self-pruning (docs/algorithm.md, local training).
    prunes: bool = False
    #: whether all clients must share one rank.
    uniform_rank: bool = False
    #: whether its clients train LoRA rank components (ordered dropout trains a prefix of them).
    trains_rank_components: bool = True
    #: whether the norm-inflation bound (hetlora.core.robust) applies to its updates.
    bounded: bool = True
    #: whether :meth:`base_update` moves part of each aggregate into the frozen weights.
    folds_into_base: bool = False
    #: keyword options :meth:`aggregate` understands (read from ``ctx.options``).
    options: tuple[str, ...] = ()
    #: whether it needs the round's context (seed, round) to re-derive what it sent (FSLoRA's sketches).
    needs_round: bool = False
    #: the weight rule under secure aggregation (hetlora.core.secure_sum): the rule is then Σ w_k pad(x_k) / Σ w_k
    #: with one client-computed scalar w_k; None: the rule is not such a sum and cannot run under SecAgg+.
    secure_weight: str | None = None

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


def weighted_padded_sum(
    updates: Sequence[ClientUpdate],
    r_max: int,
    weights: Sequence[float] | Mapping[str, Sequence[float]],
) -> Adapter:
    """B^g = Σ_k p_k pad(B_k), A^g = Σ_k p_k pad(A_k) (docs/algorithm.md, aggregation).

    ``weights`` is one p_k per client, or a mapping module -> p_k per client for
    per-layer weights. Accumulates each client's slice in place instead of building
    padded copies: the padding is zeros, so it adds nothing.
    """
    out: Adapter = {}
    for module in module_names(updates[0].adapter):
        b0 = updates[0].adapter[module + B_SUFFIX]
        a0 = updates[0].adapter[module + A_SUFFIX]
        dtype = torch.promote_types(b0.dtype, torch.float32)
        acc_b = torch.zeros(b0.shape[0], r_max, dtype=dtype)
        acc_a = torch.zeros(r_max, a0.shape[1], dtype=dtype)
        ws = weights[module] if isinstance(weights, Mapping) else weights
        for u, w in zip(updates, ws):
            b, a = u.adapter[module + B_SUFFIX], u.adapter[module + A_SUFFIX]
            r = a.shape[0]
            acc_b[:, :r].add_(b, alpha=w)
            acc_a[:r].add_(a, alpha=w)
        out[module + A_SUFFIX] = acc_a
        out[module + B_SUFFIX] = acc_b
    return out


def per_module_factors(updates: Sequence[ClientUpdate]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """module -> [(B_k, A_k) for every client], in client order."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for u in updates:
        for module, b, a in lora_pairs(u.adapter):
            out.setdefault(module, []).append((b, a))
    return out


def slice_average(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], r_max: int,
                  previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with component j = Σ_{k: r_k > j} w_k (B_k, A_k)_j / Σ_{k: r_k > j} w_k; uncovered j keep ``previous``.

    Each rank slice averaged over the clients that have it (rbla with data weights,
    hetlora-keep with sparsity weights); accumulated in float64, returned as float32.
    """
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
