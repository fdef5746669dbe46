"""The secure sum gives the plain rule back: Σ_k v_k read by the server equals HetLoRA's (and the
data-weighted rules') aggregate, whatever the public scale; the client's fixed bound and range check."""

import math

import pytest
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, factor_norms, update_norm
from hetlora.core.secure_sum import (WEIGHT_KEY, client_weight, clip_to_bound, contribution, layout, range_problem,
                                     read_sum, round_scale)
from tests.helpers import make_adapter, make_update
from tests.methods.helpers import assert_close


def summed(updates, rule, r_max, scale):
    parts = [contribution(u.adapter, client_weight(u.adapter, u.num_examples, rule), r_max, scale) for u in updates]
    return {k: sum(p[k] for p in parts) for k in parts[0]}


@pytest.mark.parametrize("method, rule", [("hetlora", "update_norm"), ("hetlora-naive", "examples")])
def test_the_read_sum_is_the_plain_aggregate_for_mixed_ranks(method, rule):
    updates = [make_update(2, seed=1, n=10, cid="a"), make_update(4, seed=2, n=30, cid="b"), make_update(6, seed=3, n=5, cid="c")]
    plain = aggregate(method, updates, r_max=6)
    secure = read_sum(summed(updates, rule, 6, scale=0.37))
    assert secure.keys() == plain.keys()
    for k in plain:
        assert_close(secure[k], plain[k], atol=1e-6)


def test_hetlora_weights_by_hand_and_the_scale_cancels():
    # client one: ||B A|| = 5 (rank 1); client two: ||B A|| = 2 (rank 2) -> weights 5/7, 2/7 of the padded factors
    one = {"m" + B_SUFFIX: torch.tensor([[1.0], [0.0], [0.0]]), "m" + A_SUFFIX: torch.tensor([[3.0, 4.0]])}
    two = {"m" + B_SUFFIX: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), "m" + A_SUFFIX: torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    assert client_weight(one, 1, "update_norm") == pytest.approx(5.0) and client_weight(two, 100, "update_norm") == pytest.approx(2.0)
    for scale in (1e-3, 1.0, 250.0):
        parts = [contribution(a, client_weight(a, 1, "update_norm"), 3, scale) for a in (one, two)]
        assert parts[0]["m" + A_SUFFIX].shape == (3, 2) and parts[0]["m" + B_SUFFIX].shape == (3, 3)  # padded to r_max
        assert float(parts[0][WEIGHT_KEY]) == pytest.approx(5.0 / scale)
        g = read_sum({k: parts[0][k] + parts[1][k] for k in parts[0]})
        assert_close(g["m" + B_SUFFIX], torch.tensor([[5 / 7, 0, 0], [4 / 7, 0, 0], [0, 0, 0.0]]))
        assert_close(g["m" + A_SUFFIX], torch.tensor([[15 / 7, 22 / 7], [2 / 7, 2 / 7], [0, 0.0]]))
    assert list(parts[0]) == [k for k, _ in layout(g)]  # both sides agree on the order: keys sorted, then the weight


def test_a_sum_of_zero_weights_is_refused_not_divided():
    zero = {k: torch.zeros_like(v) for k, v in summed([make_update(2, seed=1)], "update_norm", 4, 1.0).items()}
    with pytest.raises(ValueError, match="weights sum to 0"):
        read_sum(zero)


def test_the_fixed_bound_brings_each_factor_to_the_bound_and_leaves_smaller_ones():
    adapter = make_adapter(4, seed=5)
    norm_b, norm_a = factor_norms(adapter)
    bound = 0.5 * min(norm_b, norm_a) / math.sqrt(4)  # both factors beyond it
    clipped = clip_to_bound(adapter, bound)
    assert factor_norms(clipped) == pytest.approx((bound * 2, bound * 2), rel=1e-6)
    assert update_norm(clipped) <= bound**2 * 4 * (1 + 1e-6)  # the weight is bounded as well: ‖BA‖ ≤ ‖B‖‖A‖
    loose = clip_to_bound(adapter, 10 * max(norm_b, norm_a))
    assert all(torch.equal(loose[k], adapter[k]) for k in adapter)


