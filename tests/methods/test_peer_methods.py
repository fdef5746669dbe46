"""rb-lora, fslora, fedex-lora and hetlora-keep against small hand-computed cases (non-square, mixed ranks).

Each case is the worked example we ran through the authors' code (see docs/algorithm.md):
where their code and their paper disagree, the docstring says which one the number follows.
"""

import numpy as np
import pytest
import torch

from hetlora import ClientUpdate, aggregate, zero_pad_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.base_delta import dense_delta, fold
from hetlora.methods import AggregationContext, METHODS
from hetlora.methods.rb_lora import rank_balanced_weights
from hetlora.methods.recon_svd import svd_factors

M = "m"
T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


def update(b, a, n, cid):
    return ClientUpdate({M + B_SUFFIX: T(b), M + A_SUFFIX: T(a)}, n, cid)


def prod(adapter):
    return adapter[M + B_SUFFIX].double() @ adapter[M + A_SUFFIX].double()


# ---------------------------------------------------------------------------------- rb-lora
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


# ---------------------------------------------------------------------------------- fedex-lora
FEDEX = [update([[1, 0], [0, 1], [1, 1]], [[1, 0, 0, 1], [0, 1, 0, 0]], 5, "c0"),
         update([[0, 1], [1, 0], [2, 0]], [[0, 0, 1, 0], [1, 1, 0, 0]], 50, "c1")]


def test_fedex_lora_averages_factors_and_folds_the_exact_residual():
    """The authors' worked example (uniform weights whatever n_k): R = M − B̄Ā is rank one."""
    method, ctx = METHODS["fedex-lora"], AggregationContext(r_max=2)
    g = aggregate("fedex-lora", FEDEX, r_max=2)
    torch.testing.assert_close(g[M + A_SUFFIX].double(), T([[0.5, 0, 0.5, 0.5], [0.5, 1, 0, 0]]))
    torch.testing.assert_close(g[M + B_SUFFIX].double(), T([[0.5, 0.5], [0.5, 0.5], [1.5, 0.5]]))
    residual = dense_delta(fold(None, method.base_update(FEDEX, g, ctx)), M).double()
    torch.testing.assert_close(residual, T([[0.5, 0, -0.25, 0.25], [-0.5, 0, 0.25, -0.25], [-0.5, 0, 0.25, -0.25]]), atol=1e-6, rtol=0)


def test_fedex_lora_is_exact_under_mixed_ranks():
    """Zero-padding extends it: W0 + s(R + B̄Ā) = W0 + s·mean_k B_k A_k, whatever the ranks."""
    g0 = torch.Generator().manual_seed(0)
    ups = [ClientUpdate({M + B_SUFFIX: torch.randn(7, r, generator=g0), M + A_SUFFIX: torch.randn(r, 5, generator=g0)}, 10, f"c{r}")
           for r in (1, 3, 4)]
    ctx = AggregationContext(r_max=4)
    g = aggregate("fedex-lora", ups, r_max=4)
    residual = dense_delta(fold(None, METHODS["fedex-lora"].base_update(ups, g, ctx)), M).double()
    mean = sum(prod(u.adapter) for u in ups) / 3
    torch.testing.assert_close(residual + prod(g), mean, rtol=1e-5, atol=1e-5)


def test_base_delta_switches_to_dense_when_factors_would_be_larger():
    g0 = torch.Generator().manual_seed(1)
    delta = None
    total = torch.zeros(6, 4, dtype=torch.float64)
    for step in range(4):  # rank grows 1, 2, 3 (3·(6+4) ≥ 24 → dense) ...
        b, a = torch.randn(6, 1, generator=g0), torch.randn(1, 4, generator=g0)
        delta = fold(delta, {M + B_SUFFIX: b, M + A_SUFFIX: a})
        total += b.double() @ a.double()
        torch.testing.assert_close(dense_delta(delta, M).double(), total, rtol=1e-5, atol=1e-6)
    assert M + ".base_delta.weight" in delta and M + B_SUFFIX not in delta


