"""The study: claim arithmetic on hand-made numbers, and a resumable end-to-end run on the tiny model."""

import json
from dataclasses import replace

import pytest

from hetlora.study import runs as study
from hetlora.study.stats import holm, interval_verdict, t_interval, t_quantile, t_test, verdict
from hetlora.study.report import write_report
from hetlora.study.runs import PRESETS, Preset, Study, claims
from hetlora.study.claims import beats_hetlora, curve_shape, variant_rows
from hetlora.study.plan import power, seeds_needed, size_claim


def test_t_interval_and_verdicts():
    mean, (lo, hi) = t_interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302652729911275 (tables); exact quantiles for any df, not a table that stops at 20
    assert mean == 2.0 and lo == pytest.approx(2 - 4.3026527 / 3**0.5, rel=1e-7) and hi == pytest.approx(2 + 4.3026527 / 3**0.5, rel=1e-7)
    assert t_quantile(0.975, 25) == pytest.approx(2.0595385527, rel=1e-9) and t_quantile(0.975, 200) == pytest.approx(1.9718962236, rel=1e-9)
    assert interval_verdict((0.1, 2.0)) == "reproduced" and interval_verdict((-3.0, -0.1)) == "not reproduced"
    assert interval_verdict((-1.0, 1.0)) == "inconclusive" and interval_verdict(None) == "inconclusive"
    assert verdict(1.0, 0.01) == "reproduced" and verdict(-1.0, 0.01) == "not reproduced" and verdict(1.0, 0.2) == "inconclusive"


def test_t_test_and_holm_against_hand_computed_values():
    # mean 2, sd 1, n 3: t = 2·√3 = 3.4641, two-sided p = 0.074180 (df 2)
    assert t_test([1.0, 2.0, 3.0]) == pytest.approx(0.0741799, rel=1e-5)
    assert t_test([1.0, 2.0, 3.0], alternative="greater") == pytest.approx(0.0370900, rel=1e-5)
    assert t_test([1.0, 2.0, 3.0], null=4.0, alternative="less") == pytest.approx(0.0370900, rel=1e-5)
    # Holm: sorted 0.01, 0.02, 0.04 → ×3, ×2, ×1 = 0.03, 0.04, 0.04 (made monotone); 0.5 stays ≤ 1
    assert holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": 0.5}) == pytest.approx({"b": 0.04, "c": 0.06, "a": 0.08, "d": 0.5})


def fake(label, seed, ppl, **kw):
    base = {"label": label, "seed": seed, "final_eval_ppl": ppl, "bytes_up_total": 100, "mean_final_rank": 20.0,
            "trainable_params": 10, "lr": 1e-3, "tier_ppl": {"5": ppl + 1}}
    return base | kw


def test_claims_pair_by_seed_and_follow_the_verdict_rule():
    runs = {
        "hetlora": {s: fake("hetlora", s, 50 + s, bytes_up_total=80, mean_final_rank=15.0) for s in range(3)},
        "fedavg-rmin": {s: fake("fedavg-rmin", s, 60 + s) for s in range(3)},  # always 10 worse: reproduced
        "fedavg-rmax": {s: fake("fedavg-rmax", s, 40 + s) for s in range(3)},  # always 10 better: not reproduced
        "recon-svd": {s: fake("recon-svd", s, [45, 56, 58][s]) for s in range(3)},  # mixed: inconclusive
        "hetlora-noprune": {s: fake("hetlora-noprune", s, 50 + s + [0.05, -0.02, 0.03][s]) for s in range(3)},
        "fft": {s: fake("fft", s, 30 + s, trainable_params=1000, bytes_up_total=10_000) for s in range(3)},
    }
    by_id = {c["id"]: c for c in claims(runs, PRESETS["cpu"])}
    assert by_id["C1"]["verdict"] == "reproduced" and by_id["C1"]["mean_diff"] == pytest.approx(10)
    assert by_id["C2"]["verdict"] == "not reproduced" and by_id["C3"]["verdict"] == "inconclusive"
    assert by_id["C4"]["verdict"] == "reproduced"  # bytes always 20 lower, ranks lower, perplexity within ±0.1 %
    # "not significantly worse" is not "no worse": differences of +1 %, −0.8 %, +0.2 % do not show non-inferiority at 1 %
    runs["hetlora-noprune"] = {s: fake("hetlora-noprune", s, 50 + s + [0.5, -0.4, 0.1][s]) for s in range(3)}
    assert {c["id"]: c for c in claims(runs, PRESETS["cpu"])}["C4"]["verdict"] == "inconclusive"
    assert by_id["C5"]["verdict"] == "inconclusive" and by_id["C5"]["n"] == 0  # no hetlora-naive runs yet
    # C6: best HomLoRA is fedavg-rmax (40+s), FFT 30+s, HetLoRA 50+s: the midpoint (35+s) minus HetLoRA is −15
    assert by_id["C6"]["verdict"] == "not reproduced" and by_id["C6"]["mean_diff"] == pytest.approx(-15.0)
    assert by_id["C6"]["trainable_params_vs_fft"] == pytest.approx(0.01)
    assert by_id["C7"]["mean_diff"] == pytest.approx(9.0)  # HomLoRA r_min vs hetlora truncated to r_min (ppl + 1)


