"""``fft``: full fine-tuning with FedAvg over all weights — the cost reference.

An "adapter" here is the full set of trainable weights; W^g = Σ q_k W_k.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from ..core.validation import InvalidUpdate
from .base import AggregationMethod, data_weights


class FullFineTuning(AggregationMethod):
    name = "fft"
    client_kind = "fft"

    def validate(self, updates: Sequence[ClientUpdate], r_max: int, shapes: Any = None) -> None:
        reference = {k: v.shape for k, v in updates[0].adapter.items()}
        for u in updates:
            if u.num_examples <= 0:
                raise InvalidUpdate(u.client_id, f"num_examples must be positive, got {u.num_examples}")
            if {k: v.shape for k, v in u.adapter.items()} != reference:
                raise InvalidUpdate(u.client_id, "weights do not match the other clients' keys and shapes")
            for k, v in u.adapter.items():
                if not torch.isfinite(v).all():
                    raise InvalidUpdate(u.client_id, f"{k} contains NaN or Inf")

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        r_max: int,
        *,
        previous: Mapping[str, torch.Tensor] | None = None,
        norm_bound: float | None = None,
        **options: Any,
    ) -> Adapter:
        q = data_weights(updates)
        out: Adapter = {}
        for key, first in updates[0].adapter.items():
            acc = torch.zeros_like(first, dtype=torch.promote_types(first.dtype, torch.float32))
            for w, u in zip(q, updates):
                acc.add_(u.adapter[key], alpha=w)
            out[key] = acc.to(first.dtype)
        return out
