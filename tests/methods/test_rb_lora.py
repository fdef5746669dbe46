"""rb-lora against a hand-computed case run through the authors' code (docs/algorithm.md says where we follow the paper)."""

import numpy as np
import pytest
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.methods.rb_lora import rank_balanced_weights
from hetlora.methods.recon_svd import svd_factors
from tests.methods.helpers import M, T, prod, update

RB = [update([[1], [2], [3]], [[1, 2]], 1, "c0"), update([[1, 0], [0, 1], [1, 1]], [[0, 1], [1, 1]], 3, "c1")]


def test_rb_lora_weights_are_the_authors_rank_rarity_times_data_share():
    """Their helper compute_column_weights_from_ranks gives β = (N/N_1, N/N_2) = (1, 4/3) for
    ranks (1, 2), sizes (1, 3); γ_j(k) = α_k β_j with α_k = n_k / N."""
    g = rank_balanced_weights([1, 2], [1, 3])
    beta, n = [1.0, 4 / 3], [1, 3]
    assert g[0].tolist() == pytest.approx([n[0] / 4 * beta[0]])
    assert g[1].tolist() == pytest.approx([n[1] / 4 * beta[0], n[1] / 4 * beta[1]])


def test_rb_lora_global_product_is_the_rank_balanced_sum():
    """ΔW = Σ_k Σ_j γ_j(k) b_kj a_kjᵀ = [[0.25,1.25],[1.5,2.0],[1.75,3.25]] (the paper's product-space rule;
    the authors' released aggregation, a plain factor average, would give B̄Ā = [[.25,1.25],[.6875,1.1875],[.9375,2.4375]])."""
    g = aggregate("rb-lora", RB, r_max=2)
    torch.testing.assert_close(prod(g), T([[0.25, 1.25], [1.5, 2.0], [1.75, 3.25]]), rtol=1e-5, atol=1e-6)


def test_rb_lora_hands_each_client_the_truncated_svd_of_the_global_product():
    """Truncating the global to rank 1 is the best rank-1 approximation; on the authors' product P their
    (V-fixed) redistribution gives client 0 [[0.4533,1.1713],[0.4893,1.2642],[0.9426,2.4355]]."""
    g = aggregate("rb-lora", RB, r_max=2)
    u, s, vh = np.linalg.svd(prod(g).numpy())
    best = s[0] * np.outer(u[:, 0], vh[0])
    trunc = g[M + B_SUFFIX][:, :1].double() @ g[M + A_SUFFIX][:1].double()
    np.testing.assert_allclose(trunc.numpy(), best, rtol=1e-5, atol=1e-6)
    p = T([[0.25, 1.25], [0.6875, 1.1875], [0.9375, 2.4375]])
    b, a = svd_factors(p, torch.eye(2, dtype=torch.float64), 1)
    np.testing.assert_allclose((b @ a).numpy(), [[0.4533, 1.1713], [0.4893, 1.2642], [0.9426, 2.4355]], atol=1e-4)