def test_power_of_the_paired_t_test_against_published_values():
    # Cohen's tables / G*Power: a paired t-test, d = 1, n = 10, two-sided α = 0.05 has power 0.803; n = 10 is the
    # smallest n reaching 0.8; d = 0.5 needs n = 34
    assert power(1.0, 1.0, 10, 0.05) == pytest.approx(0.8031, abs=5e-4)
    assert seeds_needed(1.0, 1.0, 0.05) == 10 and seeds_needed(0.5, 1.0, 0.05) == 34
    assert seeds_needed(-2.0, 2.0, 0.05) == 10  # the sign of the effect does not matter, only its size
    # one-sided non-inferiority: the effect is the distance from −margin
    c = size_claim("C4", [-0.5, 0.5, 0.0], family_size=1, n_run=10, margin_pct=1.0)
    assert c["sides"] == 1 and c["power_at_n"] == pytest.approx(power(1.0, 0.5, 10, 0.05, sides=1))
    assert size_claim("C9", [1.0], 7, 10)["note"].startswith("no earlier paired runs")


def test_c8_names_a_method_that_beats_hetlora_after_holm():
    runs = {"hetlora": {s: fake("hetlora", s, 50 + s) for s in range(5)},
            "fslora": {s: fake("fslora", s, 50 + s - [1.0, 1.1, 0.9, 1.05, 0.95][s]) for s in range(5)},  # ~1 better every seed
            "fedex-lora": {s: fake("fedex-lora", s, 50 + s + [-1, 1, -2, 2, 0.5][s]) for s in range(5)}}
    c8 = beats_hetlora(runs, ["hetlora", "fslora", "fedex-lora"])
    rows = {r["versus"]: r for r in c8["rows"]}
    assert rows["fslora"]["verdict"] == "beats hetlora" and rows["fedex-lora"]["verdict"] == "inconclusive"
    assert c8["winners"] == ["fslora"] and c8["verdict"] == "yes: fslora"
    # Holm: the smaller p is doubled, the larger kept (made monotone)
    assert rows["fslora"]["p_holm"] == pytest.approx(min(1, 2 * rows["fslora"]["p"]))
    assert rows["fedex-lora"]["p_holm"] == pytest.approx(max(rows["fedex-lora"]["p"], rows["fslora"]["p_holm"]))
    assert beats_hetlora({"hetlora": runs["hetlora"]}, ["hetlora", "fslora"])["verdict"] == "no paired runs yet"


def test_variant_rows_pair_final_and_r_min_tier_perplexity():
    runs = {"hetlora": {s: fake("hetlora", s, 50, tier_ppl={"5": 60.0 + s}) for s in range(3)},
            "hetlora-ordered": {s: fake("hetlora-ordered", s, 49, tier_ppl={"5": 55.0 + s}) for s in range(3)}}
    (row,) = variant_rows(runs, ["hetlora-ordered"], 5)
    assert row["final_diff"] == pytest.approx(-1.0) and row["tier_diff"] == pytest.approx(-5.0) and row["tier_n"] == 3


def test_curve_shape_finds_the_best_round_and_overfitting():
    run = {"seed": 0, "final_eval_ppl": 40.0, "curve": [[0, 90], [1, 50], [2, 40], [3, 42], [4, 45]],
           "train_curve": [[1, 4.0], [2, 3.5], [3, 3.2], [4, 3.0]]}
    shape = curve_shape(run)
    assert shape["best_round"] == 2 and shape["turns_up"] and shape["train_loss_falls_after_best"]
    run["curve"] = [[0, 90], [1, 50], [2, 45], [3, 42], [4, 41]]
    assert curve_shape(run)["best_round"] == 4 and not curve_shape(run)["turns_up"]


def unit_preset(**kw):
    return Preset(seeds=(0, 1), base=PRESETS["smoke"].base, lr_grid=(1e-2,), fft_lr_grid=(1e-4,), tune_rounds=1,
                  labels=("hetlora", "fedavg-rmin"), **kw)


