import math

import pytest
import torch

from hetlora import InvalidUpdate, METHODS, aggregate, ClientUpdate, truncate_adapter, zero_pad_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, adapter_rank
from tests.helpers import SHAPES, make_adapter, make_update, product

LORA_METHODS = [m for m in METHODS if m != "fft"]


def assert_close(actual, expected, **kw):
    """Global adapters are fp32 whatever the clients sent; compare at fp32 precision."""
    assert actual.dtype == torch.float32 and not actual.requires_grad
    kw = {"rtol": 1e-5, "atol": 1e-5} | kw
    torch.testing.assert_close(actual, expected.to(torch.float32), **kw)


def mixed_round():
    return [make_update(r, seed=s, n=n) for s, (r, n) in enumerate([(2, 10), (5, 30), (3, 20), (6, 5)])]


def low_rank_round():
    return [make_update(r, seed=10 + s, n=n) for s, (r, n) in enumerate([(2, 10), (3, 30), (1, 20), (3, 5)])]


def dense_average(updates, weights):
    return {m: sum(w * product(u.adapter, m) for w, u in zip(weights, updates)) for m in SHAPES}


def q_weights(updates):
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def test_hetlora_sparsity_weighted_hand_computed():
    # client 1: rank 1, ||B1 A1|| = 5 ; client 2: rank 2, ||B2 A2|| = 2 -> p = (5/7, 2/7); data size ignored
    u1 = ClientUpdate({"m" + B_SUFFIX: torch.tensor([[1.0], [0.0], [0.0]]), "m" + A_SUFFIX: torch.tensor([[3.0, 4.0]])}, 1, "one")
    u2 = ClientUpdate(
        {"m" + B_SUFFIX: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), "m" + A_SUFFIX: torch.tensor([[0.0, 1.0], [1.0, 1.0]])},
        100,
        "two",
    )
    g = aggregate("hetlora", [u1, u2], r_max=3)
    assert_close(g["m" + B_SUFFIX], torch.tensor([[5 / 7, 0, 0], [4 / 7, 0, 0], [0, 0, 0.0]]))
    assert_close(g["m" + A_SUFFIX], torch.tensor([[15 / 7, 22 / 7], [2 / 7, 2 / 7], [0, 0.0]]))


def test_hetlora_falls_back_to_data_weights_when_all_norms_zero():
    updates = mixed_round()
    for u in updates:
        for m in SHAPES:
            u.adapter[m + B_SUFFIX].zero_()
    g = aggregate("hetlora", updates, r_max=6)
    naive = aggregate("hetlora-naive", updates, r_max=6)
    for k in g:
        assert_close(g[k], naive[k])


def test_hetlora_per_layer_weights_differ_from_per_client():
    updates = mixed_round()
    g1 = aggregate("hetlora", updates, r_max=6)
    g2 = aggregate("hetlora", updates, r_max=6, per_layer=True)
    # per-layer: module m's A^g = Σ p_{k,m} pad(A_k) with p_{k,m} ∝ ||B_k A_k||_m
    for m in SHAPES:
        norms = [float(torch.linalg.matrix_norm(product(u.adapter, m))) for u in updates]
        p = [n / sum(norms) for n in norms]
        expected = sum(w * zero_pad_adapter(u.adapter, 6)[m + A_SUFFIX] for w, u in zip(p, updates))
        assert_close(g2[m + A_SUFFIX], expected)
    assert not torch.allclose(g1["layers.0.q_proj" + A_SUFFIX], g2["layers.0.q_proj" + A_SUFFIX])


@pytest.mark.parametrize("method", ["hetlora", "hetlora-naive", "fedavg", "rbla"])
def test_identical_clients_give_the_same_adapter(method):
    ad = make_adapter(4, seed=11)
    updates = [ClientUpdate({k: v.clone() for k, v in ad.items()}, n, f"c{n}") for n in (3, 7, 11)]
    g = aggregate(method, updates, r_max=6)
    for k, v in zero_pad_adapter(ad, 6).items():
        assert_close(g[k], v)


@pytest.mark.parametrize("method", ["recon-svd", "flexlora", "flora"])
def test_identical_clients_give_the_same_update(method):
    ad = make_adapter(4, seed=11)
    updates = [ClientUpdate({k: v.clone() for k, v in ad.items()}, n, f"c{n}") for n in (3, 7)]
    g = aggregate(method, updates, r_max=6)
    for m in SHAPES:
        assert_close(product(g, m), product(ad, m))


def test_homogeneous_naive_equals_fedavg_equals_hand_average():
    updates = [make_update(4, seed=s, n=n) for s, n in enumerate((1, 2, 5))]
    naive = aggregate("hetlora-naive", updates, r_max=4)
    fed = aggregate("fedavg", updates, r_max=4)
    q = q_weights(updates)
    for k in fed:
        assert_close(naive[k], fed[k])
        assert_close(fed[k], sum(w * u.adapter[k] for w, u in zip(q, updates)))


