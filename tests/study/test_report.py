"""The registered study v4's report, rehearsed before its core runs exist: the committed plan.json, every one of its 14
core labels on its 20 seeds and its long regime, from synthetic runs with planted effects in the real runs' file format.

The tiny-model end-to-end test (test_runs.py) covers two labels; this one makes sure the report the 21-hour study will
end with builds for the whole registered family, judges exactly the comparisons the plan sized, and reads back effects
that were planted (hand-computed here, not taken from the code under test)."""

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from hetlora.study.report import write_report
from hetlora.study.runs import PRESETS, Study, run_label
from hetlora.study.stats import holm, t_test

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu-v4"
TEMPLATE = COMMITTED / "tuning" / "hetlora-lr0.001-s100"  # a real run's files: the format the report reads

# per-seed ratio ppl(label) / ppl(hetlora): a planted effect with a small per-seed jitter
RATIO = {"fedavg-rmin": 1.05, "fedavg-rmax": 1.02, "recon-svd": 1.08, "hetlora-noprune": 0.995, "hetlora-naive": 1.0,
         "fft": 0.80, "hetlora-svd-revive": 1.0, "fedex-lora": 1.0, "fslora": 0.97, "flexlora": 1.0, "fed-plora": 1.0,
         "florist": 1.01, "rb-lora": 1.0}
JITTER = (-0.002, 0.0, 0.002)  # symmetric, so a ratio of 1.0 stays centred on zero


def hetlora_ppl(seed: int) -> float:
    return 50.0 + (seed % 7) - 0.3 * (seed % 3)


def ppl_of(label: str, seed: int) -> float:
    if label == "hetlora":
        return hetlora_ppl(seed)
    if label == "fed-plora" and seed == 3:
        return math.inf  # a diverged run: its row is "not tested", p = 1 in the family
    return hetlora_ppl(seed) * (RATIO[label] + JITTER[seed % 3])


def write_run(directory: Path, label: str, seed: int, ppl: float, config: dict, block: dict, *, overfit: bool = False,
              rejected: tuple[int, ...] = ()) -> None:
    rounds = config["rounds"]
    directory.mkdir(parents=True)
    summary = json.loads((TEMPLATE / "summary.json").read_text())
    summary["config"] = config
    bytes_up = 1_000_000 * (1.1 if label == "hetlora-noprune" else 1.0)
    summary |= {"method": label, "full_eval_ppl": ppl, "final_eval_ppl": ppl, "initial_eval_ppl": 70.0, "bytes_up_total": bytes_up,
                "final_tier_eval_ppl": {"5": hetlora_ppl(seed) * 1.2} if label == "hetlora" else {}, "seconds_total": 100.0,
                "rejected_rounds": list(rejected)}
    (directory / "summary.json").write_text(json.dumps(summary))
    rows = []
    for r in range(1, rounds + 1):
        # a curve that falls to round 10 and, when overfitting, turns up while the train loss keeps falling
        eval_ppl = ppl + (max(0, 10 - r) if not overfit else abs(10 - r)) if math.isfinite(ppl) else math.inf
        rows.append({"round": r, "eval_ppl": eval_ppl, "train_loss": 4.0 - 0.05 * r, "live_rank": 20, "trainable_rank": 20})
    # ROUGE-L planted 0.005 lower for fedavg-rmax than for every other label, on every seed
    rows[-1] |= {"rouge_l": 0.1 + 0.001 * seed - (0.005 if label == "fedavg-rmax" else 0.0), "rouge_size": 64}
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "block.json").write_text(json.dumps(block))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    preset = PRESETS["cpu-v4"]
    results_root = tmp_path_factory.mktemp("results")
    results = results_root / preset.results_dir
    results.mkdir()
    shutil.copy(COMMITTED / "plan.json", results / "plan.json")
    block = json.loads((TEMPLATE / "block.json").read_text())
    labels = list(preset.labels)
    tuning = {"complete": True, "seeds": list(preset.tune_seeds), "rounds": preset.tune_rounds, "long_best_new": "florist",
              "labels": {label: {"grid": [3e-4, 1e-3, 3e-3], "chosen": 1e-3, "bracketed": True, "complete": True,
                                 "scores": {"0.0003": 50.0, "0.001": 48.0, "0.003": 52.0}} for label in labels}}
    (results / "tuning.json").write_text(json.dumps(tuning))
    shutil.copytree(COMMITTED / "tuning", results / "tuning")  # the real tuning runs: their compute goes to their block
    study = Study("cpu-v4", results_root, tmp_path_factory.mktemp("work"))

    def config(label, seed, lr=1e-3, **changes):  # the settings the plan asks of (label, seed), as a run records them
        return run_label(label, seed, study.base(lr=lr, **changes), Path("unused")).settings()

    for label in labels:
        for seed in preset.seeds:
            stale = (label, seed) == ("rb-lora", 19)  # made at another rate than its tuned one: left out, named
            write_run(results / "runs" / f"{label}-s{seed}", label, seed, ppl_of(label, seed), config(label, seed, lr=3e-3 if stale else 1e-3),
                      block, rejected=(4,) if (label, seed) == ("flexlora", 7) else ())
    for label in preset.long_labels + ("florist",):
        for seed in preset.long_seeds:
            write_run(results / "long" / "runs" / f"{label}-s{seed}", label, seed, ppl_of(label, seed),
                      config(label, seed, rounds=preset.long_rounds), block, overfit=label == "fedavg-rmax")
    write_run(results / "runs" / "hetlora-s20", "hetlora", 20, 1.0, config("hetlora", 20), block)  # not a registered seed
    md = write_report(study)
    return json.loads((results / "study.json").read_text()), md.read_text(), results


