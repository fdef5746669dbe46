"""recon-svd: the best rank-r_max factors of Σ q_k B_k A_k, checked against a dense SVD; both SVD routes."""

import pytest
import torch

from hetlora import aggregate, truncate_adapter
from hetlora.core.adapter import A_SUFFIX, adapter_rank
from tests.helpers import SHAPES, make_update, product
from tests.methods.helpers import assert_close, dense_average, low_rank_round, q_weights


@pytest.mark.parametrize("r_max", [3, 4])
def test_recon_svd_is_best_rank_r_max_approximation(r_max):
    updates = low_rank_round()
    g = aggregate("recon-svd", updates, r_max=r_max)
    assert adapter_rank(g) == r_max
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        u, s, vh = torch.linalg.svd(target[m])
        k = min(r_max, s.numel())
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert_close(product(g, m), best)
        # B = U Σ, A = Vᵀ: rows of A orthonormal
        a = g[m + A_SUFFIX][:k]
        assert_close(a @ a.T, torch.eye(k, dtype=a.dtype))
        # truncation hands a rank-2 client the best rank-2 approximation
        t = truncate_adapter(g, 2)
        assert_close(product(t, m), (u[:, :2] * s[:2]) @ vh[:2])


def test_recon_svd_exact_when_total_rank_fits():
    updates = [make_update(1, seed=1), make_update(2, seed=2)]
    g = aggregate("recon-svd", updates, r_max=6)
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        assert_close(product(g, m), target[m])


@pytest.mark.parametrize("shape,stacked", [((40, 30), 25), ((30, 40), 25), ((60, 50), 6), ((50, 60), 6)])
def test_both_svd_routes_give_the_exact_top_singular_triplets(shape, stacked):
    """QR + core SVD and the Gram-eigenvector route agree with a dense SVD of B A.

    The Gram is formed from B A for the first two shapes and from the factors for the last two
    (see test_gram_is_formed_the_cheaper_way), on either side."""
    from hetlora.methods.recon_svd import gram_top_svd, low_rank_svd

    g = torch.Generator().manual_seed(3)
    b = torch.randn(shape[0], stacked, generator=g, dtype=torch.float64)
    a = torch.randn(stacked, shape[1], generator=g, dtype=torch.float64)
    dense = torch.linalg.svdvals(b @ a)[:5]
    for route in (lambda: low_rank_svd(b, a), lambda: gram_top_svd(b, a, 5)):
        u, s, vh = route()
        torch.testing.assert_close(s[:5], dense, rtol=1e-9, atol=1e-9)
        best = (u[:, :5] * s[:5]) @ vh[:5]
        torch.testing.assert_close(torch.linalg.svdvals(b @ a - best)[:3], torch.linalg.svdvals(b @ a)[5:8], rtol=1e-8, atol=1e-8)


def test_gram_is_formed_the_cheaper_way():
    from hetlora.methods.recon_svd import gram_flops

    # (out, in, R) -> (from the factors, dense), counted by hand
    assert gram_flops(40, 30, 25) == (25 * 25 * 70 + 30 * 30 * 25, 40 * 30 * 25 + 30 * 30 * 40)  # 66,250 > 66,000: dense
    assert gram_flops(60, 50, 6) == (36 * 110 + 2500 * 6, 3000 * 6 + 2500 * 60)  # 18,960 < 168,000: factors
    factors, dense = gram_flops(576, 576, 550)  # SmolLM2 q/o at 20 clients' stacked rank
    assert dense < factors
    factors, dense = gram_flops(1536, 576, 550)  # gate/up
    assert factors < dense