def test_a_study_resumes_and_rebuilds_its_report(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "unit", unit_preset(long_labels=("hetlora",), long_seeds=(0,), long_steps_factor=2))
    monkeypatch.setattr(study, "TUNE_LORA_LABELS", ["hetlora"])
    log = []
    s = Study("unit", tmp_path / "results", tmp_path / "work", log=log.append)
    s.run_all()
    results = tmp_path / "results" / "unit"
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["fedavg-rmin-s0", "fedavg-rmin-s1", "hetlora-s0", "hetlora-s1"]
    # a kept run's work directory keeps no checkpoint, adapter or folded delta (they filled the disk), only its small files
    work_dirs = [d for d in (tmp_path / "work").rglob("*-s[0-9]") if (d / "config.json").is_file()]
    assert len(work_dirs) >= 5 and not [p for d in work_dirs for p in d.iterdir() if p.name in study.HEAVY_OUTPUTS]
    long_summary = json.loads((results / "long" / "runs" / "hetlora-s0" / "summary.json").read_text())
    assert long_summary["config"]["local_steps"] == 2 * PRESETS["smoke"].base["local_steps"]
    block = json.loads((results / "runs" / "hetlora-s0" / "block.json").read_text())
    from hetlora.device.host import resolve_precision

    # "auto" is bf16 on a CPU with native bf16 and fp32 elsewhere: the block records what this machine resolved
    assert block["precision"] == resolve_precision("auto", "cpu") in ("fp32", "bf16") and block["device_class"].startswith("cpu ") and len(block["behaviour"]) == 16
    path = write_report(s)
    report = json.loads((path.parent / "study.json").read_text())
    assert {c["id"] for c in report["claims"]} == {f"C{i}" for i in range(1, 8)} and report["c8"]["id"] == "C8"
    assert report["plan"]["design"]["core_seeds"] == [0, 1] and report["long"]["methods"]["hetlora"]["n"] == 1
    assert report["seed_blocks"]["runs"]["0"]["block"]["behaviour"] == block["behaviour"]
    assert report["provenance"]["eos_token"]["token"] == "<|im_end|>" and report["provenance"]["commits"]
    assert report["config"]["seeds"] == [0, 1] and report["config"]["final_eval_size"] == 8
    text = path.read_text()
    assert text.startswith("# HetLoRA's claims on model `tiny` + chitchat")  # not "SmolLM2" for any model
    assert text.index("| **C1**") < text.index("## C8") < text.index("## The long regime") < text.index("## Every method")
    assert (path.parent / "plots" / "long_regime.png").is_file() and (path.parent / "plots" / "tier_ppl.png").is_file()
    assert all(r["final_eval_size"] == 8 for r in report["runs"])
    # a second sitting runs only what is missing
    import shutil

    shutil.rmtree(results / "runs" / "hetlora-s1")
    log.clear()
    Study("unit", tmp_path / "results", tmp_path / "work", log=log.append).run_all()
    ran = [m for m in log if "seed" in m and "block" not in m]
    assert len(ran) == 1 and ran[0].strip().startswith("hetlora seed 1"), log


def test_the_registered_plan_is_not_changed_after_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "unit", unit_preset())
    s = Study("unit", tmp_path / "results", tmp_path / "work")
    registered = s.plan()
    assert (tmp_path / "results" / "unit" / "plan.json").is_file() and s.plan() == registered
    monkeypatch.setitem(study.PRESETS, "unit", unit_preset(reference_labels=("ffa",), reference_seeds=(0,)))
    with pytest.raises(ValueError, match="differs from its pre-registered plan .* in reference_labels, reference_seeds"):
        Study("unit", tmp_path / "results", tmp_path / "work").run_all()