def test_the_report_judges_exactly_the_family_the_plan_registered(report):
    data, _, results = report
    plan = json.loads((results / "plan.json").read_text())
    registered = [(c["id"], c["label"]) for c in plan["sizing"]["comparisons"]]
    assert sorted((c["id"], c["label"]) for c in data["comparisons"]) == sorted(registered)
    assert {c["family_size"] for c in data["comparisons"]} == {plan["sizing"]["family_size"]} == {15}
    assert all(c["n"] == 20 for c in data["comparisons"] if c["label"] not in ("fed-plora", "rb-lora"))
    assert data["plan"]["n"] == 20 and data["plan"]["core_labels"] == list(PRESETS["cpu-v4"].labels)
    # a run whose recorded settings are not the plan's is left out and named, whatever its directory says
    reasons = {i["run"]: i["reason"] for i in data["ignored_runs"]}
    assert set(reasons) == {"hetlora-s20", "rb-lora-s19"}
    assert reasons["rb-lora-s19"] == "its recorded settings are not the plan's: lr 0.003 (the plan's 0.001)"
    rb = next(c for c in data["comparisons"] if c["label"] == "rb-lora")
    assert rb["n"] == 19 and 19 not in rb["seeds"]


def test_study_json_is_strict_json_with_a_diverged_run_written_as_a_string(report):
    _, _, results = report

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    data = json.loads((results / "study.json").read_text(), parse_constant=refuse)
    (diverged,) = [r for r in data["runs"] if r["label"] == "fed-plora" and r["seed"] == 3]
    assert diverged["final_eval_ppl"] == "inf"


