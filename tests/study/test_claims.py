"""Paired per-seed differences with hetlora, and the ROUGE-L rows built from them (hand-computed)."""

import pytest

from hetlora.study.claims import paired, rouge_rows


def runs():
    return {"hetlora": {0: {"rouge_l": 0.12}, 1: {"rouge_l": 0.11}, 2: {"rouge_l": 0.10}},
            "fslora": {0: {"rouge_l": 0.10}, 1: {"rouge_l": None}, 2: {"rouge_l": 0.09}, 3: {"rouge_l": 0.5}}}


def test_a_seed_without_the_measure_is_neither_paired_nor_listed():
    seeds, diffs = paired(runs(), "fslora", lambda r: r["rouge_l"])
    assert seeds == [0, 2]  # seed 1 lacks fslora's score, seed 3 hetlora's run
    assert diffs == pytest.approx([-0.02, -0.01])


def test_rouge_rows_read_hetlora_minus_the_label_in_points():
    (row,) = rouge_rows(runs(), ["hetlora", "fslora"])
    assert row["label"] == "fslora" and row["n"] == 2 and row["seeds"] == [0, 2]
    assert row["diffs_points"] == pytest.approx([2.0, 1.0]) and row["mean_points"] == pytest.approx(1.5)
    # t-interval on two values: 1.5 ± t(0.975, 1) · sd / √2, sd = √0.5 → half-width 12.706 · 0.5
    assert row["ci95_points"] == pytest.approx([1.5 - 12.7062047 * 0.5, 1.5 + 12.7062047 * 0.5], rel=1e-6)