def test_fedavg_refuses_mixed_ranks():
    with pytest.raises(ValueError, match="one rank"):
        aggregate("fedavg", mixed_round(), r_max=6)


def test_naive_zero_pads_mixed_ranks():
    updates = mixed_round()
    g = aggregate("hetlora-naive", updates, r_max=6)
    q = q_weights(updates)
    for k in g:
        assert_close(g[k], sum(w * zero_pad_adapter(u.adapter, 6)[k] for w, u in zip(q, updates)))


def test_flora_is_exact_and_stacks():
    updates = mixed_round()
    g = aggregate("flora", updates, r_max=6)
    assert adapter_rank(g) == 2 + 5 + 3 + 6
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        assert_close(product(g, m), target[m])


def test_ffa_is_exact_under_mixed_ranks():
    shared = make_adapter(6, seed=99)
    updates = []
    for s, (r, n) in enumerate([(2, 10), (5, 30), (6, 5)]):
        ad = truncate_adapter(shared, r)
        for m in SHAPES:  # train B only
            ad[m + B_SUFFIX] = torch.randn(SHAPES[m][0], r, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        updates.append(ClientUpdate(ad, n, f"c{s}"))
    g = aggregate("ffa", updates, r_max=6, previous=shared)
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        assert torch.equal(g[m + A_SUFFIX], shared[m + A_SUFFIX].float())
        assert_close(product(g, m), target[m])
    g2 = aggregate("ffa", updates, r_max=6)  # rebuilt from the rank-6 client
    for k in g:
        assert_close(g[k], g2[k])
    with pytest.raises(ValueError, match="no client covers"):
        aggregate("ffa", updates[:2], r_max=6)


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


def test_flexlora_same_product_as_recon_svd_balanced_factors():
    updates = low_rank_round()
    g = aggregate("flexlora", updates, r_max=3)
    r = aggregate("recon-svd", updates, r_max=3)
    for m in SHAPES:
        assert_close(product(g, m), product(r, m))
        b_norms = g[m + B_SUFFIX].norm(dim=0)
        a_norms = g[m + A_SUFFIX].norm(dim=1)
        assert_close(b_norms, a_norms)  # √Σ on each side


def test_rbla_averages_each_slice_over_its_owners_hand_computed():
    b1, a1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, 2.0]])
    b2, a2 = torch.tensor([[5.0, 7.0], [6.0, 8.0]]), torch.tensor([[3.0, 4.0, 6.0], [1.0, 1.0, 1.0]])
    u1 = ClientUpdate({"m" + B_SUFFIX: b1, "m" + A_SUFFIX: a1}, 1, "a")
    u2 = ClientUpdate({"m" + B_SUFFIX: b2, "m" + A_SUFFIX: a2}, 3, "b")
    g = aggregate("rbla", [u1, u2], r_max=3)
    assert_close(g["m" + B_SUFFIX], torch.tensor([[4.0, 7.0, 0.0], [5.0, 8.0, 0.0]]))
    assert_close(g["m" + A_SUFFIX], torch.tensor([[2.5, 3.0, 5.0], [1.0, 1.0, 1.0], [0, 0, 0.0]]))
    prev = {"m" + B_SUFFIX: torch.full((2, 3), 9.0), "m" + A_SUFFIX: torch.full((3, 3), 9.0)}
    g2 = aggregate("rbla", [u1, u2], r_max=3, previous=prev)
    assert torch.all(g2["m" + B_SUFFIX][:, 2] == 9) and torch.all(g2["m" + A_SUFFIX][2] == 9)


@pytest.mark.parametrize("method", LORA_METHODS)
def test_every_method_validates_before_arithmetic(method):
    updates = [make_update(3, seed=1), make_update(3, seed=2, cid="evil")]
    updates[1].adapter["layers.0.q_proj" + B_SUFFIX][0, 0] = math.nan
    with pytest.raises(InvalidUpdate, match="evil"):
        aggregate(method, updates, r_max=6)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method"):
        aggregate("fedprox", mixed_round(), r_max=6)
    with pytest.raises(TypeError, match="per_layer"):
        aggregate("fedavg", [make_update(2)], r_max=6, per_layer=True)


def test_fft_averages_full_weights():
    w1 = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0])}
    w2 = {"w": torch.tensor([[3.0, 6.0]]), "b": torch.tensor([4.0])}
    g = aggregate("fft", [ClientUpdate(w1, 1, "a"), ClientUpdate(w2, 3, "b")], r_max=1)
    assert_close(g["w"], torch.tensor([[2.5, 5.0]]))
    assert_close(g["b"], torch.tensor([3.0]))
    w2["w"][0, 0] = math.inf
    with pytest.raises(InvalidUpdate, match="b"):
        aggregate("fft", [ClientUpdate(w1, 1, "a"), ClientUpdate(w2, 3, "b")], r_max=1)


