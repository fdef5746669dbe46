"""The server's sampling (federation.sample_clients): what the DP accountant and the study assume."""

from collections import Counter

from hetlora.server.federation import sample_clients, tier_ranks_for_eval

IDS = [f"c{i:02d}" for i in range(10)]


def test_uniform_sampling_is_k_distinct_clients_from_seed_and_round_only():
    rounds = [sample_clients(IDS, 4, seed=3, round_index=t) for t in range(200)]
    assert all(len(r) == len(set(r)) == 4 and set(r) <= set(IDS) for r in rounds)  # without replacement
    assert rounds[7] == sample_clients(list(reversed(IDS)), 4, seed=3, round_index=7)  # not the list's order
    assert rounds[7] != sample_clients(IDS, 4, seed=4, round_index=7) or rounds[8] != sample_clients(IDS, 4, seed=4, round_index=8)
    counts = Counter(c for r in rounds for c in r)  # every client drawn, about K/N of the rounds (80 of 200)
    assert set(counts) == set(IDS) and all(50 <= n <= 110 for n in counts.values()), counts


def test_cyclic_sampling_trains_every_client_once_per_epoch():
    per_epoch = 3  # ceil(10 / 4): rounds of 4, 4, 2
    for epoch in range(4):
        rounds = [sample_clients(IDS, 4, seed=1, round_index=epoch * per_epoch + s, scheme="cyclic") for s in range(per_epoch)]
        assert [len(r) for r in rounds] == [4, 4, 2]
        assert sorted(c for r in rounds for c in r) == IDS
    assert sample_clients(IDS, 4, 1, 0, "cyclic") != sample_clients(IDS, 4, 1, 3, "cyclic")  # a new order each epoch


def test_tier_ranks_are_the_distinct_ranks_or_min_median_max():
    assert tier_ranks_for_eval({"a": 5, "b": 9, "c": 5}, 5, 50) == [5, 9]
    assert tier_ranks_for_eval({str(r): r for r in (5, 8, 13, 21, 34)}, 5, 50) == [5, 13, 50]