def test_the_cpu_plan_is_sized_from_the_committed_v2_runs(tmp_path):
    """The registered v3 plan recomputes from the committed v2 runs and pilot (so a reader can check it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if not (root / "cpu-v2" / "runs").is_dir() or not (root / "cpu-v3" / "plan.json").is_file():
        pytest.skip("no committed v2 runs or v3 plan")
    import shutil

    for d in ("cpu-v2", "pilot-rank-health"):
        shutil.copytree(root / d, tmp_path / d)
    fresh = Study("cpu", tmp_path, tmp_path / "work").plan()
    committed = json.loads((root / "cpu-v3" / "plan.json").read_text())
    assert fresh["design"] == committed["design"]
    for mine, theirs in zip(fresh["claims"] + fresh["c8"], committed["claims"] + committed["c8"], strict=True):
        assert (mine["id"], mine.get("seeds_needed_80pct"), mine.get("expected")) == (theirs["id"], theirs.get("seeds_needed_80pct"), theirs.get("expected"))
        assert mine.get("prior_mean", 0) == pytest.approx(theirs.get("prior_mean", 0), rel=1e-9)
    by_id = {c["id"]: c for c in committed["claims"]}
    assert by_id["C1"]["prior_n"] == 3 and by_id["C1"]["prior_mean"] == pytest.approx(1.8297, abs=1e-3)


def test_a_seed_of_another_block_is_not_run_and_a_mixed_seed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "unit", unit_preset())
    monkeypatch.setattr(study, "TUNE_LORA_LABELS", ["hetlora"])
    s = Study("unit", tmp_path / "results", tmp_path / "work", log=lambda m: None)
    s.run_all()
    results = tmp_path / "results" / "unit" / "runs"
    mine = json.loads((results / "hetlora-s1" / "block.json").read_text())
    other = mine | {"precision": {"fp32": "bf16", "bf16": "fp32"}[mine["precision"]]}  # the other precision, on any machine
    (results / "hetlora-s1" / "block.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seed 1 under .* mixes seed blocks"):
        write_report(s)
    import shutil

    shutil.rmtree(results / "fedavg-rmin-s1")  # seed 1 now holds one run, of another block: this machine leaves it alone
    log = []
    Study("unit", tmp_path / "results", tmp_path / "work", log=log.append).run_all()
    assert any("seed 1 (runs) was run in block" in m and "not mixing" in m for m in log) and not (results / "fedavg-rmin-s1").exists()


def test_a_paused_study_starts_no_run_until_the_pause_file_goes(tmp_path):
    import threading

    s = Study("smoke", tmp_path / "results", tmp_path / "work", log=lambda m: None)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / study.PAUSE_FILE).touch()
    done = threading.Event()
    t = threading.Thread(target=lambda: (s.wait_while_paused(poll_seconds=0.01), done.set()))
    t.start()
    assert not done.wait(0.2)
    (tmp_path / "work" / study.PAUSE_FILE).unlink()
    assert done.wait(5)
    t.join()


def test_the_fingerprint_changes_when_the_training_computes_other_numbers(tmp_path, monkeypatch):
    a = study.behaviour_fingerprint("fp32", tmp_path)
    assert study.behaviour_fingerprint("fp32", tmp_path) == a  # deterministic
    monkeypatch.setitem(study.PRESETS, "smoke", Preset(seeds=(0,), base=PRESETS["smoke"].base | {"local_steps": 2}))
    assert study.behaviour_fingerprint("fp32", tmp_path) != a


def test_a_fingerprint_of_every_label_notices_a_change_to_any_labels_arithmetic(tmp_path, monkeypatch):
    """v4's block fingerprint ran hetlora and fft only, so a commit changing fslora's server arithmetic kept the block
    (why v4 runs pinned). From version 5 a study fingerprints every one of its labels: the attack, a server step off
    by one part in 10⁴ in fslora alone, must change the fingerprint that includes fslora, and not the one that doesn't."""
    from hetlora.methods.fslora import FSLoRA

    labels = ("hetlora", "fslora")
    plain_two, with_fslora = study.behaviour_fingerprint("fp32", tmp_path), study.behaviour_fingerprint("fp32", tmp_path, labels)
    finish = FSLoRA.finish_changes
    monkeypatch.setattr(FSLoRA, "finish_changes", lambda self, acc, clients, ctx: {
        k: v * (1 + 1e-4) for k, v in finish(self, acc, clients, ctx).items()})
    assert study.behaviour_fingerprint("fp32", tmp_path) == plain_two
    assert study.behaviour_fingerprint("fp32", tmp_path, labels) != with_fslora
    v5 = study.Study("cpu-v4", tmp_path / "results", tmp_path / "work")
    assert v5.fingerprint_labels() == study.FINGERPRINT_LABELS  # the registered v4 keeps the block it was made with
    monkeypatch.setitem(study.PRESETS, "cpu-v5", replace(PRESETS["cpu-v4"], version=5))
    assert set(study.Study("cpu-v5", tmp_path / "results", tmp_path / "work").fingerprint_labels()) == set(PRESETS["cpu-v4"].labels)


