import collections

import pytest

from hetlora import DEVICE_TIERS, assign_ranks, list_ranks, tier_ranks, uniform_ranks
from hetlora.core.ranks import assign_tiers

IDS = [f"client-{i}" for i in range(400)]


def test_uniform_ranks_in_bounds_cover_the_range_and_are_deterministic():
    r = uniform_ranks(IDS, 5, 50, seed=0)
    assert all(5 <= v <= 50 for v in r.values())
    assert set(r.values()) == set(range(5, 51))
    assert r == uniform_ranks(IDS, 5, 50, seed=0)
    assert r != uniform_ranks(IDS, 5, 50, seed=1)


def test_uniform_rank_is_fixed_per_client_whatever_the_others():
    full = uniform_ranks(IDS, 5, 50, seed=3)
    part = uniform_ranks(list(reversed(IDS[:17])), 5, 50, seed=3)
    assert all(full[c] == part[c] for c in part)


def test_uniform_is_roughly_uniform():
    counts = collections.Counter(uniform_ranks([f"c{i}" for i in range(20000)], 1, 4, seed=0).values())
    assert all(4500 < counts[r] < 5500 for r in (1, 2, 3, 4))


def test_list_ranks_cycle_and_validate():
    assert list_ranks(["a", "b", "c"], [5, 9], 5, 10) == {"a": 5, "b": 9, "c": 5}
    with pytest.raises(ValueError, match="outside"):
        list_ranks(["a"], [11], 5, 10)
    with pytest.raises(ValueError, match="empty"):
        list_ranks(["a"], [], 5, 10)


def test_tiers_mix_and_budget():
    tiers = assign_tiers(IDS, seed=0, mix={"laptop": 0.5, "low-end-phone": 0.5})
    counts = collections.Counter(tiers.values())
    assert set(counts) == {"laptop", "low-end-phone"} and 150 < counts["laptop"] < 250
    ranks = tier_ranks(IDS, 5, 50, seed=0)
    assert set(ranks.values()) <= set(DEVICE_TIERS.values())
    clamped = tier_ranks(IDS, 8, 30, seed=0)
    assert set(clamped.values()) <= {8, 10, 20, 30}


def test_assign_ranks_dispatch_and_errors():
    assert assign_ranks(["a"], "fixed", 5, 50, 0) == {"a": 50}
    with pytest.raises(ValueError, match="unknown rank distribution"):
        assign_ranks(["a"], "gaussian", 5, 50, 0)
    with pytest.raises(ValueError, match="r_min"):
        assign_ranks(["a"], "uniform", 10, 5, 0)
