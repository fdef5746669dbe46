"""Which method for which constraint: what each constraint allows (checked against the methods' own properties, listed
by hand here) and the ranking arithmetic (hand-computed on small synthetic runs)."""

import dataclasses
import statistics
from pathlib import Path

import pytest

from hetlora.methods import METHODS
from hetlora.study.constraints import CONSTRAINTS, constraint_rows
from hetlora.study.runs import Study
from hetlora.study.stats import t_interval


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return Study("cpu-v4", root / "results", root / "work").label_configs()


def allowed(key, configs):
    (constraint,) = [c for c in CONSTRAINTS if c.key == key]
    return {label for label, cfg in configs.items() if constraint.allows(cfg) is None}


def test_each_constraint_allows_exactly_the_labels_whose_methods_can_meet_it(configs):
    labels = set(configs)
    assert len(labels) == 14
    # SecAgg+: a weighted sum of zero-padded factors with one client-computed weight (HetLoRA's family, HomLoRA)
    assert allowed("secagg", configs) == {"hetlora", "hetlora-noprune", "hetlora-naive", "hetlora-svd-revive", "fedavg-rmin", "fedavg-rmax"}
    # DP-FedAvg stands in for the same sums (SVD of products, folded residuals, rank-wise renormalising would be replaced)
    assert allowed("dp", configs) == allowed("secagg", configs)
    # a frozen 4-bit base: nothing that folds into it or trains it
    assert labels - allowed("gguf", configs) == {"fft", "fedex-lora", "fed-plora", "florist"}
    # each client at the rank its memory affords: not the HomLoRAs (one rank), not FFT (its rank does not set its memory);
    # the methods that fold have footprints of their own; the r_min device may take HomLoRA at r_min
    assert labels - allowed("own-rank", configs) == {"fedavg-rmin", "fedavg-rmax", "fft"}
    assert labels - allowed("smallest-tier", configs) == {"fedavg-rmax", "fft"}
    assert allowed("upload", configs) == labels


def test_what_the_table_allows_the_method_registry_agrees_with(configs):
    """The table asks the config's validation; the registry's flags, read directly, must say the same."""
    for label, cfg in configs.items():
        m = METHODS[cfg.method]
        assert (label in allowed("secagg", configs)) == (m.secure_weight is not None), label
        assert (label in allowed("dp", configs)) == m.dp_capable, label
        assert (label in allowed("gguf", configs)) == (not (m.folds_into_base or m.client_folds) and m.client_kind != "fft"), label


def test_an_allowed_label_really_validates_under_the_constraint_and_the_study_config_alone_does_not_satisfy_dp(configs):
    # the study's own config samples clients cyclically and prunes: DP refuses it as run; the table's DP change is what a
    # user would set, and it validates for hetlora
    with pytest.raises(ValueError, match="uniform sampling"):
        dataclasses.replace(configs["hetlora"], dp_clip=1.0, dp_noise=1.0, prune=False).validate()
    dataclasses.replace(configs["hetlora"], dp_clip=1.0, dp_noise=1.0, prune=False, sampling="uniform").validate()
    # the study runs without the median norm bound, so secure aggregation (which refuses it) changes nothing else
    assert configs["hetlora"].norm_bound is None
    dataclasses.replace(configs["hetlora"], secure_aggregation=True).validate()
    with pytest.raises(ValueError, match="norm bound"):
        dataclasses.replace(configs["hetlora"], secure_aggregation=True, norm_bound=1.5).validate()


def run(ppl, tier=None, up=1e6):
    return {"final_eval_ppl": ppl, "tier_ppl": {} if tier is None else {"5": tier}, "bytes_up_total": up}


def test_a_constraint_that_changes_the_algorithm_is_not_ranked_but_says_what_each_label_becomes(configs):
    runs = {label: {0: run(50.0)} for label in configs}
    rows = {r["key"]: r for r in constraint_rows(runs, configs)}
    for key in ("dp", "secagg"):
        assert not rows[key]["ranked"] and "ranking" not in rows[key]
    dp = {g["runs_as"]: g["labels"] for g in rows["dp"]["becomes"]}
    # under DP, pruning is off and the weights are DP-FedAvg's: hetlora, its noprune and naive variants are one algorithm
    assert dp == {"DP-FedAvg at each client's own rank": ["hetlora", "hetlora-noprune", "hetlora-naive"],
                  "DP-FedAvg at rank 5 on every client": ["fedavg-rmin"], "DP-FedAvg at rank 50 on every client": ["fedavg-rmax"],
                  "DP-FedAvg at each client's own rank, then hetlora-svd-revive's step on the sum": ["hetlora-svd-revive"]}
    secagg = {label: g["runs_as"] for g in rows["secagg"]["becomes"] for label in g["labels"]}
    assert len(rows["secagg"]["becomes"]) == 6  # weights and pruning differ: six algorithms
    assert secagg["hetlora-naive"].startswith("examples-weighted") and secagg["hetlora"].startswith("update_norm-weighted")
    assert "pruning" in secagg["hetlora"] and "pruning" not in secagg["hetlora-noprune"]
    assert all(rows[key]["ranked"] for key in ("own-rank", "smallest-tier", "gguf", "upload"))


