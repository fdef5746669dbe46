"""A round aggregated as its replies arrive (hetlora.methods.streaming) against the list reference
(:func:`hetlora.methods.aggregate_round`): the same aggregate within float rounding, for every streaming
method, bound on and off, with an inflated client the bound must scale and a first round whose norms are
all zero; validation drops the same replies with the same reasons; nothing keeps an update's tensors."""

from dataclasses import replace

import pytest
import torch

from hetlora import METHODS
from hetlora.core.adapter import adapter_rank
from hetlora.core.validation import split_valid
from hetlora.methods import aggregate_round
from hetlora.methods.base import AggregationContext
from hetlora.methods.streaming import ModulewiseRound, StreamedRound, modulewise, stream_round, streams
from tests.helpers import SHAPES, make_update

class MemoryStore:
    """A ReplyStore that keeps the updates in memory (a server spills them to disk: hetlora.server.spill)."""

    def __init__(self):
        self._held = {}

    def put(self, index, update):
        self._held[index] = update

    def take(self, index):
        return self._held.pop(index)

    def read(self, index, keys):
        return {key: self._held[index].adapter[key] for key in keys}


STREAMING = [name for name, m in METHODS.items() if m.stream_weight is not None]
MODULEWISE = [name for name, m in METHODS.items() if m.module_separable]
R_MAX = 8


def test_the_weighted_sum_family_streams_and_the_others_do_not():
    # hetlora's re-factoring variants finish the same sum (their finish needs only the aggregate)
    assert sorted(STREAMING) == ["fedavg", "fedex-lora", "hetlora", "hetlora-keep", "hetlora-naive", "hetlora-revive", "hetlora-svd",
                                 "hetlora-svd-revive"]
    assert not streams(METHODS["hetlora"], AggregationContext(r_max=R_MAX, options={"per_layer": True}))


def a_round(method: str, attacker: bool = False, zero_b: bool = False):
    ranks = [4] * 7 if METHODS[method].uniform_rank else [2, 8, 5, 3, 6, 4, 8]
    updates = [make_update(r, seed=s, n=10 + 7 * s) for s, r in enumerate(ranks)]
    if attacker:  # ‖B‖ × 1e3 and a claim of 10⁹ examples: the bound must scale both
        updates[2] = replace(updates[2], adapter={k: v * (1e3 if k.endswith("lora_B.weight") else 1.0) for k, v in updates[2].adapter.items()},
                             num_examples=10**9)
    if zero_b:  # the first round: every B is zero, so every ‖ΔW‖ is
        updates = [replace(u, adapter={k: v * 0 if k.endswith("lora_B.weight") else v for k, v in u.adapter.items()}) for u in updates]
    return updates


def checker(ctx):
    def check(update):
        kept, dropped = split_valid([update], ctx.r_max, SHAPES, round_index=0)
        if dropped:
            from hetlora.core.validation import InvalidUpdate

            raise InvalidUpdate(*dropped[0])
        return kept[0]

    return check


def streamed(method: str, updates, ctx):
    store = MemoryStore()
    round_ = stream_round(METHODS[method], ctx, iter(updates), checker(ctx), store)
    result = round_.result()
    assert not store._held  # each stored update was taken back once
    assert all(u.adapter == {} for u in round_.kept)  # the round keeps no update's tensors
    return result, round_


@pytest.mark.parametrize("method", STREAMING)
@pytest.mark.parametrize("bound", [None, 1.5])
@pytest.mark.parametrize("case", ["honest", "attacker", "first round"])
def test_a_streamed_round_is_the_list_rounds_aggregate(method, bound, case):
    updates = a_round(method, attacker=case == "attacker", zero_b=case == "first round")
    ctx = AggregationContext(r_max=R_MAX, norm_bound=bound, shapes=SHAPES)
    expected, _ = aggregate_round(METHODS[method], updates, ctx)
    got, round_ = streamed(method, updates, ctx)
    assert sorted(got) == sorted(expected)
    for key in expected:
        scale = float(expected[key].abs().max())
        assert scale > 0 or case == "first round"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6 * max(scale, 1e-30))
    assert [u.client_id for u in round_.kept] == [u.client_id for u in updates]
    if case == "attacker" and bound is not None:  # the bound was at work: unbounded, the attacker moves the result
        unbounded, _ = aggregate_round(METHODS[method], updates, replace(ctx, norm_bound=None))
        assert any(not torch.allclose(unbounded[k], expected[k], rtol=1e-3) for k in expected)