def test_the_planted_effects_are_read_back_as_percent_of_hetloras_perplexity(report):
    data, _, _ = report
    rows = {c["id"]: c for c in data["comparisons"]}
    seeds = range(20)
    for cid, label in (("C1", "fedavg-rmin"), ("vs:fslora", "fslora"), ("vs:fedex-lora", "fedex-lora")):
        expected = [100 * (ppl_of(label, s) / hetlora_ppl(s) - 1) for s in seeds]
        assert rows[cid]["effect_pct"] == pytest.approx(statistics.fmean(expected), abs=1e-9)
        assert rows[cid]["p"] == pytest.approx(t_test(expected), rel=1e-9)
    assert rows["C1"]["effect_pct"] == pytest.approx(5.0, abs=0.02) and rows["C1"]["verdict"] == "reproduced"
    assert rows["vs:fslora"]["effect_pct"] == pytest.approx(-3.0, abs=0.02) and rows["vs:fslora"]["verdict"] == "fslora better"
    assert rows["vs:fedex-lora"]["verdict"] == "inconclusive"
    assert rows["C3"]["paper_effect_pct"] == pytest.approx(100 * (323.89 / 53.93 - 1))
    # C4: noprune uploads 10 % more and is 0.5 % better: 0.1 · 9.09 % saved − 0.50 % cost = +0.406 % per seed (mean)
    saved, cost = 100 * 0.1 / 1.1, statistics.fmean(100 * (1 / (0.995 + JITTER[s % 3]) - 1) for s in seeds)
    assert rows["C4"]["upload_saved_pct"] == pytest.approx(saved) and rows["C4"]["ppl_cost_pct"] == pytest.approx(cost, rel=1e-9)
    assert rows["C4"]["effect_pct"] == pytest.approx(0.1 * saved - cost, abs=1e-3) and rows["C4"]["verdict"] == "reproduced"
    # C6: (ppl(fedavg-rmin) + ppl(fft)) / 2 against hetlora: (1.05 + 0.80) / 2 − 1 = −7.5 % (HetLoRA does not close half the gap)
    assert rows["C6"]["effect_pct"] == pytest.approx(-7.5, abs=0.02) and rows["C6"]["verdict"] == "not reproduced"
    # C7: HomLoRA r_min (1.05 h) against hetlora truncated to r_min (1.2 h): 1.05 / 1.2 − 1 = −12.5 %
    assert rows["C7"]["effect_pct"] == pytest.approx(-12.5, abs=0.02) and rows["C7"]["verdict"] == "not reproduced"


def test_a_diverged_seed_leaves_its_row_untested_and_counts_as_p_one_in_holm(report):
    data, _, _ = report
    rows = {c["id"]: c for c in data["comparisons"]}
    assert rows["vs:fed-plora"]["verdict"].startswith("not tested") and rows["vs:fed-plora"]["not_finite_seeds"] == [3]
    raw = {c["id"]: (c["p"] if c["p"] is not None else 1.0) for c in data["comparisons"]}
    assert {cid: c["p_holm"] for cid, c in rows.items()} == pytest.approx(holm(raw))
    noted = {(n["label"], n["seed"]) for n in data["noted_runs"]}
    assert noted == {("fed-plora", 3), ("flexlora", 7)}


def test_the_long_regime_reports_the_best_new_method_and_the_overfitting_homlora(report):
    data, md, _ = report
    long = data["long"]
    assert set(long["methods"]) == {"hetlora", "fedavg-rmin", "fedavg-rmax", "fslora", "florist"}
    assert set(long["paired"]) == {"fedavg-rmin", "fedavg-rmax", "fslora", "florist"}
    assert long["methods"]["fedavg-rmax"]["overfitting_seeds"] == 5 and long["methods"]["hetlora"]["overfitting_seeds"] == 0
    assert all(s["best_round"] == 10 for s in long["methods"]["fedavg-rmax"]["seeds"])
    # the long regime's paired rows also read as % of hetlora's perplexity, like the family's (descriptive)
    florist = [100 * (ppl_of("florist", s) / hetlora_ppl(s) - 1) for s in range(5)]
    assert long["paired"]["florist"]["effect_pct"] == pytest.approx(statistics.fmean(florist), abs=1e-9)
    assert long["paired"]["florist"]["n"] == 5 and "% of hetlora's" in md
    assert "## The long regime (30 rounds at the core set's per-round budget)" in md