def test_a_presets_auto_device_is_the_blocks_device_on_a_gpu_machine(tmp_path, monkeypatch):
    """A preset leaves the device at "auto", so on a GPU machine its runs train on cuda: its block must say so (it
    said "cpu ..." with the CPU's precision, and fingerprinted on whatever "auto" picked)."""
    import torch

    seen = []
    monkeypatch.setattr(study, "behaviour_fingerprint", lambda precision, work, labels, device: seen.append((precision, device)) or "x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    block = study.machine_block("auto", Study("cpu-v4", tmp_path, tmp_path / "work").base().device, tmp_path)
    assert block["device_class"] == "cuda: Fake GPU" and block["precision"] == "bf16" and seen == [("bf16", "cuda")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    block = study.machine_block("auto", "auto", tmp_path)
    assert block["device_class"].startswith("cpu ") and seen[-1][1] == "cpu"


def test_an_unfinished_seed_is_set_aside_and_run_again_whole_in_this_block(tmp_path, monkeypatch):
    """No machine of a seed's block to finish it: the seed's runs go aside (a record) and this block runs it whole.

    The attack: setting aside a *complete* seed would let results choose which seeds count — it must fail.
    """
    import shutil

    monkeypatch.setitem(study.PRESETS, "unit", unit_preset())
    monkeypatch.setattr(study, "TUNE_LORA_LABELS", ["hetlora"])
    s = Study("unit", tmp_path / "results", tmp_path / "work", log=lambda m: None)
    s.run_all()
    results = tmp_path / "results" / "unit"
    with pytest.raises(ValueError, match="seed 0 under .* is complete in its block; a complete seed is never set aside"):
        s.set_aside(0, "results look bad")
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["fedavg-rmin-s0", "fedavg-rmin-s1", "hetlora-s0", "hetlora-s1"]
    mine = json.loads((results / "runs" / "hetlora-s1" / "block.json").read_text())
    other = mine | {"precision": {"fp32": "bf16", "bf16": "fp32"}[mine["precision"]]}  # as if run on another machine
    (results / "runs" / "hetlora-s1" / "block.json").write_text(json.dumps(other))
    shutil.rmtree(results / "runs" / "fedavg-rmin-s1")  # seed 1 unfinished in that other block
    other_ppl = json.loads((results / "runs" / "hetlora-s1" / "summary.json").read_text())["full_eval_ppl"]
    with pytest.raises(ValueError, match="needs a reason"):
        s.set_aside(1, "  ")
    with pytest.raises(ValueError, match="seed 7 has no finished runs"):
        s.set_aside(7, "no such seed")
    target = s.set_aside(1, "no machine of that block was lent")
    assert not list((results / "runs").glob("*-s1")) and sorted(p.name for p in target.iterdir()) == ["hetlora-s1", "set-aside.json"]
    record = json.loads((target / "set-aside.json").read_text())
    assert record["missing_when_set_aside"] == ["fedavg-rmin"] and record["block"] == other and record["runs"] == ["hetlora-s1"]
    with pytest.raises(ValueError, match="seed 1 has no finished runs"):
        s.set_aside(1, "again")
    Study("unit", tmp_path / "results", tmp_path / "work", log=lambda m: None).run_all()  # this block runs seed 1 whole
    for label in ("hetlora", "fedavg-rmin"):
        assert json.loads((results / "runs" / f"{label}-s1" / "block.json").read_text()) == mine
    report = json.loads((write_report(s).parent / "study.json").read_text())
    [group] = report["set_aside"]
    assert group["seed"] == 1 and group["finished"][0]["label"] == "hetlora" and group["finished"][0]["final_eval_ppl"] == other_ppl
    assert report["provenance"]["wall_seconds_set_aside"] == pytest.approx(group["finished"][0]["seconds"])
    assert group["finished"][0]["seconds"] > 0
    assert report["seed_blocks"]["runs"]["1"]["runs"] == 2 and report["seed_blocks"]["runs"]["1"]["block"]["precision"] == mine["precision"]
    text = (results / "study.md").read_text()
    assert "## Runs set aside" in text and "no machine of that block was lent" in text


def test_compute_per_block_adds_each_blocks_seeds_runs_and_seconds():
    from hetlora.study.claims import seed_blocks
    from hetlora.study.report import compute_per_block

    avx2 = {"device": "cpu: A", "device_class": "cpu AVX2, 2 threads", "precision": "fp32", "behaviour": "aaaa"}
    bf16 = {"device": "cpu: B", "device_class": "cpu AVX512, 2 threads", "precision": "bf16", "behaviour": "bbbb"}
    runs = [fake("hetlora", 0, 50, block=avx2, seconds=60.0), fake("fft", 0, 48, block=avx2, seconds=120.0),
            fake("hetlora", 1, 49, block=bf16, seconds=30.0)]
    long_runs = [fake("hetlora", 0, 47, block=bf16, seconds=90.0)]
    report = {"seed_blocks": {"runs": seed_blocks(runs), "long": seed_blocks(long_runs)}}
    assert report["seed_blocks"]["runs"]["0"]["seconds"] == 180.0 and report["seed_blocks"]["runs"]["0"]["runs"] == 2
    rows = {r["device"]: r for r in compute_per_block(report)}
    assert rows["cpu: A"] == {"device": "cpu: A", "block": "cpu AVX2, 2 threads / fp32 / aaaa", "seeds": "0", "runs": 2, "seconds": 180.0}
    assert rows["cpu: B"]["seeds"] == "1; long 0" and rows["cpu: B"]["runs"] == 2 and rows["cpu: B"]["seconds"] == 120.0
    # runs set aside are compute spent, counted in the block that spent it
    report["set_aside"] = [{"block": avx2, "seconds": 45.0, "finished": [{"label": "hetlora", "seed": 7}]}]
    rows = {r["device"]: r for r in compute_per_block(report)}
    assert rows["cpu: A"]["seeds"] == "0; set aside (1 runs)" and rows["cpu: A"]["runs"] == 3 and rows["cpu: A"]["seconds"] == 225.0


def test_seed_ranges_merge_consecutive_seeds():
    from hetlora.study.report import seed_ranges

    assert seed_ranges([6, 0, 2, 1, 4, 7, 2]) == "0–2, 4, 6–7" and seed_ranges([3]) == "3" and seed_ranges([]) == ""


def _finished_run(directory, seed, ppl, label_method="hetlora"):
    directory.mkdir(parents=True)
    summary = {"method": label_method, "full_eval_ppl": ppl, "full_eval_size": 10, "final_eval_ppl": ppl, "initial_eval_ppl": 99.0,
               "final_tier_eval_ppl": {}, "bytes_up_total": 1, "bytes_down_total": 1, "trainable_params": 1, "seconds_total": 1.0,
               "final_ranks": {"a": 2}, "config": {"lr": 0.01, "seed": seed}}
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval_ppl": ppl, "train_loss": 1.0}) + "\n")


def test_the_report_counts_only_the_registered_runs_whose_own_config_matches_their_directory(tmp_path):
    """The attacks of issue 40: a planted runs/hetlora-s20 made n = 21 without a word, and runs/hetlora-s1_9 was read
    as seed 19 (int('1_9') == 19), silently replacing that seed's run. Now each is left out and named."""
    from hetlora.study.claims import load_runs

    runs = tmp_path / "runs"
    for seed in range(3):
        _finished_run(runs / f"hetlora-s{seed}", seed, 10.0 + seed)
    _finished_run(runs / "hetlora-s20", 20, 1.0)  # a seed the plan does not register
    _finished_run(runs / "hetlora-s1_9", 19, 1.0)  # not a seed number
    _finished_run(runs / "hetlora-s01", 1, 1.0)  # not the canonical name of seed 1
    _finished_run(runs / "fft-s2", 0, 1.0)  # seed 0's run copied under seed 2's name
    _finished_run(runs / "mystery-s1", 1, 1.0)  # a label the plan does not have
    ignored = []
    kept = load_runs(tmp_path, seeds={0, 1, 2}, labels={"hetlora", "fft"}, ignored=ignored)
    assert sorted((r["label"], r["seed"], r["final_eval_ppl"]) for r in kept) == [("hetlora", 0, 10.0), ("hetlora", 1, 11.0), ("hetlora", 2, 12.0)]
    reasons = {i["run"]: i["reason"] for i in ignored}
    assert reasons == {
        "hetlora-s20": "seed 20 is not a registered seed of the plan",
        "hetlora-s1_9": "its directory name is not <label>-s<seed>",
        "hetlora-s01": "its directory name is not <label>-s<seed>",
        "fft-s2": "its own config records seed 0, not the directory's 2",
        "mystery-s1": "label mystery is not a registered label of the plan",
    }


def v4_preset(**kw):
    return Preset(**(dict(seeds=(0, 1), base=PRESETS["smoke"].base | dict(split_seed=7, rouge_size=2), version=4, labels=("hetlora", "fedavg-rmin"),
                          lr_grid=(1e-3, 3e-3, 1e-2), tune_rounds=1, tune_seeds=(100, 101), long_labels=("hetlora",),
                          long_best_of=("fedavg-rmin",), long_seeds=(0,), long_rounds=2, sized_from=("prior",)) | kw))


def prior_study(root):
    """A few committed v3 runs as the earlier study a v4 plan is sized from."""
    import shutil
    from pathlib import Path

    v3 = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu-v3" / "runs"
    for label in ("hetlora", "fedavg-rmin"):
        for seed in range(4):
            shutil.copytree(v3 / f"{label}-s{seed}", root / "prior" / "runs" / f"{label}-s{seed}")


def test_a_v4_study_tunes_each_label_until_bracketed_and_judges_one_family(tmp_path, monkeypatch):
    from hetlora.study import plan as plan_module, tuning

    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset())
    monkeypatch.setattr(plan_module, "N_MIN", 2)
    monkeypatch.setattr(plan_module, "N_MAX", 2)
    monkeypatch.setattr(tuning, "LADDER", (1e-3, 3e-3, 1e-2, 3e-2))  # at most one step past the first grid
    prior_study(tmp_path / "results")
    log = []
    s = Study("unit4", tmp_path / "results", tmp_path / "work", log=log.append)
    s.run_all()
    results = tmp_path / "results" / "unit4"
    plan = json.loads((results / "plan.json").read_text())
    assert plan["core_labels"] == ["hetlora", "fedavg-rmin"] and plan["n"] == 2 and plan["design"]["version"] == 4
    assert plan["sizing"]["family_size"] == 2  # C1 and C7 (no fft, no noprune in this core set)
    assert plan["compute"]["sections"]["core"]["runs"] == 4 and plan["compute"]["sections"]["long"]["runs"] == 2
    t = json.loads((results / "tuning.json").read_text())
    assert t["complete"] and t["seeds"] == [100, 101] and t["long_best_new"] == "fedavg-rmin"
    for label, table in t["labels"].items():
        assert table["complete"] and len(table["grid"]) in (3, 4) and all(len(v) == 2 for v in table["perplexities"].values())
        assert table["bracketed"] == (table["chosen"] not in (table["grid"][0], table["grid"][-1]))
        scores = {float(k): v for k, v in table["scores"].items()}
        assert table["chosen"] == min(sorted(scores), key=scores.get)
        for k in table["perplexities"]:  # each tuning run on the validation split with the one data split, at its own rate
            for seed in (100, 101):
                cfg = json.loads((results / "tuning" / f"{label}-lr{k}-s{seed}" / "summary.json").read_text())["config"]
                assert (cfg["eval_split"], cfg["split_seed"], cfg["lr"], cfg["seed"], cfg["rouge_size"]) == ("validation", 7, float(k), seed, None)
        run_cfg = json.loads((results / "runs" / f"{label}-s1" / "summary.json").read_text())["config"]
        assert run_cfg["lr"] == table["chosen"] and run_cfg["split_seed"] == 7 and run_cfg["eval_split"] == "test"
    block = json.loads((results / "runs" / "hetlora-s0" / "block.json").read_text())
    long_cfg = json.loads((results / "long" / "runs" / "fedavg-rmin-s0" / "summary.json").read_text())["config"]
    assert long_cfg["rounds"] == 2 and long_cfg["local_steps"] == PRESETS["smoke"].base["local_steps"]
    report = json.loads((write_report(s).parent / "study.json").read_text())
    assert report["plan"]["core_labels"] == ["hetlora", "fedavg-rmin"] and report["plan"]["n"] == 2
    assert {c["id"] for c in report["comparisons"]} == {"C1", "C7"} and "claims" not in report and "c8" not in report
    c1 = next(c for c in report["comparisons"] if c["id"] == "C1")
    assert c1["label"] == "fedavg-rmin" and c1["verdict"] in ("reproduced", "not reproduced", "inconclusive") and "p_holm" in c1
    by = {(r["label"], r["seed"]): r for r in report["runs"]}
    assert c1["effects_pct"] == pytest.approx([100 * (by["fedavg-rmin", s]["final_eval_ppl"] / by["hetlora", s]["final_eval_ppl"] - 1) for s in (0, 1)])
    assert all(0.0 <= r["rouge_l"] <= 1.0 for r in report["runs"])
    assert report["tuning"]["hetlora"]["chosen"] == t["labels"]["hetlora"]["chosen"]
    # the long regime's runs of the best new method are reported with the preset's own (dropped before: not in long_labels)
    assert set(report["long"]["methods"]) == {"hetlora", "fedavg-rmin"} and "fedavg-rmin" in report["long"]["paired"]
    assert not [i for i in report["ignored_runs"] if i["run"].startswith("fedavg-rmin")]
    text = (results / "study.md").read_text()
    assert "## Every comparison with HetLoRA" in text and "## Learning rates (each label's own" in text
    assert "## The long regime (2 rounds at the core set's per-round budget)" in text and "unadjusted 95 % CI" in text
    # the report is built for the registered design only
    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset(lr_grid=(1e-3, 3e-3)))
    with pytest.raises(ValueError, match="pre-registered plan"):
        write_report(Study("unit4", tmp_path / "results", tmp_path / "work"))
    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset())
    # a second sitting runs nothing: every tuning and study run is kept
    log.clear()
    Study("unit4", tmp_path / "results", tmp_path / "work", log=log.append).run_all()
    assert not [m for m in log if m.startswith("tuning ") or "seed" in m and "block" not in m], log
    # tuning done on another machine class is complete here: this class goes on to the core runs it can make
    for f in (results / "tuning").glob("*/block.json"):
        b = json.loads(f.read_text())
        f.write_text(json.dumps(b | {"precision": {"fp32": "bf16", "bf16": "fp32"}[b["precision"]]}))
    log.clear()
    assert Study("unit4", tmp_path / "results", tmp_path / "work", log=log.append).tune(block)["complete"]
    assert not [m for m in log if m.startswith("tuning ")], log
    # a label still owing a rate, begun on another class, waits for that class: nothing is run for it here
    import shutil

    owed = sorted((results / "tuning").glob("hetlora-lr*-s101"))[0]
    shutil.rmtree(owed)
    log.clear()
    t = Study("unit4", tmp_path / "results", tmp_path / "work", log=log.append).tune(block)
    assert not t["complete"] and t["labels"]["hetlora"]["waiting_for_block"] and t["labels"]["fedavg-rmin"]["complete"]
    assert not owed.exists() and any("tuning hetlora: begun in block" in m for m in log), log
    # a label whose rates came from two blocks (two machines tuning it at once) is refused, not compared across them
    one = sorted((results / "tuning").glob("fedavg-rmin-lr*-s100"))[0] / "block.json"
    one.write_text(json.dumps(json.loads(one.read_text()) | {"behaviour": "another"}))
    with pytest.raises(ValueError, match="fedavg-rmin's tuning runs come from 2 seed blocks"):
        Study("unit4", tmp_path / "results", tmp_path / "work", log=log.append).tune(block)