@pytest.mark.parametrize("bound", [None, 1.5])
@pytest.mark.parametrize("case", ["honest", "attacker", "first round"])
def test_hetlora_keeps_streamed_slice_average_keeps_the_components_no_client_reached(bound, case):
    """No client of the round reaches rank 7 or 8 of r_max 8: those components keep the previous global's values, the
    others are each averaged over the clients that reached them, as the list rule does (masses of the client weights,
    not of a bound's scales)."""
    updates = [u for u in a_round("hetlora-keep", attacker=case == "attacker", zero_b=case == "first round") if adapter_rank(u.adapter) != 8]
    previous = make_update(R_MAX, seed=99).adapter
    ctx = AggregationContext(r_max=R_MAX, norm_bound=bound, shapes=SHAPES, previous=previous)
    expected, _ = aggregate_round(METHODS["hetlora-keep"], updates, ctx)
    got, _ = streamed("hetlora-keep", updates, ctx)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6 * float(expected[key].abs().max()))
        kept = got[key][6:] if key.endswith("lora_A.weight") else got[key][:, 6:]
        old = previous[key][6:] if key.endswith("lora_A.weight") else previous[key][:, 6:]
        assert torch.equal(kept, old.float())  # rank 7 and 8: nobody reached them (fp32, as every aggregate)
    hetlora, _ = streamed("hetlora", updates, replace(ctx, previous=None))
    assert any(not torch.allclose(hetlora[k], got[k]) for k in got)  # not the zero-padded mean


@pytest.mark.parametrize("bound", [None, 1.5])
def test_a_stream_drops_the_replies_the_list_drops_with_the_same_reasons(bound):
    updates = a_round("hetlora")
    bad_shape = replace(updates[1], adapter={k: torch.zeros(3, 3) if i == 0 else v for i, (k, v) in enumerate(updates[1].adapter.items())})
    nan = replace(updates[3], adapter={k: v * float("nan") for k, v in updates[3].adapter.items()})
    replies = [updates[0], bad_shape, updates[2], nan, updates[4], updates[0], replace(updates[5], round=3)]
    ctx = AggregationContext(r_max=R_MAX, norm_bound=bound, shapes=SHAPES)
    _, list_dropped = split_valid(replies, R_MAX, SHAPES, round_index=0)
    got, round_ = streamed("hetlora", replies, ctx)
    assert round_.dropped == list_dropped and len(round_.dropped) == 4
    expected, _ = aggregate_round(METHODS["hetlora"], [updates[0], updates[2], updates[4]], ctx)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_round_without_a_valid_reply_has_no_aggregate_and_a_bounded_one_needs_a_store():
    ctx = AggregationContext(r_max=R_MAX, shapes=SHAPES)
    round_ = StreamedRound(METHODS["hetlora"], ctx, checker(ctx))
    assert round_.result() is None
    with pytest.raises(ValueError, match="needs a ReplyStore"):
        StreamedRound(METHODS["hetlora"], replace(ctx, norm_bound=1.5), checker(ctx))
    with pytest.raises(ValueError, match="aggregates a list"):
        StreamedRound(METHODS["recon-svd"], ctx, checker(ctx))


def test_an_overflowing_norm_drops_its_client_not_the_round():
    """A finite update whose ‖ΔW‖ overflows (as the list rule's drop-and-retry does): dropped by name."""
    updates = a_round("hetlora")
    huge = replace(updates[2], adapter={k: v * 1e200 for k, v in updates[2].adapter.items()})
    ctx = AggregationContext(r_max=R_MAX, norm_bound=1.5, shapes=SHAPES)
    got, round_ = streamed("hetlora", [updates[0], huge, updates[1]], ctx)
    assert [c for c, _ in round_.dropped] == [huge.client_id] and "not finite" in round_.dropped[0][1]
    expected, _ = aggregate_round(METHODS["hetlora"], [updates[0], updates[1]], ctx)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_bounded_round_gives_the_same_bits_whatever_order_its_replies_arrive_in():
    """The second pass adds in client order: a Flower round (arrival order) and an in-process one agree bit for bit."""
    updates = a_round("hetlora", attacker=True)
    ctx = AggregationContext(r_max=R_MAX, norm_bound=1.5, shapes=SHAPES)
    first, _ = streamed("hetlora", updates, ctx)
    second, _ = streamed("hetlora", updates[::-1], ctx)
    assert all(torch.equal(first[k], second[k]) for k in first)


WIDE = {"layers.0.q_proj": (40, 30), "layers.0.down_proj": (24, 50)}  # dense once the stacked rank reaches 18 / 16


