"""Ranks from memory budgets: the footprint model's arithmetic, its fit, and a tiny run with budgets."""

import json
import statistics

import pytest

from hetlora.device import footprint
from hetlora.core.ranks import ranks_from_budgets
from hetlora.device.footprint import FootprintModel, calibrate, fit, setting_key


def test_the_largest_rank_that_fits_by_hand():
    m = FootprintModel(fixed_mb=1000.0, per_rank_mb=10.0)
    assert m.predict(30) == 1300.0
    assert m.largest_rank(1300.0, 5, 50) == 30 and m.largest_rank(1309.9, 5, 50) == 30  # 31 would need 1310
    assert m.largest_rank(5000.0, 5, 25) == 25  # capped at r_max
    assert m.largest_rank(1049.0, 5, 50) is None  # r_min = 5 needs 1050


def test_the_fit_recovers_a_line_and_the_calibration_groups_settings():
    model = fit([(5, 1050.0), (27, 1270.0), (50, 1500.0)])
    assert model.fixed_mb == pytest.approx(1000.0) and model.per_rank_mb == pytest.approx(10.0)
    rows = [{"kind": "lora", "engine": "clientapp", "precision": "fp32", "checkpointing": c, "batch": 8, "length": 128,
             "rank": r, "peak_rss_mb": 1000.0 + 10 * r + (500 if not c else 0)} for r in (5, 50) for c in (False, True)]
    rows.append({"kind": "fft", "engine": "in-process", "precision": "fp32", "checkpointing": False, "batch": 8, "length": 128,
                 "rank": 0, "peak_rss_mb": 9999.0})
    rows.append({"kind": "lora", "engine": "clientapp", "precision": "fp32", "checkpointing": True, "batch": 8, "length": 128,
                 "rank": 5, "peak_rss_mb": 3000.0, "model": "qwen", "base": "gguf"})  # one rank: no line to fit, not calibrated
    fits = calibrate(rows)
    assert set(fits) == {setting_key("smollm2", "dense", "fp32", c, 8, 128) for c in (False, True)}
    assert fits[setting_key("smollm2", "dense", "fp32", False, 8, 128)]["fixed_mb"] == pytest.approx(1500.0)


def test_the_fit_is_an_envelope_no_measured_peak_lies_above_and_its_slope_is_at_least_what_a_rank_certainly_adds():
    """Fed-PLoRA's measured peaks (MB, checkpointing on): 2292 at rank 5, 2030 at 27, 2082 at 50 — process-to-process
    noise larger than the rank's effect, so least squares gave a falling line, which would hand a 2100 MB budget rank
    50 although rank 5 peaked at 2292. The rows' exact parts say a rank adds 4.66 MB (the LoRA state); a
    --release-memory row of the same setting is not the default client's and stays out of the fit."""
    rows = [{"kind": "lora", "engine": "clientapp", "precision": "fp32", "checkpointing": True, "batch": 8, "length": 128,
             "client": "plora", "rank": r, "peak_rss_mb": p, "trainable_state_mb": 4.66 * r, "activations_mb": 900.0}
            for r, p in ((5, 2292.0), (27, 2030.0), (50, 2082.0))]
    rows.append(rows[0] | {"rank": 50, "peak_rss_mb": 9000.0, "release_memory": True})
    (f,) = calibrate(rows).values()
    assert f["per_rank_mb"] == pytest.approx(4.66) and f["fixed_mb"] == pytest.approx(2292.0 - 4.66 * 5)
    model = FootprintModel(f["fixed_mb"], f["per_rank_mb"])
    assert all(model.predict(r["rank"]) >= r["peak_rss_mb"] - 1e-9 for r in rows[:3]) and len(f["points"]) == 3
    assert model.largest_rank(2100.0, 5, 50) is None and model.largest_rank(2292.0, 5, 50) == 5
    # where least squares rises faster than the parts, it is kept, and the line moved up to the highest point
    steep = fit([(5, 1000.0), (27, 1300.0), (50, 1400.0)], min_slope=1.0)
    ls = statistics.linear_regression([5, 27, 50], [1000.0, 1300.0, 1400.0])
    assert steep.per_rank_mb == pytest.approx(ls.slope) and steep.fixed_mb == pytest.approx(max(p - ls.slope * r for r, p in ((5, 1000.0), (27, 1300.0), (50, 1400.0))))


def test_the_shipped_calibration_is_an_envelope_of_its_own_measured_points():
    """Every shipped fit predicts at least each peak it was fitted to, rises with the rank, and names its measurements."""
    data = json.loads(footprint.CALIBRATION.read_text())
    assert data["fits"] and set(data["sources"]) >= set(data["fits"])
    for key, f in data["fits"].items():
        model = FootprintModel(f["fixed_mb"], f["per_rank_mb"])
        assert f["per_rank_mb"] >= 0 and len({r for r, _ in f["points"]}) >= 2, key
        assert all(model.predict(r) >= peak - 1e-6 for r, peak in f["points"]), key


