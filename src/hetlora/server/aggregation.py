"""A round's replies to its aggregate, the one path both engines take (docs/algorithm.md §7.2).

A weighted-sum method (``stream_weight``) folds each reply in as it arrives and lets it go: the server holds
the global adapter, one float64 accumulator and O(K) scalars; bounded, the updates wait on disk
(:class:`~hetlora.server.spill.SpillStore`) for the second pass. Any other method validates the list and
aggregates it (:func:`hetlora.methods.aggregate_dropping`): its server memory grows with the round's K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ..core.adapter import Adapter, ClientUpdate
from ..core.validation import InvalidUpdate
from ..methods import AggregationContext, AggregationMethod, aggregate_dropping
from ..methods.streaming import stream_round, streams
from .spill import SpillStore


@dataclass
class RoundAggregate:
    """What a round's replies gave: the aggregate (None: too few valid replies) and the method's base update,
    the kept updates (a streamed round's carry no tensors), every replying client's id, the dropped replies
    ``{"client", "reason"}`` and the kept ones' upload bytes."""

    new: Adapter | None
    base_update: Adapter | None
    kept: list[ClientUpdate]
    replied: list[str | None]
    dropped: list[dict]
    bytes_up: int


def aggregate_replies(method: AggregationMethod, ctx: AggregationContext, replies: Iterable[ClientUpdate], *,
                      assigned_ranks: Mapping[str, int] | None, exact_rank: bool, min_clients: int,
                      upload_bytes: Callable[[ClientUpdate], int], stream: bool = True) -> RoundAggregate:
    """Validate each reply once and aggregate (``stream=False``: the list path for every method, the reference)."""
    if stream and streams(method, ctx):
        return _streamed(method, ctx, replies, assigned_ranks, exact_rank, min_clients, upload_bytes)
    replies = list(replies)
    kept, dropped_updates = method.split_valid(replies, ctx, assigned_ranks=assigned_ranks, round_index=ctx.round_index,
                                               exact_rank=exact_rank)
    dropped = [{"client": c, "reason": r} for c, r in dropped_updates]
    new, base_update, kept = aggregate_dropping(method, kept, ctx, min_clients, dropped)
    return RoundAggregate(new, base_update, kept, [u.client_id for u in replies], dropped, sum(upload_bytes(u) for u in kept))


def _streamed(method, ctx, replies, assigned_ranks, exact_rank, min_clients, upload_bytes) -> RoundAggregate:
    def check(update: ClientUpdate) -> ClientUpdate:
        kept, dropped = method.split_valid([update], ctx, assigned_ranks=assigned_ranks, round_index=ctx.round_index,
                                           exact_rank=exact_rank)
        if dropped:
            raise InvalidUpdate(*dropped[0])
        return kept[0]

    with SpillStore() as store:
        streamed = stream_round(method, ctx, replies, check, store, upload_bytes)
        new = streamed.result() if len(streamed.kept) >= min_clients else None
    kept = sorted(streamed.kept, key=lambda u: u.client_id or "")  # reported in client order, as a list round is
    replied = [u.client_id for u in kept] + [c for c, _ in streamed.dropped]
    return RoundAggregate(new, None, kept, replied, [{"client": c, "reason": r} for c, r in streamed.dropped],
                          streamed.bytes_up)