def test_ranking_pairs_on_common_seeds_and_compares_the_best_with_the_runner_up(configs):
    cfgs = {k: configs[k] for k in ("hetlora", "flexlora", "rb-lora", "fedavg-rmin", "hetlora-naive")}
    runs = {
        "hetlora": {0: run(50.0, tier=60.0, up=9e6), 1: run(52.0, tier=66.0, up=9e6), 2: run(51.0, tier=61.0, up=9e6)},
        "flexlora": {0: run(48.0, tier=70.0), 1: run(51.0, tier=75.0), 2: run(40.0, tier=71.0)},  # seed 2 unpaired: rb-lora lacks it
        "rb-lora": {0: run(49.0, tier=55.0), 1: run(50.5, tier=58.0)},
        "fedavg-rmin": {0: run(53.0, up=1e6), 1: run(54.0, up=1e6)},
        # hetlora-naive: no run yet
    }
    family = [{"id": "vs:flexlora", "label": "flexlora", "effect_pct": -2.0, "p_holm": 0.01, "verdict": "flexlora better", "n": 2},
              {"id": "C1", "label": "fedavg-rmin", "effect_pct": 5.0, "p_holm": 0.2, "verdict": "inconclusive", "n": 2}]
    rows = {r["key"]: r for r in constraint_rows(runs, cfgs, family)}
    own = rows["own-rank"]
    assert own["seeds"] == [0, 1] and own["n"] == 2  # seed 2 is not shared by every ranked label
    assert [(r["label"], r["mean"]) for r in own["ranking"]] == [("flexlora", 49.5), ("rb-lora", 49.75), ("hetlora", 51.0)]
    assert own["unscored"] == [{"label": "hetlora-naive", "why": "no finished run yet"}]
    expected = [100 * (48.0 - 49.0) / 49.0, 100 * (51.0 - 50.5) / 50.5]
    mean, ci = t_interval(expected)
    assert own["best_vs_runner_up_pct"]["mean"] == pytest.approx(statistics.fmean(expected))
    assert own["best_vs_runner_up_pct"]["ci95"] == pytest.approx(list(ci))
    assert [r["id"] for r in own["registered"]] == ["vs:flexlora"]  # the leaders' registered rows; rb-lora has none here
    # the smallest tier: a heterogeneous adapter truncated to r_min, HomLoRA at r_min as itself
    tier = rows["smallest-tier"]
    assert [(r["label"], r["mean"]) for r in tier["ranking"]] == [("fedavg-rmin", 53.5), ("rb-lora", 56.5), ("hetlora", 63.0),
                                                                  ("flexlora", 72.5)]
    assert tier["registered"] == []  # C7 is the family's row on it; none in this family
    # the thinnest uplink ranks by megabytes and shows each label's perplexity beside them
    up = rows["upload"]
    assert up["ranking"][-1] == {"label": "hetlora", "mean": 9.0, "final_ppl": 51.0}
    assert up["best"] == "flexlora" and up["tied_with_best"] == ["rb-lora", "fedavg-rmin"]  # 1 MB each on every seed: a tie
    assert {r["label"] for r in rows["secagg"]["refused"]} == {"flexlora", "rb-lora"}


def test_a_label_whose_runs_do_not_measure_the_score_is_named_not_ranked(configs):
    cfgs = {k: configs[k] for k in ("hetlora", "florist")}
    runs = {"hetlora": {0: run(50.0, tier=60.0)}, "florist": {0: run(49.0)}}
    (tier,) = [r for r in constraint_rows(runs, cfgs) if r["key"] == "smallest-tier"]
    assert [r["label"] for r in tier["ranking"]] == ["hetlora"] and "runner_up" not in tier
    assert tier["unscored"] == [{"label": "florist", "why": "its runs do not measure it"}]


def test_no_common_seed_yet_gives_no_ranking(configs):
    cfgs = {k: configs[k] for k in ("hetlora", "flexlora")}
    runs = {"hetlora": {0: run(50.0)}, "flexlora": {1: run(49.0)}}
    (own,) = [r for r in constraint_rows(runs, cfgs) if r["key"] == "own-rank"]
    assert own["ranking"] == [] and own["best"] is None and own["n"] == 0


def test_a_diverged_run_ranks_last_and_its_comparison_has_no_interval(configs):
    cfgs = {k: configs[k] for k in ("hetlora", "flexlora")}
    runs = {"hetlora": {0: run(50.0), 1: run(51.0)}, "flexlora": {0: run(float("inf")), 1: run(49.0)}}
    (own,) = [r for r in constraint_rows(runs, cfgs) if r["key"] == "own-rank"]
    assert [r["label"] for r in own["ranking"]] == ["hetlora", "flexlora"]
    assert own["best_vs_runner_up_pct"]["mean"] is None


def test_label_configs_are_the_registered_labels(configs, tmp_path):
    assert list(configs) == list(Study("cpu-v4", tmp_path / "r", tmp_path / "w").preset.labels)
    assert configs["fedavg-rmin"].global_rank == configs["fedavg-rmin"].r_min and configs["fedavg-rmax"].global_rank == configs["fedavg-rmax"].r_max
    assert Path(configs["hetlora"].out).name == "hetlora"
