"""``fft``: full fine-tuning with FedAvg over all weights — the cost reference.

An "adapter" here is the full set of trainable weights; W^g = Σ q_k W_k. The norm bound
applies to each tensor's change from the global weights (docs/algorithm.md §5).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from ..core.robust import bound_changes, cap_examples, median
from ..core.validation import FLOAT_DTYPES, InvalidUpdate, example_count, split_by
from .base import AggregationContext, AggregationMethod, data_weights


def _weights_problem(update: ClientUpdate, reference: dict[str, torch.Size] | None) -> str | None:
    if example_count(update.num_examples) is None:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    if not isinstance(update.adapter, Mapping) or not update.adapter:
        return "weights are empty or not a mapping of tensors"
    for k, v in update.adapter.items():
        if not isinstance(v, torch.Tensor) or v.is_meta or v.dtype not in FLOAT_DTYPES:
            return f"{k} must be a floating-point torch tensor with data"
    if reference is not None and {k: v.shape for k, v in update.adapter.items()} != reference:
        return "weights do not match the other clients' keys and shapes"
    for k, v in update.adapter.items():
        if not torch.isfinite(v).all():
            return f"{k} contains NaN or Inf"
    return None


class FullFineTuning(AggregationMethod):
    name = "fft"
    client_kind = "fft"
    trains_rank_components = False  # a dense client: no rank components to drop

    def bound(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> list[ClientUpdate]:
        """The norm bound on each tensor's change from the global weights the client was sent
        (a client's ‖W_k − W‖ per tensor against the round's median), and on the data weights."""
        if ctx.previous is None:
            raise ValueError("fft's norm bound needs the previous global weights (pass previous=...)")
        changes = [{k: v.float() - ctx.previous[k].float() for k, v in u.adapter.items()} for u in updates]
        bounded = bound_changes(updates, changes, ctx.norm_bound, group=lambda key: key)
        med_n = median(u.num_examples for u in updates)
        return [replace(u, adapter={k: (ctx.previous[k].float() + d).to(u.adapter[k].dtype) for k, d in change.items()},
                        num_examples=cap_examples(u.num_examples, med_n, ctx.norm_bound))
                for u, change in zip(updates, bounded)]

    def split_valid(
        self,
        updates: Sequence[ClientUpdate],
        ctx: AggregationContext,
        assigned_ranks: Mapping[str, int] | None = None,
        round_index: int | None = None,
        exact_rank: bool = False,
    ) -> tuple[list[ClientUpdate], list[tuple[str | None, str]]]:
        """Full weights: every client must send the first valid client's keys and shapes, finite (through the
        one validation loop, :func:`hetlora.core.validation.split_by`)."""
        reference: dict[str, torch.Size] = {}

        def check(u: ClientUpdate) -> None:
            problem = _weights_problem(u, reference or None)
            if problem is not None:
                raise InvalidUpdate(u.client_id, problem)
            if not reference:
                reference.update({k: v.shape for k, v in u.adapter.items()})

        return split_by(updates, check, round_index)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        q = data_weights(updates)
        out: Adapter = {}
        for key, first in updates[0].adapter.items():
            acc = torch.zeros_like(first, dtype=torch.promote_types(first.dtype, torch.float32))
            for w, u in zip(q, updates):
                acc.add_(u.adapter[key], alpha=w)
            out[key] = acc.to(first.dtype)
        return out


__all__ = ["FullFineTuning", "InvalidUpdate"]
