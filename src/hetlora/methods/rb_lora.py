"""``rb-lora``: RB-LoRA, rank-balanced aggregation (Ha, Oh & Jeon, Findings of EACL 2026;
docs/algorithm.md, "rb-lora").

Rank component j of client k is weighted by γ_j(k) = n_k / N_j, N_j = Σ_{i: r_i > j} n_i
(0-based j): the data share α_k = n_k / N times the rank-rarity factor β_j = N / N_j,
so every component is a data-weighted average over the clients that have it and
high-rank components are not diluted by the clients that lack them. The weights apply
to each rank-one product B_k[:, j] A_k[j, :]:

    ΔW = Σ_k Σ_{j < r_k} γ_j(k) · B_k[:, j] A_k[j, :] = Σ_k B_k diag(γ(k)) A_k,

and the server keeps ΔW's best rank-r_max factors (U Σ, Vᵀ, computed from the stacked
factors as recon-svd does), so truncating the global adapter hands client k the SVD of the
global product truncated to its rank — the authors' redistribution.

**Where we differ from the authors' released code** (seonha01/rb-lora, read 2026-11-27):
its aggregation routes "RB-LoRA" to a plain data-weighted average of zero-padded factors and
never calls its own rank-rarity helper (``compute_column_weights_from_ranks``); its SVD
redistribution takes rows of V where rows of Vᵀ are meant, and saves keys PEFT does not load.
We implement the rule the paper describes, with the helper's β_j (same 0-based indexing,
"rank ≥ j" 1-based), product-space weighting (the paper's rank-one decomposition), N_j over
the round's clients (so each component's weights sum to 1 under partial participation; the
helper sums over every configured client) and a correct Vᵀ. Our scaling is s = α/r = c
at every rank, so no α/r correction is needed when a client receives its truncation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, adapter_rank
from .base import AggregationContext, AggregationMethod, per_module_factors
from .recon_svd import svd_factors


def rank_balanced_weights(ranks: Sequence[int], sizes: Sequence[int]) -> list[torch.Tensor]:
    """γ(k)_j = n_k / Σ_{i: r_i > j} n_i for j < r_k: client k's weight on each of its components."""
    r_max = max(ranks)
    covering = torch.zeros(r_max, dtype=torch.float64)
    for r, n in zip(ranks, sizes):
        covering[:r] += n
    return [n / covering[:r] for r, n in zip(ranks, sizes)]


class RBLoRA(AggregationMethod):
    name = "rb-lora"
    module_separable = True  # per-module rule, per-client weights (n_k, r_k): docs/algorithm.md §7.2

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        gammas = rank_balanced_weights([adapter_rank(u.adapter) for u in updates], [u.num_examples for u in updates])
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            stacked_b = torch.cat([b.double() * g[None, :] for g, (b, _) in zip(gammas, factors)], dim=1)
            stacked_a = torch.cat([a.double() for _, a in factors], dim=0)
            b_g, a_g = svd_factors(stacked_b, stacked_a, ctx.r_max, "sigma-on-b")
            out[module + B_SUFFIX], out[module + A_SUFFIX] = b_g.float(), a_g.float()
        return out
