"""``fft``: full fine-tuning with FedAvg over all weights — the cost reference.

An "adapter" here is the full set of trainable weights; W^g = Σ q_k W_k.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from ..core.validation import InvalidUpdate
from .base import AggregationContext, AggregationMethod, data_weights


def _weights_problem(update: ClientUpdate, reference: dict[str, torch.Size]) -> str | None:
    if not isinstance(update.num_examples, int) or isinstance(update.num_examples, bool) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    if {k: v.shape for k, v in update.adapter.items()} != reference:
        return "weights do not match the other clients' keys and shapes"
    for k, v in update.adapter.items():
        if not torch.isfinite(v).all():
            return f"{k} contains NaN or Inf"
    return None


class FullFineTuning(AggregationMethod):
    name = "fft"
    client_kind = "fft"
    bounded = False

    def split_valid(
        self,
        updates: Sequence[ClientUpdate],
        ctx: AggregationContext,
        assigned_ranks: Mapping[str, int] | None = None,
        round_index: int | None = None,
    ) -> tuple[list[ClientUpdate], list[tuple[str | None, str]]]:
        """Full weights: every client must send the first valid client's keys and shapes, finite."""
        kept: list[ClientUpdate] = []
        dropped: list[tuple[str | None, str]] = []
        for u in updates:
            reference = {k: v.shape for k, v in (kept[0] if kept else u).adapter.items()}
            problem = _weights_problem(u, reference)
            if problem is None:
                kept.append(u)
            else:
                dropped.append((u.client_id, problem))
        return kept, dropped

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