@pytest.mark.parametrize("bound", [None, 1.5])
@pytest.mark.parametrize("ranks", [[2, 8, 5], [2, 8, 5, 3, 6, 4, 8]], ids=["stacked", "dense"])
def test_fedex_loras_streamed_residual_folds_into_the_same_base_as_the_lists(bound, ranks):
    """R = Σ w_k B_k A_k − B̄ Ā kept as it streams: while the stacked factors are smaller than the matrix, the list
    rule's own factors (same rank, so the same download); past that, the dense R. Either way the base it folds into
    is the list's within float rounding, and so is the adapter; an inflated client is bounded in both."""
    from hetlora.core.base_delta import DENSE_SUFFIX, dense_delta, fold

    updates = [make_update(r, seed=s, n=10 + s, shapes=WIDE) for s, r in enumerate(ranks)]
    updates[1] = replace(updates[1], adapter={k: v * (1e3 if k.endswith("lora_B.weight") else 1.0) for k, v in updates[1].adapter.items()})
    ctx = AggregationContext(r_max=R_MAX, norm_bound=bound, shapes=WIDE)
    expected, expected_base = aggregate_round(METHODS["fedex-lora"], updates, ctx)
    round_ = stream_round(METHODS["fedex-lora"], ctx, iter(updates), lambda u: u, MemoryStore())
    got = round_.result()
    got_base = round_.base_update(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.float(), rtol=1e-6, atol=1e-9)
    dense_now = sum(ranks) >= 16
    assert any(k.endswith(DENSE_SUFFIX) for k in got_base) == dense_now
    if not dense_now:  # the same factors (up to the order the replies came in): the same bytes to send
        assert {k: v.shape for k, v in got_base.items()} == {k: v.shape for k, v in expected_base.items()}
    folded, reference = fold(None, got_base), fold(None, expected_base)
    for module in WIDE:
        want = dense_delta(reference, module).double()
        torch.testing.assert_close(dense_delta(folded, module).double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
        # and exact: the global model W0 + ΔW + B̄Ā is W0 + the clients' bounded mean product
        b_bar, a_bar = got[module + ".lora_B.weight"].double(), got[module + ".lora_A.weight"].double()
        bounded = METHODS["fedex-lora"].bound(updates, ctx) if bound else updates
        mean = sum(u.adapter[module + ".lora_B.weight"].double() @ u.adapter[module + ".lora_A.weight"].double() for u in bounded) / len(updates)
        torch.testing.assert_close(dense_delta(folded, module).double() + b_bar @ a_bar, mean, rtol=1e-5, atol=1e-5 * mean.abs().max().item())


def test_a_product_sum_stacks_then_turns_dense_and_keeps_the_exact_sum():
    """Σ w_k B_k A_k by hand, in both forms: 40 × 30 holds 1200 numbers, and stacked rank r holds 70 r."""
    from hetlora.core.accumulate import ProductSum

    shapes = {"m": (40, 30)}
    adapters = [make_update(r, seed=s, shapes=shapes).adapter for s, r in enumerate([5, 7, 9])]
    weights = [(0.5, 2.0), (1.0, 1.0), (3.0, 0.25)]
    products = ProductSum()
    for adapter, (wb, wa) in zip(adapters[:2], weights[:2]):
        products.add(adapter, wb, wa)
    b, a = products.factors("m")
    assert b.shape == (40, 12) and a.shape == (12, 30) and not products.dense  # rank 12: 840 < 1200 numbers
    products.add(adapters[2], *weights[2])  # rank 21: 1470 ≥ 1200, dense from here
    assert products.factors("m") is None and products.dense["m"].dtype == torch.float32  # the size of the residual it becomes
    by_hand = sum(wb * wa * (x["m.lora_B.weight"] @ x["m.lora_A.weight"]) for x, (wb, wa) in zip(adapters, weights))
    torch.testing.assert_close(products.dense["m"].double(), by_hand.double(), rtol=1e-6, atol=1e-6)


def test_a_product_sum_of_256_clients_in_fp32_stays_within_fp32_rounding_of_the_float64_sum():
    """The dense sum is fp32 (half the server memory of float64): over 256 clients of mixed rank and weight its error,
    against the float64 sum by hand, stays within √K fp32 roundings of the sum's largest entry (8.5 measured, 16 here)."""
    from hetlora.core.accumulate import ProductSum

    shapes = {"m": (24, 20)}
    products, exact = ProductSum(), torch.zeros(24, 20, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    for s in range(256):
        adapter = make_update(1 + s % 8, seed=100 + s, shapes=shapes).adapter
        wb, wa = 1.0, float(torch.rand((), generator=gen)) + 0.5
        products.add(adapter, wb, wa)
        term = wb * wa * adapter["m.lora_B.weight"].double() @ adapter["m.lora_A.weight"].double()
        exact += term
    assert products.factors("m") is None
    error = (products.dense["m"].double() - exact).abs().max().item()
    assert error <= 256**0.5 * 2**-24 * exact.abs().max().item(), error



def test_the_list_rules_that_run_a_module_at_a_time():
    """A rule is module-wise when module ℓ's aggregate needs only module ℓ of each update and per-client scalars;
    fslora (its sketches' changes, bounded as changes) streams its changes instead, and only fft (dense weights) takes
    a list."""
    ctx = AggregationContext(r_max=R_MAX, shapes=SHAPES)
    assert sorted(MODULEWISE) == ["fed-plora", "ffa", "flexlora", "flora", "florist", "rb-lora", "rbla", "recon-svd"]
    assert not any(modulewise(METHODS[m], ctx) for m in STREAMING)
    assert sorted(m for m in METHODS if m not in STREAMING + MODULEWISE) == ["fft", "fslora"]
    from hetlora.methods.streaming import one_at_a_time

    assert [m for m in METHODS if not one_at_a_time(METHODS[m], ctx)] == ["fft"]
    with pytest.raises(ValueError, match="needs a ReplyStore"):
        ModulewiseRound(METHODS["recon-svd"], ctx, checker(ctx))
    with pytest.raises(ValueError, match="a module at a time"):
        ModulewiseRound(METHODS["fslora"], ctx, checker(ctx), MemoryStore())


def modulewise_round(method, updates, ctx):
    round_ = stream_round(METHODS[method], ctx, iter(updates), checker(ctx), MemoryStore())
    assert isinstance(round_, ModulewiseRound)
    assert all(u.adapter == {} for u in round_.kept)  # the round itself keeps no update's tensors
    result = round_.result()
    return result, round_.base_update(result), round_


@pytest.mark.parametrize("method", MODULEWISE)
@pytest.mark.parametrize("bound", [None, 1.5])
@pytest.mark.parametrize("case", ["honest", "attacker", "first round"])
def test_a_modulewise_round_is_the_list_rounds_aggregate_and_base_update(method, bound, case):
    """Module by module over stored replies, arriving in any order, the aggregate and the base update are the
    list round's (and an inflated client is bounded by the whole update's norms, as in the list round)."""
    from tests.helpers import make_adapter

    updates = a_round(method, attacker=case == "attacker", zero_b=case == "first round")
    ctx = AggregationContext(r_max=R_MAX, norm_bound=bound, shapes=SHAPES, previous=make_adapter(R_MAX, seed=99))
    expected, expected_base = aggregate_round(METHODS[method], updates, ctx)
    got, got_base, round_ = modulewise_round(method, updates[::-1], ctx)
    assert sorted(got) == sorted(expected) and (got_base is None) == (expected_base is None)
    for want, have in ((expected, got), (expected_base or {}, got_base or {})):
        assert sorted(have) == sorted(want)
        for key in want:
            scale = float(want[key].abs().max())
            torch.testing.assert_close(have[key], want[key], rtol=1e-6, atol=1e-6 * max(scale, 1e-30))
    assert sorted(u.client_id for u in round_.kept) == sorted(u.client_id for u in updates)
    if case == "attacker" and bound is not None:
        unbounded, _ = aggregate_round(METHODS[method], updates, replace(ctx, norm_bound=None))
        assert any(unbounded[k].shape != expected[k].shape or not torch.allclose(unbounded[k], expected[k], rtol=1e-3)
                   for k in expected)


def fslora_round(attacker: bool = False):
    """Seven clients each sent its FSLoRA sketch of the previous global (its rank budget of R_MAX components) and
    returning it changed; the attacker's change is 1e3 × an honest one."""
    from hetlora.core.sketch import gather, sketch_indices

    previous = make_update(R_MAX, seed=50).adapter
    ranks = [2, 8, 5, 3, 6, 4, 8]
    updates = []
    for k, rank in enumerate(ranks):
        sent = gather(previous, sketch_indices(7, 2, f"c{k}", rank, R_MAX))
        noise = make_update(rank, seed=k).adapter
        grow = 1e3 if attacker and k == 2 else 1.0
        updates.append(replace(make_update(rank, seed=k, n=10 + k), adapter={key: sent[key] + 0.01 * grow * noise[key] for key in sent}))
    ctx = AggregationContext(r_max=R_MAX, shapes=SHAPES, previous=previous, seed=7, round_index=2,
                             ranks={f"c{k}": r for k, r in enumerate(ranks)})
    return updates, ctx


@pytest.mark.parametrize("bound", [None, 1.5])
@pytest.mark.parametrize("case", ["honest", "attacker"])
def test_fsloras_changes_stream_into_the_list_rounds_server_step(bound, case):
    """FSLoRA is previous + (1/K) Σ_k Δ_k on each client's sketch: folded as the replies arrive (in reverse order
    here), bounded on the change in a second pass, it equals the list round's step."""
    from hetlora.methods.streaming import ChangeRound, one_at_a_time

    updates, ctx = fslora_round(attacker=case == "attacker")
    ctx = replace(ctx, norm_bound=bound)
    assert one_at_a_time(METHODS["fslora"], ctx) and not modulewise(METHODS["fslora"], ctx)
    expected, _ = aggregate_round(METHODS["fslora"], updates, ctx)
    store = MemoryStore()
    round_ = stream_round(METHODS["fslora"], ctx, iter(updates[::-1]), checker(ctx), store)
    assert isinstance(round_, ChangeRound) and bool(store._held) == (bound is not None)  # bounded: kept for pass 2
    got = round_.result()
    assert not store._held and all(u.adapter == {} for u in round_.kept) and round_.base_update(got) is None
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6 * float(expected[key].abs().max()))
    if case == "attacker" and bound is not None:  # the bound scaled the attacker's change
        unbounded, _ = aggregate_round(METHODS["fslora"], updates, replace(ctx, norm_bound=None))
        assert any(not torch.allclose(unbounded[k], expected[k], rtol=1e-3) for k in expected)


def test_an_fslora_reply_of_another_size_than_it_was_sent_is_dropped_by_name_not_the_round():
    updates, ctx = fslora_round()
    wrong = replace(updates[1], adapter=make_update(3, seed=1).adapter)  # c1 was sent 8 components, returns 3
    round_ = stream_round(METHODS["fslora"], ctx, iter([updates[0], wrong] + updates[2:]), checker(ctx), MemoryStore())
    assert round_.dropped == [("c1", "sent a sketch of 3 components, but was sent 8")]
    expected, _ = aggregate_round(METHODS["fslora"], [updates[0]] + updates[2:], ctx)
    got = round_.result()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6 * float(expected[key].abs().max()))


