"""The sensitivity reading of the registered family, against hand-computed exact Wilcoxon p-values and leave-one-out means."""

import math
import random

import pytest
from scipy import stats as scipy_stats

from hetlora.study.sensitivity import sensitivity, signed_rank_side, wilcoxon_p, without_seed

SEEDS = [0, 1, 2, 3, 4, 5]
# C1 is carried the wrong way by one seed (5); without it the other five agree tightly
C1 = [1.0, 1.2, 0.8, 1.1, 0.9, -3.0]
FSLORA = [-1.0, -1.1, -0.9, -1.0, -1.05, -0.95]


def family():
    return [{"id": "C1", "label": "fedavg-rmin", "seeds": SEEDS, "effects_pct": C1, "verdict": "inconclusive", "n": 6},
            {"id": "vs:fslora", "label": "fslora", "seeds": SEEDS, "effects_pct": FSLORA, "verdict": "fslora better", "n": 6},
            {"id": "vs:fed-plora", "label": "fed-plora", "seeds": SEEDS, "effects_pct": [1.0] * 5 + [math.inf],
             "verdict": "not tested (non-finite perplexity: fed-plora seed 5)", "n": 6}]


def test_exact_wilcoxon_p_values_by_counting_rank_subsets():
    # n = 5, every value positive: W− = 0, P(W ≤ 0) = 1/32, two-sided 2/32
    assert wilcoxon_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    # one negative value of rank 2: W− = 2; subsets of {1..5} summing to ≤ 2: {}, {1}, {2}
    assert wilcoxon_p([1, -2, 3, 4, 5]) == pytest.approx(2 * 3 / 32)
    assert wilcoxon_p([0.0, 0.0]) == 1.0 and wilcoxon_p([1.0]) is None


def test_ties_take_mid_ranks_and_stay_exact():
    # |1|, |−1|, |2| rank 1.5, 1.5, 3; W+ = 4.5; the 8 sign patterns give W+ of 0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6 → P(W+ ≥ 4.5) = 3/8
    assert wilcoxon_p([1.0, -1.0, 2.0]) == pytest.approx(2 * 3 / 8)
    # a zero is dropped before ranking (Wilcoxon's own convention)
    assert wilcoxon_p([0.0, 1.0, -1.0, 2.0]) == pytest.approx(2 * 3 / 8)


def test_without_ties_it_is_scipys_exact_test():
    rng = random.Random(7)
    for n in (3, 8, 20):
        values = [rng.gauss(0.3, 1.0) for _ in range(n)]
        expected = scipy_stats.wilcoxon(values, method="exact").pvalue
        assert wilcoxon_p(values) == pytest.approx(expected, rel=1e-9)


def test_a_verdict_one_seed_holds_back_is_named_with_that_seed():
    c1, fslora, plora = sensitivity(family())
    assert c1["median_pct"] == pytest.approx((0.9 + 1.0) / 2)
    assert (c1["seeds_on_hetloras_side"], c1["seeds_on_other_side"]) == (5, 1)
    # |effects| ranked 0.8 < 0.9 < 1.0 < 1.1 < 1.2 < 3.0: W− = 6; subsets of {1..6} with sum ≤ 6 number 14 (of 64)
    assert c1["wilcoxon_p"] == pytest.approx(2 * 14 / 64)
    assert c1["most_influential_seed"] == 5 and c1["effect_without_it_pct"] == pytest.approx(1.0)
    # leaving out seed 1 (1.2) gives the least: (2.0 − 1.2) / 5; leaving out seed 5 the most, 1.0
    assert c1["leave_one_out_pct"] == pytest.approx([0.16, 1.0])
    # without seed 5 the five agreeing seeds reject (t ≈ 14, Holm over three rows still < 0.05): reproduced
    assert c1["verdict_flips_without"] == [5]
    assert fslora["verdict_flips_without"] == []
    assert plora == {"id": "vs:fed-plora", "label": "fed-plora", "verdict": "not tested (non-finite perplexity: fed-plora seed 5)",
                     "n": 6, "note": "not tested by the registered rule"}


def test_the_rank_tests_are_holm_adjusted_over_the_whole_family_an_untested_row_counting_as_one():
    c1, fslora, _ = sensitivity(family())
    # raw: fslora 2/64 (every seed on one side), C1 28/64, fed-plora untested → 1; Holm over m = 3
    assert fslora["wilcoxon_p_holm"] == pytest.approx(3 * 2 / 64)
    assert c1["wilcoxon_p_holm"] == pytest.approx(2 * 28 / 64)
    # six seeds cannot reject at 0.05 after Holm over three: the rank test's reading is inconclusive where the t-test's is not
    assert fslora["wilcoxon_verdict"] == "inconclusive" and c1["wilcoxon_verdict"] == "inconclusive"


def test_a_row_the_registered_rule_left_untested_stays_untested_when_its_bad_seed_is_left_out():
    # without seed 5, fed-plora's five remaining effects are finite (and equal: p = 0); counting them would put a p of 0
    # into every other row's Holm step, a family the registered rule never formed
    left = without_seed(family(), 5)
    assert left["vs:fed-plora"]["effect_pct"] is None
    assert left["vs:fed-plora"]["verdict"] == "not tested (non-finite perplexity: fed-plora seed 5)"


def test_the_rank_tests_side_is_the_signed_rank_sum_not_the_median():
    # C4's trade is exactly 0 on the seeds where pruning never fired: the median is 0, yet every nonzero seed is on
    # HetLoRA's side, so the rank reading must not say "not reproduced"
    trade = [0.0] * 9 + [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert signed_rank_side(trade) == pytest.approx(sum(range(1, 9)))
    row = {"id": "C4", "label": "hetlora-noprune", "seeds": list(range(17)), "effects_pct": trade, "verdict": "inconclusive", "n": 17}
    (c4,) = sensitivity([row])
    assert c4["median_pct"] == 0.0 and c4["wilcoxon_p"] == pytest.approx(2 / 2 ** 8)
    assert c4["wilcoxon_verdict"] == "reproduced"


def test_a_two_seed_row_left_one_seed_short_is_not_tested_and_names_no_seed():
    row = {"id": "C2", "label": "fedavg-rmax", "seeds": [0, 1], "effects_pct": [1.0, 2.0], "verdict": "inconclusive", "n": 2}
    (c2,) = sensitivity([row])
    assert c2["leave_one_out_pct"] is None and c2["most_influential_seed"] is None
    assert c2["verdict_flips_without"] == [] and c2["wilcoxon_p"] == pytest.approx(0.5)