def test_progress_counts_finished_runs_per_section_and_prices_the_rest_at_the_blocks_own_pace(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset())
    s = Study("unit4", tmp_path / "results", tmp_path / "work")
    rounds = PRESETS["smoke"].base["rounds"]
    block = {"device_class": "cpu X", "precision": "bf16", "behaviour": "b"}

    def finished(where, name, seconds, done=rounds):
        d = s.results / where / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"rounds": done, "seconds_total": seconds}))
        (d / "block.json").write_text(json.dumps(block))

    finished("runs", "hetlora-s0", 10.0 * rounds)  # 10 s a round
    finished("runs", "fedavg-rmin-s0", 20.0 * rounds)  # 20 s a round
    finished("runs", "hetlora-s1", 99.0, done=rounds - 1)  # interrupted: owed whole
    p = s.progress()
    assert p["sections"]["runs"] == {"finished": 2, "planned": 4, "rounds_owed": 2 * rounds}
    # the long regime: hetlora on seed 0 (the best new method joins once tuning names it), long_rounds = 2
    assert p["sections"]["long/runs"] == {"finished": 0, "planned": 1, "rounds_owed": 2}
    assert p["hours_left"] == {"cpu X / bf16 / b": pytest.approx((2 * rounds + 2) * 15.0 / 3600)}  # the median pace
    assert not p["tuning_complete"] and p["tuning_runs"] == 0