def test_the_markdown_names_every_label_tuning_rate_and_rouge(report):
    data, md, results = report
    for label in PRESETS["cpu-v4"].labels:
        assert f"| {label} |" in md
    assert "## Every comparison with HetLoRA" in md and "## Learning rates (each label's own" in md and "C4's trade" in md
    family = md[md.index("## Every comparison"):md.index("## Which method for which constraint")]
    assert family.count("interim") == 2 and "(interim: 19 of 20)" in family  # only rb-lora's row (its seed 19 left out); the footer's rule
    assert "every run has a score" in md and "fewest prompts in any run: 64" in md
    assert "C6's gap, ppl(fedavg-rmin) − ppl(fft) as % of HetLoRA's: 25.0" in md and "< 0.001" in md
    rouge = {r["label"]: r["rouge_l"] for r in data["table"]}
    assert rouge["hetlora"] == pytest.approx(statistics.fmean(0.1 + 0.001 * s for s in range(20)))
    # paired with hetlora: fedavg-rmax 0.5 points worse on all 20 seeds; rb-lora level on the 19 it has (seed 19 left out)
    paired = {r["label"]: r for r in data["rouge_vs_hetlora"]}
    assert paired["fedavg-rmax"]["n"] == 20 and paired["fedavg-rmax"]["mean_points"] == pytest.approx(0.5)
    assert paired["rb-lora"]["n"] == 19 and paired["rb-lora"]["mean_points"] == pytest.approx(0.0, abs=1e-9)
    assert "| fedavg-rmax | 20 | 0.50 (CI 0.50…0.50) |" in md
    assert list((results / "plots").glob("*.png"))
    # every label's tuning planted as 3e-4: 50, 1e-3: 48 (chosen), 3e-3: 52: the runner-up 3e-4 is (50 − 48) / 48 = 4.2 % worse
    assert "| hetlora | [0.0003, 0.001, 0.003] | 0.0003: 50.00, 0.001: 48.00, 0.003: 52.00 | 0.001 | 0.0003 (+4.2 %) | yes |" in md


def test_the_compute_per_block_counts_core_long_and_tuning_runs(report):
    from hetlora.study.report import compute_per_block

    data, md, results = report
    here = json.loads((TEMPLATE / "block.json").read_text())  # the synthetic runs' block; tuning may hold other classes' runs
    tuned = [json.loads(f.read_text()) for f in (results / "tuning").glob("*/summary.json")
             if json.loads((f.parent / "block.json").read_text()) == here]
    (row,) = [r for r in compute_per_block(data) if r["block"] == "cpu AVX512, 2 threads / bf16 / 0c6bf5a4c9b1f6ac"]
    counted = 14 * 20 - 1 + 5 * 5  # the core runs but the one left out (rb-lora-s19), and the long ones
    assert row["runs"] == counted + len(tuned)
    assert row["seconds"] == pytest.approx(100.0 * counted + sum(t["seconds_total"] for t in tuned))
    assert row["seeds"].endswith(f"tuning ({len(tuned)} runs)") and row["block"] == "cpu AVX512, 2 threads / bf16 / 0c6bf5a4c9b1f6ac"
    assert f"tuning ({len(tuned)} runs)" in md


def test_which_method_for_which_constraint_ranks_the_planted_effects_among_what_each_constraint_allows(report):
    data, md, _ = report
    rows = {c["key"]: c for c in data["constraints"]}
    # fslora is planted 3 % better than hetlora, hetlora-noprune 0.5 %; rb-lora lacks seed 19 (left out), so the rows that
    # allow it pair on seeds 0–18; each client at its own rank: not the HomLoRAs (one rank) nor fft (no rank sets its memory)
    own = rows["own-rank"]
    assert own["best"] == "fslora" and own["runner_up"] == "hetlora-noprune" and own["seeds"] == list(range(19))
    assert {r["label"] for r in own["refused"]} == {"fedavg-rmin", "fedavg-rmax", "fft"}
    expected = [100 * ((0.97 + JITTER[s % 3]) / (0.995 + JITTER[s % 3]) - 1) for s in range(19)]
    assert own["best_vs_runner_up_pct"]["mean"] == pytest.approx(statistics.fmean(expected), abs=1e-9)
    assert [r["id"] for r in own["registered"]] == ["vs:fslora"]  # noprune's family row is C4's trade, not a perplexity row
    upload = rows["upload"]  # every label uploads 1 MB but noprune (1.1 MB): the best is tied with twelve others
    assert upload["ranking"][-1]["label"] == "hetlora-noprune" and len(upload["tied_with_best"]) == 12
    assert rows["gguf"]["best"] == "fslora" and {r["label"] for r in rows["gguf"]["refused"]} == {"fft", "fedex-lora", "fed-plora", "florist"}
    tier = rows["smallest-tier"]  # only hetlora's runs carry a tier perplexity here; HomLoRA r_min is its own
    assert [r["label"] for r in tier["ranking"]] == ["fedavg-rmin", "hetlora"]
    assert [r["id"] for r in tier["registered"]] == ["C7"]  # the family's own question for the r_min device
    assert not rows["dp"]["ranked"] and not rows["secagg"]["ranked"]  # the study ran nothing under DP or SecAgg+
    assert "hetlora, hetlora-noprune, hetlora-naive → DP-FedAvg at each client's own rank" in md
    assert "## Which method for which constraint" in md and "| a 4-bit GGUF base on the device" in md
    # rows not ranked by final perplexity show it beside their own score (MB without decimals for the uplink)
    upload_line = next(line for line in md.splitlines() if line.startswith("| the thinnest uplink"))
    assert "hetlora-noprune 1 (ppl " in upload_line and "hetlora-noprune 1.10" not in upload_line


