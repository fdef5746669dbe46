"""A round's replies to its aggregate, the one path both engines take (docs/algorithm.md §7.2).

A weighted-sum method (``stream_weight``) folds each reply in as it arrives and lets it go: the server holds
the global adapter, one float64 accumulator and O(K) scalars; bounded, the updates wait on disk
(:class:`~hetlora.server.spill.SpillStore`) for the second pass. A method whose rule works a module at a time
(``module_separable``) spills every reply and runs its list rule one module at a time over them: the server holds
one module of the round's updates. Any other method validates the list and aggregates it
(:func:`hetlora.methods.aggregate_dropping`): its server memory grows with the round's K.
Under over-selection (docs/algorithm.md §7.3) a round takes replies only until K valid ones are in
(:class:`RoundClose`); what it does not take is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from ..core.adapter import Adapter, ClientUpdate
from ..core.validation import DUPLICATE, InvalidUpdate
from ..methods import AggregationContext, AggregationMethod, aggregate_dropping
from ..methods.streaming import finite_norms, one_at_a_time, stream_round
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


@dataclass
class RoundClose:
    """How many valid replies a round takes (docs/algorithm.md §7.3): ``wanted`` = K under over-selection
    (None: every reply that comes), and how many are in so far. An engine reads :attr:`missing` to ask no
    more clients than the round can still take."""

    wanted: int | None = None
    taken: int = 0

    @property
    def full(self) -> bool:
        return self.wanted is not None and self.taken >= self.wanted

    @property
    def missing(self) -> int | None:
        return None if self.wanted is None else max(0, self.wanted - self.taken)


def aggregate_replies(method: AggregationMethod, ctx: AggregationContext, replies: Iterable[ClientUpdate], *,
                      assigned_ranks: Mapping[str, int] | None, exact_rank: bool, min_clients: int,
                      upload_bytes: Callable[[ClientUpdate], int], stream: bool = True,
                      close: RoundClose | None = None) -> RoundAggregate:
    """Validate each reply once and aggregate (``stream=False``: the list path for every method, the reference).
    ``close`` with ``wanted`` set: replies are taken until that many valid ones are in, the rest left unread."""
    check = _one_check(method, ctx, assigned_ranks, exact_rank)
    refused: list[dict] = []
    checked = close is not None and close.wanted is not None  # then each reply is validated as it is taken
    if checked:
        replies = _first_valid(replies, check, close, refused, factors=method.trains_rank_components)
    if stream and one_at_a_time(method, ctx):
        done = _streamed(method, ctx, replies, (lambda u: u) if checked else check, min_clients, upload_bytes)
        done.dropped[:0] = refused
        done.replied += [d["client"] for d in refused]
        return done
    replies = sorted(replies, key=lambda u: u.client_id or "")  # the aggregate does not depend on arrival order
    kept, dropped_updates = (list(replies), []) if checked else method.split_valid(
        replies, ctx, assigned_ranks=assigned_ranks, round_index=ctx.round_index, exact_rank=exact_rank)
    dropped = [{"client": c, "reason": r} for c, r in dropped_updates]
    new, base_update, kept = aggregate_dropping(method, kept, ctx, min_clients, dropped)
    return RoundAggregate(new, base_update, kept, [u.client_id for u in replies] + [d["client"] for d in refused],
                          refused + dropped, sum(upload_bytes(u) for u in kept))


def _one_check(method, ctx, assigned_ranks, exact_rank) -> Callable[[ClientUpdate], ClientUpdate]:
    """The method's validation of one update (raises :class:`InvalidUpdate`): the one path, reply by reply."""
    def check(update: ClientUpdate) -> ClientUpdate:
        kept, dropped = method.split_valid([update], ctx, assigned_ranks=assigned_ranks, round_index=ctx.round_index,
                                           exact_rank=exact_rank)
        if dropped:
            raise InvalidUpdate(*dropped[0])
        return kept[0]

    return check


def _first_valid(replies: Iterable[ClientUpdate], check, close: RoundClose, refused: list[dict], factors: bool = True) -> Iterator[ClientUpdate]:
    """The replies until ``close.wanted`` valid ones are taken, each validated here (an invalid one goes to
    ``refused`` and does not count); the stream is not read past the last one taken. A reply of LoRA factors
    (``factors``) must also have finite factor norms; a dense one (fft) is checked value by value by ``check``."""
    seen: set[str] = set()
    if close.full:
        return
    for update in replies:
        try:
            if update.client_id is not None and update.client_id in seen:
                raise InvalidUpdate(update.client_id, DUPLICATE)
            update = check(update)  # the checked update (its example count an int), validated here once
            if factors:
                finite_norms(update)  # a reply that counts toward K must survive the aggregation's own drops
        except InvalidUpdate as err:
            refused.append({"client": err.client, "reason": err.problem})
            continue
        seen.add(update.client_id)
        close.taken += 1
        yield update
        if close.full:
            return


def _streamed(method, ctx, replies, check, min_clients, upload_bytes) -> RoundAggregate:
    with SpillStore() as store:
        streamed = stream_round(method, ctx, replies, check, store, upload_bytes)
        new = streamed.result() if len(streamed.kept) >= min_clients else None
        base_update = streamed.base_update(new) if new is not None else None
    kept = sorted(streamed.kept, key=lambda u: u.client_id or "")  # reported in client order, as a list round is
    replied = [u.client_id for u in kept] + [c for c, _ in streamed.dropped]
    return RoundAggregate(new, base_update, kept, replied, [{"client": c, "reason": r} for c, r in streamed.dropped],
                          streamed.bytes_up)
