"""``flexlora``: FlexLoRA (Bai et al., NeurIPS 2024) — reconstruct, average, SVD-redistribute.

Like ``recon-svd`` (ΔW = Σ q_k B_k A_k, best rank-r_max factors, each client gets
its truncation), with the singular values split evenly between the factors,
B = U√Σ and A = √Σ Vᵀ **[decision]**: both factors then start the next round
at comparable scale, which suits clients that train A and B with one learning
rate. ``split="sigma-on-b"`` gives recon-svd's convention.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationMethod
from .recon_svd import svd_aggregate


class FlexLoRA(AggregationMethod):
    name = "flexlora"
    options = ("split",)

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        r_max: int,
        *,
        previous: Mapping[str, torch.Tensor] | None = None,
        norm_bound: float | None = None,
        split: str = "balanced",
        **options: Any,
    ) -> Adapter:
        return svd_aggregate(updates, r_max, split=split)
