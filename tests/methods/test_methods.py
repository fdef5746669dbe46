"""Every method through the registry: identical clients, validation before arithmetic, fp32 detached aggregates,
odd tensors and example counts named per client, capped data weights, one registration per method."""

import math

import pytest
import torch

from hetlora import METHODS, ClientUpdate, InvalidUpdate, aggregate, zero_pad_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, adapter_rank
from tests.helpers import SHAPES, make_adapter, make_update, product
from tests.methods.helpers import LORA_METHODS, assert_close, low_rank_round, mixed_round


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


def round_context(method: str) -> dict:
    """The round's context for a method that needs it (fslora re-derives its sketches from seed and round)."""
    from hetlora.methods import get_method

    return {"seed": 0, "round_index": 1} if get_method(method).needs_round else {}


@pytest.mark.parametrize("method", LORA_METHODS)
def test_every_method_validates_before_arithmetic(method):
    updates = [make_update(3, seed=1), make_update(3, seed=2, cid="evil")]
    updates[1].adapter["layers.0.q_proj" + B_SUFFIX][0, 0] = math.nan
    with pytest.raises(InvalidUpdate, match="evil"):
        aggregate(method, updates, r_max=6, **round_context(method))


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method"):
        aggregate("fedprox", mixed_round(), r_max=6)
    with pytest.raises(TypeError, match="per_layer"):
        aggregate("fedavg", [make_update(2)], r_max=6, per_layer=True)


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
    g = aggregate(method, updates, r_max=6, **kw, **round_context(method))
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


def test_every_method_is_registered_once_with_a_client_kind():
    from hetlora.clients import CLIENT_KINDS

    assert {"rb-lora", "fslora", "fedex-lora", "hetlora-keep"} <= set(METHODS)
    assert all(m.client_kind in CLIENT_KINDS for m in METHODS.values())
    ups = [ClientUpdate(zero_pad_adapter(u.adapter, 4), u.num_examples, u.client_id) for u in low_rank_round()]
    assert aggregate("hetlora-keep", ups, r_max=4)  # runs on any valid round, trailing zero components included


def test_which_methods_clients_can_prune_and_which_footprint_they_have():
    """Listed by hand from the client kinds: LoRA clients at their own rank prune (ffa trains B of such an adapter);
    HomLoRA's one rank, flora / fslora / plora / fft clients do not. Footprints: a LoRA over a frozen base (fslora's
    clients train one of their sketch's rank), the same over dense weights a base delta is folded into (the methods
    that fold), Fed-PLoRA's client (receives every module, folds the unselected); fft's rank does not set its memory."""
    own_rank_lora = {"hetlora", "hetlora-naive", "recon-svd", "flexlora", "rbla", "hetlora-keep", "rb-lora", "fedex-lora",
                     "hetlora-svd", "hetlora-revive", "hetlora-svd-revive", "ffa"}
    assert {n for n, m in METHODS.items() if m.can_prune} == own_rank_lora
    folding = {"fedex-lora", "flora", "florist"}
    expected = {n: "lora" for n in (own_rank_lora - folding) | {"fedavg", "fslora"}} | {n: "folding" for n in folding} | {"fed-plora": "plora", "fft": None}
    assert {n: m.footprint_client for n, m in METHODS.items()} == expected
    assert {n for n, m in METHODS.items() if not m.footprint_calibrated} == {"fft"}
