"""The study: claim arithmetic on hand-made numbers, and a resumable end-to-end run on the tiny model."""

import json

import pytest

from hetlora import study
from hetlora.stats import holm, interval_verdict, t_interval, t_quantile, t_test, verdict
from hetlora.study import PRESETS, Preset, Study, claims, write_report


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


def test_a_study_resumes_and_rebuilds_its_report(tmp_path, monkeypatch):
    tiny = Preset(seeds=(0, 1), base=PRESETS["smoke"].base, lr_grid=(1e-2,), fft_lr_grid=(1e-4,), tune_rounds=1,
                  labels=("hetlora", "fedavg-rmin"))
    monkeypatch.setitem(study.PRESETS, "unit", tiny)
    monkeypatch.setattr(study, "TUNE_LORA_LABELS", ["hetlora"])
    log = []
    s = Study("unit", tmp_path / "results", tmp_path / "work", log=log.append)
    s.run_all()
    assert sorted(p.name for p in (tmp_path / "results" / "unit" / "runs").iterdir()) == [
        "fedavg-rmin-s0", "fedavg-rmin-s1", "hetlora-s0", "hetlora-s1"]
    path = write_report(s)
    report = json.loads((path.parent / "study.json").read_text())
    assert {c["id"] for c in report["claims"]} == {f"C{i}" for i in range(1, 8)}
    assert report["provenance"]["eos_token"]["token"] == "<|im_end|>" and report["provenance"]["commits"]
    assert report["config"]["seeds"] == [0, 1] and report["config"]["final_eval_size"] == 8
    assert path.read_text().startswith("# HetLoRA's claims on model `tiny` + chitchat")  # not "SmolLM2" for any model
    assert all(r["final_eval_size"] == 8 for r in report["runs"])
    # a second sitting runs only what is missing
    import shutil

    shutil.rmtree(tmp_path / "results" / "unit" / "runs" / "hetlora-s1")
    log.clear()
    Study("unit", tmp_path / "results", tmp_path / "work", log=log.append).run_all()
    assert [m for m in log if "seed" in m and "tuning" not in m] == [m for m in log if m.strip().startswith("hetlora seed 1")]
    assert len(log) == 1