@pytest.mark.parametrize("method", ["flora", "ffa", "hetlora", "rbla"])
def test_half_precision_uploads_are_accumulated_in_fp32(method):
    """bf16 clients: the aggregate equals aggregating the same (bf16-valued) numbers in fp32."""
    updates = [make_update(r, seed=s, n=n) for s, (r, n) in enumerate([(6, 10), (3, 30), (5, 20)])]
    if method == "ffa":  # FFA clients share A
        shared = make_adapter(6, seed=50)
        for u in updates:
            r = adapter_rank(u.adapter)
            for m in SHAPES:
                u.adapter[m + A_SUFFIX] = shared[m + A_SUFFIX][:r].clone()
    low = [ClientUpdate({k: v.to(torch.bfloat16) for k, v in u.adapter.items()}, u.num_examples, u.client_id) for u in updates]
    wide = [ClientUpdate({k: v.float() for k, v in u.adapter.items()}, u.num_examples, u.client_id) for u in low]
    got, expected = aggregate(method, low, r_max=6), aggregate(method, wide, r_max=6)
    for k in expected:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", LORA_METHODS)
def test_global_adapter_is_fp32_and_detached_whatever_the_clients_send(method):
    updates = [make_update(r, seed=s, n=n) for s, (r, n) in enumerate([(3, 10), (3, 30)])]  # float64 first
    for u in updates:
        for t in u.adapter.values():
            t.requires_grad_(True)
    kw = {"previous": zero_pad_adapter({k: v.detach() for k, v in updates[0].adapter.items()}, 6)} if method in ("ffa", "fslora") else {}
    g = aggregate(method, updates, r_max=6, **kw)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in g.values())


@pytest.mark.parametrize(
    "corrupt,problem",
    [
        (lambda t: t.numpy(), "must be a torch tensor, got numpy.ndarray"),
        (lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
        (lambda t: t.to(torch.float8_e4m3fn), "float8_e4m3fn"),
        (lambda t: t.to_sparse(), "dense"),
        (lambda t: t[None], "3-D"),
    ],
)
def test_odd_tensors_in_an_update_name_the_client(corrupt, problem):
    updates = [make_update(3, seed=1, cid="good"), make_update(3, seed=2, cid="odd")]
    key = next(iter(updates[1].adapter))
    updates[1].adapter[key] = corrupt(updates[1].adapter[key].float())
    with pytest.raises(InvalidUpdate, match=f"client odd: .*{problem}"):
        aggregate("hetlora", updates, r_max=6)


@pytest.mark.parametrize("count,ok", [(np_int := __import__("numpy").int64(7), True), (torch.tensor(7), True), (7, True),
                                      (7.0, False), (7.5, False), (True, False), (0, False), (torch.tensor(7.0), False)])
def test_example_counts_accept_integers_of_any_library(count, ok):
    updates = [make_update(3, seed=1, cid="a"), ClientUpdate(make_adapter(3, seed=2), count, "b")]
    if ok:
        g = aggregate("hetlora-naive", updates, r_max=3)
        for k in g:
            assert_close(g[k], 10 / 17 * updates[0].adapter[k] + 7 / 17 * updates[1].adapter[k])
    else:
        with pytest.raises(InvalidUpdate, match="client b: num_examples must be a positive integer"):
            aggregate("hetlora-naive", updates, r_max=6)


def test_a_client_claiming_huge_data_is_capped_under_the_norm_bound():
    """num_examples = 10³⁰ must not make a data-weighted average that client's adapter."""
    honest = [make_update(3, seed=s, n=n, cid=f"h{s}") for s, n in enumerate([10, 12, 9])]
    liar = make_update(3, seed=9, n=10**30, cid="liar")
    # factors within the bound (the liar's B is 1.2× the others'), so only the data weights matter
    for u in honest + [liar]:
        u.adapter = {k: v.clone() for k, v in make_adapter(3, seed=5).items()}
        u.adapter = {k: v * (1.2 if u.client_id == "liar" and k.endswith(B_SUFFIX) else 1.0) for k, v in u.adapter.items()}
    g = aggregate("fedavg", honest + [liar], r_max=3, norm_bound=1.5)
    # capped at 1.5 × the lower median (10) = 15 of 46 examples, not 10³⁰ of 10³⁰ + 31
    b = make_adapter(3, seed=5)
    for k in g:
        expected = b[k] * (31 / 46 + 1.2 * 15 / 46) if k.endswith(B_SUFFIX) else b[k]
        assert_close(g[k], expected, rtol=1e-5)


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