def test_values_beyond_the_quantiser_range_or_not_finite_are_named():
    values = contribution(make_adapter(2, seed=1), 1.0, 4, 1.0)
    assert range_problem(values, 8.0) is None
    big = dict(values, **{WEIGHT_KEY: torch.tensor([9.0], dtype=torch.float64)})
    assert "secure.weight reaches 9, beyond the secure-aggregation range ±8" in range_problem(big, 8.0)
    key = next(iter(values))
    bad = dict(values, **{key: values[key].clone().fill_(float("nan"))})
    assert range_problem(bad, 8.0) == f"{key} is not finite"
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        contribution(make_adapter(2), float("inf"), 4, 1.0)


def test_the_public_scale():
    assert round_scale("examples", {}, [10, 30]) == 20.0
    zero_b = {k: (torch.zeros_like(v) if k.endswith(B_SUFFIX) else v) for k, v in make_adapter(3).items()}
    assert round_scale("update_norm", zero_b, [10]) == 1.0  # the first round: B = 0, no scale to take
    adapter = make_adapter(3)
    assert round_scale("update_norm", adapter, [10]) == pytest.approx(update_norm(adapter))


def test_the_covered_rank_is_the_m_th_largest_and_a_dropout_that_uncovers_it_is_named():
    from hetlora.core.secure_sum import cover_problem, covered_rank, secagg_threshold

    assert covered_rank([2, 4], 2) == 2 and covered_rank([29, 21, 44], 2) == 29 and covered_rank([6, 6, 2], 2) == 6
    assert covered_rank([5, 9, 7, 3], 3) == 5
    with pytest.raises(ValueError, match="at least 2 clients"):
        covered_rank([4, 4], 1)
    assert cover_problem([6, 2], 6, 2).startswith("only 1 of the 2 clients left in the sum hold all 6")
    assert cover_problem([6, 6], 6, 2) is None
    # Flower's own threshold for (num_shares = all, reconstruction_threshold = 0.5)
    assert [secagg_threshold(k) for k in (2, 3, 4, 5, 6, 10)] == [2, 2, 2, 2, 3, 5]


def test_the_merge_takes_the_covered_components_from_the_sum_and_the_rest_from_before():
    from hetlora.core.secure_sum import merge_covered

    before = make_adapter(4, seed=1)
    summed_part = {k: v[:, :2] * 0 + 7 if k.endswith(B_SUFFIX) else v[:2] * 0 + 7 for k, v in make_adapter(4, seed=2).items()}
    merged = merge_covered(summed_part, before)
    for k, v in merged.items():
        head, tail = (v[:, :2], v[:, 2:]) if k.endswith(B_SUFFIX) else (v[:2], v[2:])
        old_tail = before[k][:, 2:] if k.endswith(B_SUFFIX) else before[k][2:]
        assert bool((head == 7).all()) and torch.equal(tail, old_tail)


def test_a_sum_beyond_what_clipped_clients_can_send_is_named():
    from hetlora.core.secure_sum import client_share, sum_problem, weight_sum

    clip, cover, scale = 0.3, 2, 0.5
    updates = [make_update(4, seed=s, n=10 * s) for s in (1, 2, 3)]
    shares = [client_share(u.adapter, cover, clip) for u in updates]
    parts = [contribution(a, client_weight(a, 1, "update_norm"), cover, scale) for a in shares]
    honest = {k: sum(p[k] for p in parts) for k in parts[0]}
    args = dict(clients=3, clip=clip, cover=cover, scale=scale, rule="update_norm", examples=60.0, entries=100)
    assert sum_problem(read_sum(honest), weight_sum(honest), **args) is None
    cheat = dict(honest)
    key = next(k for k in honest if k.endswith(B_SUFFIX))
    cheat[key] = honest[key] + 8.0  # one client's entries at the quantiser's ±8
    assert "a client skipped its clip" in sum_problem(read_sum(cheat), weight_sum(cheat), **args)
    heavy = dict(honest, **{WEIGHT_KEY: honest[WEIGHT_KEY] + 3 * clip * clip * cover / scale})
    assert "inflated its weight" in sum_problem(read_sum(heavy), weight_sum(heavy), **args)
    data = [contribution(a, float(u.num_examples), cover, 20.0) for a, u in zip(shares, updates)]
    by_examples = {k: sum(p[k] for p in data) for k in data[0]}
    args |= dict(rule="examples", scale=20.0)
    assert sum_problem(read_sum(by_examples), weight_sum(by_examples), **args) is None
    assert "changed its weight" in sum_problem(read_sum(by_examples), weight_sum(by_examples) * 2, **args)
