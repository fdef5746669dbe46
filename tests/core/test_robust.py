"""Norm-inflation defence: a scaled client moves the global ΔW no more than dropping an honest one."""

import pytest
import torch

from hetlora import ClientUpdate, aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, scale_adapter, truncate_adapter
from hetlora.core.robust import bound_updates, cap_weights
from tests.helpers import SHAPES, make_adapter

R_MAX = 8
RANKS = [2, 3, 4, 5, 6, 7, 8, 4, 6, 8]


def honest_round(seed=0):
    """Ten clients that started from one global adapter and moved a little."""
    g = torch.Generator().manual_seed(seed)
    start = make_adapter(R_MAX, seed=1000 + seed, b_scale=0.5)
    updates = []
    for k, r in enumerate(RANKS):
        ad = truncate_adapter(start, r)
        for key in ad:
            ad[key] = ad[key] + 0.2 * torch.randn(ad[key].shape, generator=g, dtype=ad[key].dtype)
        updates.append(ClientUpdate(ad, 10 + k, f"c{k}"))
    return updates


def global_delta(adapter):
    return torch.cat([(adapter[m + B_SUFFIX] @ adapter[m + A_SUFFIX]).flatten() for m in SHAPES])


def distance(x, y):
    return float((global_delta(x) - global_delta(y)).norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("victim_index", [0, 3, 9])
@pytest.mark.parametrize("attack", ["x100", "b10_a_div10"])
def test_bounded_attacker_moves_less_than_dropping_it(seed, victim_index, attack):
    honest = honest_round(seed)
    base = aggregate("hetlora", honest, R_MAX, norm_bound=1.5)
    without = honest[:victim_index] + honest[victim_index + 1 :]
    drop_shift = distance(aggregate("hetlora", without, R_MAX, norm_bound=1.5), base)
    bad = list(honest)
    victim = bad[victim_index]
    scaled = scale_adapter(victim.adapter, 100.0, 1.0) if attack == "x100" else scale_adapter(victim.adapter, 10.0, 0.1)
    bad[victim_index] = ClientUpdate(scaled, victim.num_examples, victim.client_id)
    attacked = aggregate("hetlora", bad, R_MAX, norm_bound=1.5)
    assert distance(attacked, base) <= drop_shift
    # without the bound the same attacker takes over the round
    unbounded = distance(aggregate("hetlora", bad, R_MAX), aggregate("hetlora", honest, R_MAX))
    assert unbounded > 2 * drop_shift


def test_bound_changes_honest_result_little():
    honest = honest_round(0)
    plain = aggregate("hetlora", honest, R_MAX)
    bounded = aggregate("hetlora", honest, R_MAX, norm_bound=1.5)
    rel = distance(plain, bounded) / float(global_delta(plain).norm())
    assert rel < 0.05


def test_bound_updates_scales_outliers_to_the_median():
    updates = honest_round(0)
    updates[0] = ClientUpdate(scale_adapter(updates[0].adapter, 50.0, 50.0), 10, "c0")
    out = bound_updates(updates, 1.5)
    def per_root_b(u):
        r = u.adapter[next(iter(SHAPES)) + A_SUFFIX].shape[0]
        return sum(float(u.adapter[m + B_SUFFIX].pow(2).sum()) for m in SHAPES) ** 0.5 / r**0.5
    med = sorted(per_root_b(u) for u in updates)
    median = med[4]  # the lower median of ten
    assert per_root_b(out[0]) <= median * (1 + 1e-9)
    for u, v in zip(updates[1:], out[1:]):  # honest ones far below the bound are untouched
        if per_root_b(u) < 1.2 * median:
            assert all(torch.equal(u.adapter[k], v.adapter[k]) for k in u.adapter)


def test_cap_weights():
    # the lower median (2.0 of four), so that of two clients the larger can never set the reference
    assert cap_weights([1.0, 2.0, 3.0, 100.0], 1.5) == [1.0, 2.0, 3.0, 3.0]
    assert cap_weights([1.0, 1e30], 1.5) == [1.0, 1.5]
    assert cap_weights([0.0, 0.0, 5.0], 2.0) == [0.0, 0.0, 5.0]
    with pytest.raises(ValueError):
        bound_updates(honest_round(0), 0.0)