def test_a_v4_plan_refuses_a_preset_whose_n_is_not_the_rules(tmp_path, monkeypatch):
    from hetlora.study import plan as plan_module

    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset(seeds=(0, 1, 2)))
    monkeypatch.setattr(plan_module, "N_MIN", 2)
    monkeypatch.setattr(plan_module, "N_MAX", 2)
    prior_study(tmp_path / "results")
    with pytest.raises(ValueError, match="the plan's rule gives n = 2 seeds .* the preset has 3"):
        Study("unit4", tmp_path / "results", tmp_path / "work").plan()
    assert not (tmp_path / "results" / "unit4" / "plan.json").exists()


def test_the_v4_plan_is_sized_from_the_committed_v3_runs(tmp_path):
    """cpu-v4's plan recomputes from the committed v3 runs: n = 20 by its rule, one family of 15."""
    from pathlib import Path
    import shutil

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    shutil.copytree(root / "cpu-v3" / "runs", tmp_path / "cpu-v3" / "runs")
    plan = Study("cpu-v4", tmp_path, tmp_path / "work").plan()
    assert plan["n"] == 20 == len(PRESETS["cpu-v4"].seeds) and plan["sizing"]["family_size"] == 15
    assert plan["sizing"]["median_seeds_needed"] > 20  # the budget's bound binds, and the plan says so
    committed = root / "cpu-v4" / "plan.json"
    if committed.is_file():
        registered = json.loads(committed.read_text())
        assert registered["design"] == plan["design"] and registered["sizing"] == plan["sizing"]


