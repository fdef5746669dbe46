"""Rounds that close (docs/algorithm.md §7.3): the seeded delay model, how many clients a round asks, who is in time."""

from __future__ import annotations

import math
import statistics

import pytest

from hetlora.core.arrival import arrival_order, asked_count, delay_table, parse_delay


def test_a_delay_is_a_pure_function_of_seed_round_and_client():
    model = parse_delay("exp:2.0")
    assert model.delay(3, 1, "alice") == model.delay(3, 1, "alice")
    assert len({model.delay(3, r, "alice") for r in range(5)}) == 5  # drawn afresh each round
    assert model.delay(3, 1, "alice") != model.delay(4, 1, "alice")


def test_the_delay_models_have_the_stated_distributions():
    """Over 20 000 (client, round) draws: exp's mean, lognormal's median and log-sd, the silent share."""
    draws = lambda spec: [parse_delay(spec).delay(0, r, f"c{i}") for r in range(20) for i in range(1000)]
    assert statistics.fmean(draws("exp:2.0")) == pytest.approx(2.0, rel=0.03)
    logs = [math.log(d) for d in draws("lognormal:3.0:0.5")]
    assert math.exp(statistics.median(logs)) == pytest.approx(3.0, rel=0.03)
    assert statistics.stdev(logs) == pytest.approx(0.5, rel=0.03)
    silent = draws("fixed:1.5,silent=0.1")
    assert sum(math.isinf(d) for d in silent) / len(silent) == pytest.approx(0.1, abs=0.006)
    assert {d for d in silent if math.isfinite(d)} == {1.5}


def test_a_table_names_each_clients_delay_and_null_is_never():
    model = delay_table({"a": 2, "b": None}, "t.json")
    assert (model.delay(0, 0, "a"), model.delay(0, 0, "b"), model.delay(0, 0, "zed")) == (2.0, math.inf, 0.0)
    with pytest.raises(ValueError, match="client 'a' has True"):
        delay_table({"a": True}, "t.json")


def test_over_selection_asks_the_ceiling_of_k_times_one_plus_f_and_never_more_than_registered():
    assert asked_count(20, 0.1, 1000) == 22  # 20 × 1.1 = 22.000000000000004 in floats: not 23
    assert asked_count(4, 0.0, 10) == 4
    assert asked_count(3, 0.5, 10) == 5  # 4.5 → 5
    assert asked_count(8, 1.0, 10) == 10


def test_replies_arrive_earliest_first_and_the_deadline_cuts_the_late_and_the_silent():
    delays = {"d": 0.5, "b": 2.0, "a": 2.0, "c": 7.0, "e": math.inf}
    in_time, late = arrival_order(list(delays), delays, 5.0)
    assert in_time[0] == "d" and set(in_time[1:]) == {"a", "b"} and late == [("c", 7.0), ("e", math.inf)]
    assert arrival_order(list(delays), delays, None)[0][-1] == "c"


def test_equal_delays_come_in_a_seeded_order_not_by_id():
    """Ties (every reply at once, or a fixed delay) are broken per (seed, round): otherwise over-selection would
    keep the lowest ids every round."""
    ids = [f"c{i:02d}" for i in range(20)]
    zero = dict.fromkeys(ids, 0.0)
    orders = [arrival_order(ids, zero, None, seed=0, round_index=t)[0] for t in range(30)]
    assert orders[0] == arrival_order(ids, zero, None, seed=0, round_index=0)[0]
    assert len({o[0] for o in orders}) > 10 and orders[0] != sorted(ids)
    assert arrival_order(ids, zero, None, seed=1, round_index=0)[0] != orders[0]


def test_a_silent_share_leaves_the_other_clients_delays_as_they_were():
    """The silent draw has its own stream: exp:2 and exp:2,silent=0.3 pair client for client (runs across P compare)."""
    plain, some_silent = parse_delay("exp:2"), parse_delay("exp:2,silent=0.3")
    pairs = [(plain.delay(0, 1, f"c{i}"), some_silent.delay(0, 1, f"c{i}")) for i in range(200)]
    assert all(b == a for a, b in pairs if math.isfinite(b)) and sum(math.isinf(b) for _, b in pairs) > 30
