"""The study: claim arithmetic on hand-made numbers, and a resumable end-to-end run on the tiny model."""

import json

import pytest

from hetlora import study
from hetlora.study import PRESETS, Preset, Study, claims, t_interval, verdict, write_report


def test_t_interval_and_verdicts():
    mean, (lo, hi) = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2 - 4.303 * 1 / 3**0.5, rel=1e-4) and hi == pytest.approx(2 + 4.303 / 3**0.5, rel=1e-4)
    assert verdict((0.1, 2.0)) == "reproduced" and verdict((-3.0, -0.1)) == "not reproduced"
    assert verdict((-1.0, 1.0)) == "inconclusive" and verdict(None) == "inconclusive"


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
        "hetlora-noprune": {s: fake("hetlora-noprune", s, 50 + s + [0.5, -0.4, 0.1][s]) for s in range(3)},
        "fft": {s: fake("fft", s, 30 + s, trainable_params=1000, bytes_up_total=10_000) for s in range(3)},
    }
    by_id = {c["id"]: c for c in claims(runs, PRESETS["cpu"])}
    assert by_id["C1"]["verdict"] == "reproduced" and by_id["C1"]["mean_diff"] == pytest.approx(10)
    assert by_id["C2"]["verdict"] == "not reproduced" and by_id["C3"]["verdict"] == "inconclusive"
    assert by_id["C4"]["verdict"] == "reproduced"  # bytes always 20 lower, ranks lower, perplexity not worse
    assert by_id["C5"]["verdict"] == "inconclusive" and by_id["C5"]["n"] == 0  # no hetlora-naive runs yet
    # C6: best HomLoRA is fedavg-rmax (40+s), FFT 30+s, HetLoRA 50+s: it closes -100 % of the gap
    assert by_id["C6"]["verdict"] == "not reproduced" and by_id["C6"]["mean_diff"] == pytest.approx(-1.0)
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
    assert all(r["final_eval_size"] == 8 for r in report["runs"])
    # a second sitting runs only what is missing
    import shutil

    shutil.rmtree(tmp_path / "results" / "unit" / "runs" / "hetlora-s1")
    log.clear()
    Study("unit", tmp_path / "results", tmp_path / "work", log=log.append).run_all()
    assert [m for m in log if "seed" in m and "tuning" not in m] == [m for m in log if m.strip().startswith("hetlora seed 1")]
    assert len(log) == 1
