"""Study v4's per-label learning-rate rule: scores, the choice, and the grid extended until the optimum is bracketed."""

import math

import pytest

from hetlora.study.tuning import LADDER, chosen, label_table, next_rate, score


def test_a_rates_score_is_the_geometric_mean_of_its_seeds_and_a_diverged_seed_loses():
    assert score([40.0, 90.0]) == pytest.approx(60.0)  # √(40 · 90)
    assert score([50.0]) == pytest.approx(50.0)
    assert score([40.0, math.nan]) == math.inf and score([40.0, math.inf]) == math.inf
    with pytest.raises(ValueError, match="at least one"):
        score([])


def test_the_lowest_score_is_chosen_and_a_tie_goes_to_the_smaller_rate():
    assert chosen({1e-3: 50.0, 3e-3: 48.0, 1e-2: 70.0}) == 3e-3
    assert chosen({3e-3: 48.0, 1e-3: 48.0}) == 1e-3


def test_the_grid_grows_on_the_side_of_an_edge_optimum_until_it_is_bracketed():
    assert next_rate({3e-4: 60.0, 1e-3: 55.0, 3e-3: 50.0}) == 1e-2  # best at the top edge: one step up
    assert next_rate({3e-4: 50.0, 1e-3: 55.0, 3e-3: 60.0}) == 1e-4  # best at the bottom edge: one step down
    assert next_rate({3e-4: 60.0, 1e-3: 50.0, 3e-3: 55.0}) is None  # interior: bracketed
    assert next_rate({3e-4: math.inf, 1e-3: math.inf, 3e-3: math.inf}) == 1e-4  # all diverged: go smaller
    assert next_rate({LADDER[0]: 40.0, LADDER[1]: 50.0}) is None  # the ladder ends there
    with pytest.raises(ValueError, match="not on the tuning ladder"):
        next_rate({2e-3: 40.0, 3e-3: 50.0})


def test_a_labels_table_owes_its_first_grid_then_the_extensions_then_chooses():
    first = (3e-4, 1e-3, 3e-3)
    t = label_table(first, {}, seeds=2)
    assert not t["complete"] and t["owed"] == list(first) and t["chosen"] is None
    t = label_table(first, {3e-4: [60, 61], 1e-3: [55, 54], 3e-3: [50]}, seeds=2)
    assert t["owed"] == [3e-3]  # a rate with one seed of two is owed
    t = label_table(first, {3e-4: [60, 61], 1e-3: [55, 54], 3e-3: [50, 49]}, seeds=2)
    assert not t["complete"] and t["owed"] == [1e-2] and t["chosen"] is None
    t = label_table(first, {3e-4: [60, 61], 1e-3: [55, 54], 3e-3: [50, 49], 1e-2: [52, 53]}, seeds=2)
    assert t["complete"] and t["chosen"] == 3e-3 and t["bracketed"] and t["grid"] == [3e-4, 1e-3, 3e-3, 1e-2]
    assert t["scores"]["0.003"] == pytest.approx(math.sqrt(50 * 49)) and t["perplexities"]["0.01"] == [52, 53]
    t = label_table((LADDER[0], LADDER[1]), {LADDER[0]: [40, 40], LADDER[1]: [50, 50]}, seeds=2)
    assert t["complete"] and t["chosen"] == LADDER[0] and t["bracketed"] is False  # the ladder's end: an edge, said so


def test_a_run_with_a_round_rolled_back_counts_as_diverged():
    """The runner rolls back a round whose aggregate is not finite, so a diverging run ends at an earlier model's finite
    perplexity; it still scores +inf (and a missing or non-finite perplexity too)."""
    from hetlora.study.tuning import validation_score

    assert validation_score({"full_eval_ppl": 48.5, "rejected_rounds": []}) == 48.5
    assert validation_score({"full_eval_ppl": 48.5, "rejected_rounds": [3]}) == math.inf
    assert validation_score({"full_eval_ppl": math.nan}) == math.inf and validation_score({}) == math.inf