# ---------------------------------------------------------------------------------- fslora
B0 = [[1, 0, 2], [0, 1, -1]]
A0 = [[1, 0, 0, 1], [0, 1, 1, 0], [1, -1, 0, 0]]


def test_fslora_server_step_matches_the_authors_worked_example(monkeypatch):
    """r = 3, sketches I_1 = {1} (m=1), I_2 = {0, 2} (m=2), server SGD η = 1 over K = 2 clients:
    component 1 was drawn by one client and is still divided by K (as in their code)."""
    from hetlora.methods import fslora

    sketches = {"c1": [1], "c2": [0, 2]}
    monkeypatch.setattr(fslora, "sketch_indices", lambda seed, t, cid, m, r: sketches[cid])
    c1 = update([[0.3], [0.4]], [[0, 0.4, 1, -0.3]], 10, "c1")
    c2 = update([[0.85, 2.15], [-0.15, -1.15]], [[1, -0.15, 0, 0.85], [1.15, -1.3, 0.15, -0.3]], 99, "c2")
    previous = {M + B_SUFFIX: T(B0).float(), M + A_SUFFIX: T(A0).float()}
    g = aggregate("fslora", [c1, c2], r_max=3, previous=previous)
    torch.testing.assert_close(g[M + B_SUFFIX].double(), T([[0.925, 0.15, 2.075], [-0.075, 0.7, -1.075]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g[M + A_SUFFIX].double(), T([[1, -0.075, 0, 0.925], [0, 0.7, 1, -0.15], [1.075, -1.15, 0.075, -0.15]]), atol=1e-6, rtol=0)


def test_fslora_sketches_are_seeded_uniform_and_sized_by_the_budget():
    from hetlora.methods.fslora import sketch_indices

    s = sketch_indices(0, 3, "client", 4, 10)
    assert s == sketch_indices(0, 3, "client", 4, 10) and len(set(s)) == 4 and all(0 <= i < 10 for i in s)
    assert s != sketch_indices(0, 4, "client", 4, 10) or s != sketch_indices(1, 3, "client", 4, 10)
    counts = np.zeros(10)
    for t in range(2000):
        counts[sketch_indices(0, t, "c", 3, 10)] += 1
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600  # each component drawn ~ m/r of the time


# ---------------------------------------------------------------------------------- hetlora-keep
def test_hetlora_keep_renormalises_per_slice_and_keeps_uncovered_components():
    """p = (5/7, 2/7) from ‖B_k A_k‖ = (5, 2); component 0: both clients; component 1: only client two
    (weight renormalised to 1); component 2: nobody, so the previous global value stays."""
    u1 = update([[1.0], [0.0], [0.0]], [[3.0, 4.0]], 1, "one")
    u2 = update([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]], 100, "two")
    previous = {M + B_SUFFIX: torch.full((3, 3), 7.0), M + A_SUFFIX: torch.full((3, 2), 9.0)}
    g = aggregate("hetlora-keep", [u1, u2], r_max=3, previous=previous)
    torch.testing.assert_close(g[M + B_SUFFIX], torch.tensor([[5 / 7, 0, 7], [4 / 7, 0, 7], [0, 0, 7.0]]))
    torch.testing.assert_close(g[M + A_SUFFIX], torch.tensor([[15 / 7, 22 / 7], [1.0, 1.0], [9.0, 9.0]]))
    plain = aggregate("hetlora", [u1, u2], r_max=3)  # zero-padding: components 1 and 2 shrink or die
    assert float(plain[M + A_SUFFIX][2].abs().sum()) == 0 and float(plain[M + A_SUFFIX][1, 0]) == pytest.approx(2 / 7)


def test_every_method_is_registered_once_with_a_client_kind():
    from hetlora.clients import CLIENT_KINDS

    assert {"rb-lora", "fslora", "fedex-lora", "hetlora-keep"} <= set(METHODS)
    assert all(m.client_kind in CLIENT_KINDS for m in METHODS.values())
    ups = [ClientUpdate(zero_pad_adapter(u.adapter, 2), u.num_examples, u.client_id) for u in RB]
    assert aggregate("hetlora-keep", ups, r_max=2)  # runs on any valid round