def test_budgets_give_ranks_and_leave_out_who_fits_none():
    m = FootprintModel(100.0, 1.0)
    ranks, left = ranks_from_budgets({"a": 1000.0, "b": 103.5, "c": 101.0}, m.largest_rank, 2, 6)
    assert ranks == {"a": 6, "b": 3} and list(left) == ["c"] and "fits no rank ≥ 2, the smallest this method gives" in left["c"]


def test_an_uncalibrated_setting_is_refused_naming_the_benchmark(tmp_path):
    with pytest.raises(ValueError, match="no memory footprint calibration for tiny.*benchmarks/footprint.py"):
        footprint.footprint_model(setting_key("tiny", "dense", "fp32", False, 2, 32), tmp_path / "none.json")


def calibrated_tiny(tmp_path, monkeypatch, **changes):
    """A tiny-model config whose footprint is 100 MB + 1 MB per rank (a calibration of the test's own), and its
    client ids: budgets then give ranks by hand."""
    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"fits": {setting_key("tiny", "dense", "fp32", False, 2, 32): {"fixed_mb": 100.0, "per_rank_mb": 1.0}}}))
    monkeypatch.setattr(footprint, "CALIBRATION", calibration)
    base = dict(model="tiny", data="chitchat", clients_per_round=2, local_steps=1, batch_size=2, max_length=32, eval_size=4,
                r_min=2, r_max=6, min_examples=200, precision="fp32", seed=0, tier_eval="off") | changes
    return base, Federation(RunConfig(**base, out=str(tmp_path / "probe"))).client_ids


def test_a_tiny_run_assigns_ranks_from_memory_and_leaves_a_poor_client_out(tmp_path, monkeypatch):
    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation
    from hetlora.server.runner import run

    base, ids = calibrated_tiny(tmp_path, monkeypatch, client_pool=4, rounds=2)
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({ids[0]: 1000.0, ids[1]: 103.5, ids[2]: 101.0, ids[3]: 104.0}))
    cfg = RunConfig(**base, memory_budgets=str(budgets), out=str(tmp_path / "run"))
    fed = Federation(cfg)
    assert fed.ranks == {ids[0]: 6, ids[1]: 3, ids[3]: 4} and list(fed.left_out) == [ids[2]] and ids[2] not in fed.client_ids
    summary = run(cfg, progress=False)  # completes: the poor client is never sampled
    assert list(summary["left_out"]) == [ids[2]]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(ids[2] not in r["clients"] for r in rows)
    assert all(r["ranks"][c] <= fed.ranks[c] for r in rows for c in r["clients"])
    # one budget for everyone that fits no rank: refused with the reason, before any round
    with pytest.raises(ValueError, match="no client's memory budget fits a rank ≥ 2"):
        Federation(RunConfig(**base, memory_budget_mb=50.0, out=str(tmp_path / "none")))


@pytest.mark.parametrize("text, problem", [
    ('{"a": Infinity}', "a: inf MB is not a positive finite budget"),
    ('{"a": 1e400}', "a: inf MB is not a positive finite budget"),
    ('{"a": NaN}', "a: nan MB is not a positive finite budget"),
    ('{"a": true}', "a: True is not a number of MB"),
    ('{"a": "512"}', "a: '512' is not a number of MB"),
    ('{"a": -3}', "a: -3 MB is not a positive finite budget"),
    ('[1, 2]', "expected a JSON object"),
    ('{"a": ', "memory budgets"),
])
def test_a_bad_budgets_file_is_refused_by_the_config_before_any_model_loads(tmp_path, text, problem):
    from hetlora.config import RunConfig

    budgets = tmp_path / "budgets.json"
    budgets.write_text(text)
    with pytest.raises(ValueError, match="invalid configuration: memory budgets") as err:
        RunConfig(model="tiny", memory_budgets=str(budgets), out=str(tmp_path / "run")).validate()
    assert problem in str(err.value)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="memory_budget_mb"):
            RunConfig(model="tiny", memory_budget_mb=bad, out=str(tmp_path / "run")).validate()