def test_how_much_each_verdict_rests_on_single_seeds_is_read_off_the_planted_effects(report):
    data, md, _ = report
    rows = {r["id"]: r for r in data["sensitivity"]}
    assert [r["id"] for r in data["sensitivity"]] == [c["id"] for c in data["comparisons"]]
    # C1 is planted 5 % on every seed (jitter ±0.2 %): all 20 seeds on HetLoRA's side, exact Wilcoxon p = 2 / 2^20, Holm × 15
    c1 = rows["C1"]
    assert (c1["seeds_on_hetloras_side"], c1["seeds_on_other_side"]) == (20, 0)
    assert c1["wilcoxon_p"] == pytest.approx(2 / 2 ** 20) and c1["wilcoxon_p_holm"] == pytest.approx(15 * 2 / 2 ** 20)
    assert c1["wilcoxon_verdict"] == "reproduced" and c1["verdict_flips_without"] == []
    assert c1["median_pct"] == pytest.approx(5.0, abs=0.21)
    # the diverged fed-plora row is not read at all
    assert rows["vs:fed-plora"]["note"] == "not tested by the registered rule"
    assert "## How much each verdict rests on single seeds" in md


def test_the_readme_block_reads_the_registered_family_off_study_json(report):
    from hetlora.study.readme import load_report, readme_block

    data, _, results = report
    block = readme_block(load_report(results / "study.json"), "cpu-v4")
    # rb-lora's seed 19 was left out (another rate), so 279 of the plan's 280 core runs count and every row is interim
    assert "279 of 280 core runs and 25 of 25 long-regime runs finished; tuning complete." in block
    c1 = next(c for c in data["comparisons"] if c["id"] == "C1")
    low, high = c1["ci95_pct"]
    assert (f"| C1 | fedavg-rmin | {c1['effect_pct']:.2f} (CI {low:.2f}…{high:.2f}) | 49.3 | 20 | < 0.001 | "
            "reproduced (interim: other rows still owe seeds) |") in block
    assert "| vs:rb-lora | rb-lora |" in block and "(interim, 19 of 20 seeds)" in block
    # fslora is planted best under mixed memory (3 % better than hetlora), and the GGUF row refuses the folding methods
    assert "| devices of mixed memory, each training the rank it affords | fslora " in block
    assert "| fft, fedex-lora, fed-plora, florist |" in block
    assert "no row's verdict changes with any one seed left out" in block
    # the long regime: fedavg-rmax's curves were planted to turn up on all 5 seeds; ROUGE-L: fedavg-rmax 0.5 points
    # worse on every seed (the only interval apart from 0); compute: one block, its core, long and tuning runs
    long = data["long"]["methods"]["fedavg-rmax"]
    assert f"| fedavg-rmax | {long['final_eval_ppl_mean']:.2f} " in block and "| 5 of 5 |" in block
    # planted: fedavg-rmax's curves (30 rounds) bottom out at round 10 on every long seed
    assert "| s0: 10, s1: 10, s2: 10, s3: 10, s4: 10 | 5 of 5 |" in block
    assert "25 of 25 runs" in block
    assert "fedavg-rmax 0.50 (CI 0.50…0.50); every other label's interval includes 0." in block
    assert "Compute per machine class" in block and "(0–19; long 0–4; tuning (" in block