def test_an_unfinished_labels_tuning_is_set_aside_whole_and_a_complete_one_is_refused(tmp_path, monkeypatch):
    """v4: a label begun on a machine class that cannot be had again would hold every core run back; its tuning (only
    while it still owes a run) moves to set-aside/ with the reason, and the label is tuned whole here."""
    from hetlora.study import tuning

    monkeypatch.setitem(study.PRESETS, "unit4", v4_preset(labels=("hetlora",), long_labels=(), long_best_of=(), long_seeds=()))
    monkeypatch.setattr(tuning, "LADDER", (1e-3, 3e-3, 1e-2, 3e-2))
    s = Study("unit4", tmp_path / "results", tmp_path / "work", log=lambda m: None)
    table = s.tune_label("hetlora", None, {})
    assert table["complete"]
    with pytest.raises(ValueError, match="complete; a complete label is never set aside"):
        s.set_aside_tuning("hetlora", "the class is gone")
    tuned = tmp_path / "results" / "unit4" / "tuning"
    import shutil

    shutil.rmtree(sorted(tuned.glob("hetlora-lr*-s101"))[0])  # now it owes a run
    with pytest.raises(ValueError, match="needs a reason"):
        s.set_aside_tuning("hetlora", " ")
    kept = sorted(p.name for p in tuned.glob("hetlora-*"))
    target = s.set_aside_tuning("hetlora", "no AVX512 machine was drawn again")
    assert not list(tuned.glob("hetlora-*")) and sorted(p.name for p in target.iterdir() if p.is_dir()) == kept
    record = json.loads((target / "set-aside.json").read_text())
    assert record["where"] == "tuning" and record["label"] == "hetlora" and record["reason"] == "no AVX512 machine was drawn again"
    from hetlora.study.report import set_aside_groups

    (group,) = set_aside_groups(tmp_path / "results" / "unit4")
    assert group["where"] == "tuning" and len(group["finished"]) == len(kept) and group["seconds"] > 0