def test_budgets_for_unknown_clients_are_refused_and_an_edited_file_is_refused_on_resume(tmp_path, monkeypatch):
    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation
    from hetlora.server.runner import run

    base, ids = calibrated_tiny(tmp_path, monkeypatch, client_pool=3, rounds=1)
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({ids[0]: 1000.0, ids[1]: 104.0, ids[2]: 103.0, "no-such-client": 500.0}))
    with pytest.raises(ValueError, match="name 1 client.s. this federation does not have .e.g. no-such-client."):
        Federation(RunConfig(**base, memory_budgets=str(budgets), out=str(tmp_path / "unknown")))
    budgets.write_text(json.dumps({ids[0]: 1000.0, ids[1]: 104.0, ids[2]: 103.0}))
    cfg = RunConfig(**base, memory_budgets=str(budgets), out=str(tmp_path / "run"))
    run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(saved["_run"]["memory_budgets_sha256"]) == 64
    budgets.write_text(json.dumps({ids[0]: 104.0, ids[1]: 1000.0, ids[2]: 103.0}))  # edited between the run and its resume
    with pytest.raises(ValueError, match="the memory budgets file .* is not the one this run started with"):
        run(RunConfig(**(base | {"rounds": 2}), memory_budgets=str(budgets), out=str(tmp_path / "run")), resume=True, progress=False)


def test_a_folding_method_takes_its_ranks_from_its_own_footprint_and_is_refused_without_one(tmp_path, monkeypatch):
    """fedex-lora's clients hold a dense base delta beside their LoRA: a budget becomes a rank through their own fit
    (here 200 MB + 1 MB per rank, the LoRA client's 100 + 1), never the LoRA client's; without it, refused by name."""
    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation

    base, ids = calibrated_tiny(tmp_path, monkeypatch, client_pool=3, rounds=1, method="fedex-lora")
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({ids[0]: 1000.0, ids[1]: 203.5, ids[2]: 104.0}))
    cfg = RunConfig(**base, memory_budgets=str(budgets), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"no memory footprint calibration for tiny\|.*\|client=folding"):
        Federation(cfg)
    fits = json.loads(footprint.CALIBRATION.read_text())["fits"]
    fits[setting_key("tiny", "dense", "fp32", False, 2, 32, "folding")] = {"fixed_mb": 200.0, "per_rank_mb": 1.0}
    footprint.CALIBRATION.write_text(json.dumps({"fits": fits}))
    fed = Federation(cfg)
    assert fed.ranks == {ids[0]: 6, ids[1]: 3} and list(fed.left_out) == [ids[2]]  # 104 MB fits a LoRA client's rank 4, not this


def test_the_benchmark_measures_folding_and_fed_plora_clients_through_the_clientapp(tmp_path):
    """Each row a fresh ClientApp process that trained on the message such a client gets: the folding client's carries
    the base delta dense on every adapted module (out·in fp32 numbers each), Fed-PLoRA's every rank-1 module of the
    global adapter (r_max of them, (out + in) fp32 numbers each); the fits are keyed by the client."""
    import subprocess
    import sys
    from pathlib import Path

    from hetlora.config import RunConfig
    from hetlora.device.host import ClientHost
    from hetlora.device.lora import LINEAR_LAYERS

    out = tmp_path / "footprint.json"
    script = Path(__file__).parents[2] / "benchmarks" / "footprint.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--clients", "folding", "plora", "--json", str(out)], check=True,
                   capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["client"], r["rank"]) for r in rows) == [("folding", 2), ("folding", 5), ("plora", 2), ("plora", 5)]
    host = ClientHost(RunConfig(model="tiny", max_length=32, precision="fp32", r_min=2, r_max=6))
    shapes = [(m.out_features, m.in_features) for p, m in host.model.named_modules()
              if isinstance(m, LINEAR_LAYERS) and p.rsplit(".", 1)[-1] in host.local.targets]
    assert shapes
    r_max = 6  # the tiny model's rank bounds (benchmarks/footprint.py RANK_BOUNDS)
    for r in rows:  # received beyond what it trains: the dense delta; the r_max − r modules Fed-PLoRA's client folds
        expected = sum(o * i for o, i in shapes) if r["client"] == "folding" else sum((o + i) * (r_max - r["rank"]) for o, i in shapes)
        assert r["received_mb"] == pytest.approx(expected * 4 / 2**20) and r["peak_rss_mb"] > r["after_load_mb"] > 0
        # the ClientApp really folded what it received into its weights: every adapted module (folding), and the
        # modules Fed-PLoRA's client did not select (all of them hold some: rank-1 modules span every layer)
        assert r["folded_modules"] == len(shapes), r
        assert r["floor_mb"] == pytest.approx(sum(v for k, v in r.items() if k.endswith("_mb") and k not in
                                                  ("floor_mb", "peak_rss_mb", "after_load_mb")))
    assert set(calibrate(rows, "tiny")) == {setting_key("tiny", "dense", "fp32", False, 8, 128, c) for c in ("folding", "plora")}