@pytest.mark.parametrize("order", ["client order", "reversed"])
def test_dp_fedavg_streams_its_clipped_changes_into_the_list_rounds_noised_release(order):
    """DP-FedAvg (docs/algorithm.md "Privacy") is global + (Σ_k clip(δ_k, C) + noise) / K: each clipped change
    is its client's alone, so the server folds it in as it arrives and holds no update. With the same seeded
    generator the streamed release is the list round's (the noise drawn once, at the end, for the whole sum);
    a NaN reply is dropped by name; the clipping is at work (a client 10³ × larger moves the release no more
    than C / K allows)."""
    from hetlora.core.dp import flat_norm
    from hetlora.methods.dp import DPFedAvg
    from hetlora.methods.streaming import ChangeRound, one_at_a_time

    dp = DPFedAvg(METHODS["hetlora"], clip_norm=0.5, noise_multiplier=0.7, expected_clients=6)
    previous = make_update(R_MAX, seed=99).adapter
    updates = [make_update(r, seed=s, n=10 + s) for s, r in enumerate([2, 8, 5, 3, 6])]
    updates[1] = replace(updates[1], adapter={k: v * 1e3 for k, v in updates[1].adapter.items()})
    nan = replace(make_update(4, seed=7), client_id="nan")
    nan.adapter[next(iter(nan.adapter))][0, 0] = float("nan")

    def ctx():
        return AggregationContext(r_max=R_MAX, previous=previous, shapes=SHAPES, norm_bound=1.5,
                                  generator=torch.Generator().manual_seed(5))

    assert one_at_a_time(dp, ctx())
    expected, _ = aggregate_round(dp, updates, ctx())
    arriving = updates if order == "client order" else updates[::-1]
    round_ = stream_round(dp, ctx(), iter(arriving[:2] + [nan] + arriving[2:]), checker(ctx()), MemoryStore())
    assert isinstance(round_, ChangeRound) and [c for c, _ in round_.dropped] == ["nan"]
    got = round_.result()
    assert all(u.adapter == {} for u in round_.kept)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    noiseless = DPFedAvg(METHODS["hetlora"], 0.5, 0.0, 6)
    moved = aggregate_round(noiseless, updates, ctx())[0]
    step = {k: moved[k] - previous[k] for k in moved}
    assert flat_norm(step) <= 0.5 * len(updates) / 6 + 1e-6  # each client moved it by at most C / K
