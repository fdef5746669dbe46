"""``flexlora``: FlexLoRA (Bai et al., NeurIPS 2024) — reconstruct, average, SVD-redistribute.

Like ``recon-svd`` (ΔW = Σ q_k B_k A_k, best rank-r_max factors, each client gets
its truncation), with the singular values split evenly between the factors,
B = U√Σ and A = √Σ Vᵀ **[decision]**: both factors then start the next round
at comparable scale, which suits clients that train A and B with one learning
rate. ``split="sigma-on-b"`` gives recon-svd's convention.
"""

from __future__ import annotations

from typing import Sequence

from ..core.adapter import Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod
from .recon_svd import svd_aggregate


class FlexLoRA(AggregationMethod):
    name = "flexlora"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2
    options = ("split",)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        return svd_aggregate(updates, ctx.r_max, split=ctx.options.get("split", "balanced"))
