"""User-level DP-FedAvg as a wrapper around a method (as Flower's DP strategies wrap a strategy).

The wrapped method keeps its name, client kind, validation and its step on the aggregate alone (``finish``, e.g.
hetlora-svd's re-factoring: post-processing of the release); its weighting is replaced by DP-FedAvg's (McMahan et al., ICLR 2018, docs/algorithm.md "Privacy"):
each client's change on its own slice is clipped to L2 norm C, the clipped changes are
summed, Gaussian noise N(0, σ²C²) is added and the sum divided by the expected number of
clients. Weights must not depend on the data, so **sparsity weighting is off under DP**.

Each clipped change is its client's alone, so a server folds each reply in as it arrives (``stream_change``,
:class:`hetlora.methods.streaming.ChangeRound`): it holds the global adapter and one float64 sum, never K updates,
and draws the noise once, for the whole sum, when the round closes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..core.adapter import Adapter, ClientUpdate
from ..core.accumulate import PaddedSum
from ..core.dp import check_dp, dp_aggregate, dp_finish, dp_fold
from .base import AggregationContext, AggregationMethod


class DPFedAvg(AggregationMethod):
    bounded = False  # clipping replaces the norm bound
    stream_change = True  # Σ_k clip(δ_k, C): each term its client's alone, folded as it arrives (streaming.ChangeRound)

    def __init__(self, inner: AggregationMethod, clip_norm: float, noise_multiplier: float, expected_clients: int):
        if not inner.dp_capable:
            raise ValueError(f"DP-FedAvg stands in only for a rule that is a weighted sum of zero-padded LoRA factors; "
                             f"{inner.name}'s is not (AggregationMethod.dp_capable)")
        check_dp(clip_norm, noise_multiplier, expected_clients)  # refused before any round, not after its replies
        self.inner = inner
        self.name, self.client_kind, self.uniform_rank = inner.name, inner.client_kind, inner.uniform_rank
        self.prunes = False  # a pruned rank is a data-dependent release the accountant does not cover
        self.clip_norm, self.noise_multiplier, self.expected_clients = clip_norm, noise_multiplier, expected_clients

    def split_valid(self, updates: Sequence[ClientUpdate], ctx: AggregationContext,
                    assigned_ranks: Mapping[str, int] | None = None, round_index: int | None = None, exact_rank: bool = False):
        return self.inner.split_valid(updates, ctx, assigned_ranks, round_index, exact_rank)

    def fold_change(self, acc: PaddedSum, u: ClientUpdate, ctx: AggregationContext) -> None:
        """clip(δ_k, C) added into the round's sum (a round that could not release is refused at its first reply)."""
        dp_fold(acc, u, self._global(ctx), self.clip_norm)

    def finish_changes(self, acc: PaddedSum, clients: int, ctx: AggregationContext) -> Adapter:
        """The noised mean over the *expected* clients (not the ``clients`` that replied: the release's sensitivity
        is fixed in advance, docs/algorithm.md "Privacy")."""
        released = dp_finish(acc, self._global(ctx), clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
                             expected_clients=self.expected_clients, generator=ctx.generator)
        return {k: v.float() for k, v in released.items()}  # fp32, like every aggregate (methods.aggregate_round)

    def finish(self, aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """The wrapped method's own step on the released aggregate (hetlora-svd's re-factoring, hetlora-revive's fresh
        rows): it reads nothing of any client, so it is post-processing of the DP release and the guarantee holds."""
        return self.inner.finish(aggregated, ctx)

    @staticmethod
    def _global(ctx: AggregationContext) -> Mapping:
        """The previous global adapter, refused (before any work on a reply) without it or a seeded generator."""
        if ctx.previous is None or ctx.generator is None:
            raise ValueError("DP aggregation needs the previous global adapter and a seeded generator")
        return ctx.previous

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return dp_aggregate(
            self._global(ctx), updates, ctx.r_max, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
            expected_clients=self.expected_clients, generator=ctx.generator,
        )
