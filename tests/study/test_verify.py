"""Re-running a kept study run: the same numbers on the run's own block, every differing figure named otherwise, and a
machine of another block refused before anything runs."""

import json

import pytest
from typer.testing import CliRunner

from hetlora.study import runs as study
from hetlora.study.runs import PRESETS, Preset, Study
from hetlora.study.verify import differences, same, verify_run


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A one-seed tiny study (hetlora only), run once for the module."""
    root = tmp_path_factory.mktemp("verify")
    preset = Preset(seeds=(0,), base=PRESETS["smoke"].base, lr_grid=(1e-2,), fft_lr_grid=(1e-4,), tune_rounds=1, labels=("hetlora",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(study.PRESETS, "unit-verify", preset)
        mp.setattr(study, "TUNE_LORA_LABELS", ["hetlora"])
        Study("unit-verify", root / "results", root / "work").run_all()
    return root, preset


def test_a_kept_run_comes_out_the_same_on_its_own_block(kept, monkeypatch):
    root, preset = kept
    monkeypatch.setitem(study.PRESETS, "unit-verify", preset)
    result = verify_run(Study("unit-verify", root / "results", root / "work"), "hetlora", 0)
    record = root / "results" / "unit-verify" / "verified" / "runs-hetlora-s0.json"
    assert result == {"run": "runs/hetlora-s0", "block": result["block"], "identical": True, "differences": [], "record": str(record)}
    kept = json.loads(record.read_text())
    assert kept["identical"] and kept["provenance"]["commit"] and kept["checked_at"] and kept["kept_provenance"]
    assert list((root / "work").rglob("verify/runs")) and not list((root / "work").rglob("verify/runs/hetlora-s0"))  # scratch gone


def test_every_differing_figure_is_named(kept, tmp_path):
    root, _ = kept
    original = root / "results" / "unit-verify" / "runs" / "hetlora-s0"
    changed = tmp_path / "changed"
    changed.mkdir()
    summary = json.loads((original / "summary.json").read_text())
    (changed / "summary.json").write_text(json.dumps(summary | {"final_eval_ppl": summary["final_eval_ppl"] + 1e-9}))
    rows = [json.loads(line) for line in (original / "metrics.jsonl").read_text().splitlines()]
    rows[0]["train_loss"] += 1e-12
    (changed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = differences(original, changed)
    assert len(found) == 2 and found[0].startswith("round 1 train_loss: ") and found[1].startswith("final_eval_ppl: ")
    assert differences(original, original) == []


def test_another_block_is_refused_before_anything_runs(kept, monkeypatch):
    root, preset = kept
    monkeypatch.setitem(study.PRESETS, "unit-verify", preset)
    block = json.loads((root / "results" / "unit-verify" / "runs" / "hetlora-s0" / "block.json").read_text())
    other = block | {"precision": {"fp32": "bf16", "bf16": "fp32"}[block["precision"]]}
    s = Study("unit-verify", root / "results", root / "work")
    with pytest.raises(ValueError, match="hetlora-s0 was made in block .*; this machine is"):
        verify_run(s, "hetlora", 0, block=other)
    with pytest.raises(ValueError, match="no finished run"):
        verify_run(s, "hetlora", 5, block=block)
    with pytest.raises(ValueError, match="is not a section"):
        verify_run(s, "hetlora", 0, where="elsewhere", block=block)


def test_nan_reproduces_as_nan_and_nested_figures_compare_exactly():
    assert same(float("nan"), float("nan")) and same({"5": 1.0, "50": [2, 3]}, {"5": 1.0, "50": [2, 3]})
    assert not same({"5": 1.0}, {"5": 1.0, "50": 2.0}) and not same(1.0, 1.0 + 1e-15)


def test_the_cli_wants_label_colon_seed(tmp_path):
    from hetlora.cli import app

    out = CliRunner().invoke(app, ["study", "--preset", "smoke", "--results", str(tmp_path), "--work", str(tmp_path / "w"),
                                   "--verify", "hetlora-0"])
    assert out.exit_code == 2 and "--verify takes LABEL:SEED" in out.output
