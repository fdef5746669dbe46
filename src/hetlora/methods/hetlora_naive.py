"""``hetlora-naive``: zero-pad + truncate with data-size weights q_k and no pruning.

What most follow-up papers ran as "HetLoRA" (SPEC.md, Methods): the high-rank
slices are diluted by the zeros of low-rank clients.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationMethod, data_weights, weighted_padded_sum


class HetLoRANaive(AggregationMethod):
    name = "hetlora-naive"

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        r_max: int,
        *,
        previous: Mapping[str, torch.Tensor] | None = None,
        norm_bound: float | None = None,
        **options: Any,
    ) -> Adapter:
        return weighted_padded_sum(updates, r_max, data_weights(updates))
