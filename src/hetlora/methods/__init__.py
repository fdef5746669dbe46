"""The registry of aggregation methods and the one entry point, :func:`aggregate`.

Adding a method means adding one module with an :class:`AggregationMethod`
subclass and one line in ``METHODS`` (docs/algorithm.md, "Adding a method").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from ..core.validation import InvalidUpdate, LayerShapes
from .base import AggregationContext, AggregationMethod, require_valid
from .fedavg import FedAvg
from .fedex_lora import FedExLoRA
from .fed_plora import FedPLoRA
from .ffa import FFALoRA
from .fft import FullFineTuning
from .flexlora import FlexLoRA
from .flora import FLoRA
from .florist import FLoRIST
from .hetlora import HetLoRA
from .fslora import FSLoRA
from .hetlora_keep import HetLoRAKeep
from .hetlora_naive import HetLoRANaive
from .hetlora_svd import HetLoRARevive, HetLoRASVD, HetLoRASVDRevive
from .rb_lora import RBLoRA
from .rbla import RBLA
from .recon_svd import ReconSVD

METHODS: dict[str, AggregationMethod] = {
    m.name: m
    for m in (
        HetLoRA(),
        HetLoRANaive(),
        FedAvg(),
        ReconSVD(),
        FlexLoRA(),
        FLoRA(),
        FFALoRA(),
        RBLA(),
        HetLoRAKeep(),
        RBLoRA(),
        FSLoRA(),
        FedExLoRA(),
        FullFineTuning(),
        HetLoRASVD(),
        HetLoRARevive(),
        HetLoRASVDRevive(),
        FLoRIST(),
        FedPLoRA(),
    )
}


def get_method(name: str) -> AggregationMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def aggregate_round(method: AggregationMethod, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> tuple[Adapter, Adapter | None]:
    """Aggregate updates that already passed validation: the norm bound (if on), then the rule.

    Returns the new global adapter and the method's base update (what it folds into the frozen
    weights, None for most), both formed from the *same* bounded updates: a residual taken
    from the raw updates would undo the bound (docs/algorithm.md, "fedex-lora").
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    updates = [as_fp32(u) for u in updates]
    if ctx.norm_bound is not None and method.bounded:
        updates = method.bound(updates, ctx)
    aggregated = method.finish(method.aggregate(updates, ctx), ctx)
    aggregated = {k: v.detach().to(torch.float32).contiguous() for k, v in aggregated.items()}
    return aggregated, method.base_update(updates, aggregated, ctx)


def aggregate_dropping(method: AggregationMethod, kept: list[ClientUpdate], ctx: AggregationContext, min_clients: int,
                       dropped: list[dict[str, Any]]) -> tuple[Adapter | None, Adapter | None, list[ClientUpdate]]:
    """(aggregate, base update, the updates it came from): a client whose norm turns out not finite while
    aggregating is dropped (appended to ``dropped``) and the rest retried; None below ``min_clients``."""
    while len(kept) >= min_clients:
        try:
            new, base_update = aggregate_round(method, kept, ctx)
            return new, base_update, kept
        except InvalidUpdate as err:
            kept = [u for u in kept if u.client_id != err.client]
            dropped.append({"client": err.client, "reason": err.problem})
    return None, None, kept


def aggregate_valid(method: AggregationMethod, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
    """The new global adapter from validated updates (:func:`aggregate_round` without the base update)."""
    return aggregate_round(method, updates, ctx)[0]


def as_fp32(update: ClientUpdate) -> ClientUpdate:
    """Detached factors in at least fp32 (half precision is widened before any sum; float64 stays)."""
    return replace(update, adapter={k: _fp32_factor(v) for k, v in update.adapter.items()})


def _fp32_factor(value: torch.Tensor) -> torch.Tensor:
    """``value`` itself when it is already a plain fp32/fp64 tensor (no copy, no new tensor object)."""
    value = value.detach() if value.requires_grad else value
    return value if value.dtype in (torch.float32, torch.float64) else value.float()


def aggregate(
    method: str,
    updates: Sequence[ClientUpdate],
    r_max: int,
    *,
    norm_bound: float | None = None,
    previous: Mapping[str, torch.Tensor] | None = None,
    shapes: LayerShapes | None = None,
    seed: int | None = None,
    round_index: int | None = None,
    ranks: Mapping[str, int] | None = None,
    **options: Any,
) -> Adapter:
    """Validate a round's updates, then aggregate them into the new global adapter.

    Returns rank r_max (``flora``: the stacked rank Σ r_k). ``norm_bound=x`` clips
    each client's B, A and B·A to x × the round's median (per √rank) and caps the
    sparsity weights; ``None`` is paper-faithful. ``shapes`` (module -> (out, in))
    defaults to the shapes most clients agree on. ``seed``, ``round_index``, ``ranks``: the
    round's context (the run's seed, the 0-based round, the rank sent to each client), which a
    method that re-derives what it sent needs (fslora's sketches): it refuses to run without
    them rather than silently use round 0's. Raises ``InvalidUpdate`` naming the client for a
    bad update, before any arithmetic.
    """
    m = get_method(method)
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise TypeError(f"method {method!r} takes no option(s) {unknown}; it takes {list(m.options) or 'none'}")
    if not updates:
        raise ValueError("no updates to aggregate")
    if m.needs_round and (seed is None or round_index is None):
        raise ValueError(f"method {method!r} re-derives what the server sent each client from the run's seed and the round: "
                         "pass seed= and round_index=")
    ctx = AggregationContext(r_max=r_max, previous=previous, norm_bound=norm_bound, shapes=shapes, options=options,
                             seed=seed or 0, round_index=round_index or 0, ranks=ranks)
    require_valid(m, updates, ctx)
    return aggregate_valid(m, updates, ctx)


__all__ = ["METHODS", "AggregationContext", "AggregationMethod", "aggregate", "aggregate_round", "aggregate_valid", "get_method"]
