"""Re-running a kept study run: the same numbers on the run's own block, every differing figure named otherwise, and a
machine of another block refused before anything runs."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from hetlora.study import runs as study
from hetlora.study import verify
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
    s = Study("unit-verify", root / "results", root / "work")
    result = verify_run(s, "hetlora", 0)
    record = root / "results" / "unit-verify" / "verified" / "runs-hetlora-s0.json"
    kept_block = json.loads((root / "results" / "unit-verify" / "runs" / "hetlora-s0" / "block.json").read_text())
    label = f"{kept_block['device_class']} / {kept_block['precision']} / {kept_block['behaviour']}"
    assert result == {"run": "runs/hetlora-s0", "block": label, "identical": True, "differences": [], "record": str(record)}
    # every check is kept, newest last
    verify_run(s, "hetlora", 0, block=kept_block)
    checks = json.loads(record.read_text())["checks"]
    assert len(checks) == 2 and all(c["identical"] and c["provenance"]["commit"] and c["checked_at"] and c["kept_provenance"] for c in checks)
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


def test_another_block_is_refused_before_anything_runs(kept, monkeypatch, tmp_path):
    root, preset = kept
    monkeypatch.setitem(study.PRESETS, "unit-verify", preset)
    block = json.loads((root / "results" / "unit-verify" / "runs" / "hetlora-s0" / "block.json").read_text())
    other = block | {"precision": {"fp32": "bf16", "bf16": "fp32"}[block["precision"]]}
    s = Study("unit-verify", root / "results", root / "work")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a refused check trained something")

    monkeypatch.setattr(verify, "execute", must_not_run)
    with pytest.raises(ValueError, match="hetlora-s0 was made in block .*; this machine is"):
        verify_run(s, "hetlora", 0, block=other)
    # the refusals that need no run come before this machine's block is measured (a tiny training round per label)
    monkeypatch.setattr(verify, "machine_block", must_not_run)
    with pytest.raises(ValueError, match="no finished run"):
        verify_run(s, "hetlora", 5)
    with pytest.raises(ValueError, match="is not a section"):
        verify_run(s, "hetlora", 0, where="elsewhere")
    untuned = tmp_path / "results"
    shutil.copytree(root / "results", untuned)
    (untuned / "unit-verify" / "tuning.json").unlink()
    with pytest.raises(ValueError, match="no tuned learning rate for hetlora"):
        verify_run(Study("unit-verify", untuned, tmp_path / "work"), "hetlora", 0)


def copied(kept, monkeypatch, tmp_path):
    """A copy of the kept study's results to tamper with (the module's own stays as run)."""
    root, preset = kept
    monkeypatch.setitem(study.PRESETS, "unit-verify", preset)
    shutil.copytree(root / "results", tmp_path / "results")
    return tmp_path / "results", tmp_path / "results" / "unit-verify" / "runs" / "hetlora-s0"


def test_a_kept_run_whose_settings_are_not_the_plans_is_refused(kept, monkeypatch, tmp_path):
    results, run = copied(kept, monkeypatch, tmp_path)
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps(summary | {"config": summary["config"] | {"local_steps": summary["config"]["local_steps"] + 1}}))
    with pytest.raises(ValueError, match="its recorded settings are not the plan's: local_steps"):
        verify_run(Study("unit-verify", results, tmp_path / "work"), "hetlora", 0, block={})


def test_the_cli_exits_1_naming_the_figure_that_differs(kept, monkeypatch, tmp_path):
    from hetlora.cli import app

    results, run = copied(kept, monkeypatch, tmp_path)
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # a kept run one round short
    out = CliRunner().invoke(app, ["study", "--preset", "unit-verify", "--results", str(results), "--work", str(tmp_path / "w"),
                                   "--verify", "hetlora:0"])
    assert out.exit_code == 1 and f"rounds: {len(rows) - 1} kept, {len(rows)} now" in out.output
    assert not list((tmp_path / "w").rglob("verify/runs/hetlora-s0"))


def test_nan_reproduces_as_nan_and_nested_figures_compare_exactly():
    assert same(float("nan"), float("nan")) and same({"5": 1.0, "50": [2, 3]}, {"5": 1.0, "50": [2, 3]})
    assert same([1.0, float("nan")], [1.0, float("nan")]) and not same([1.0], [1.0, 2.0])
    assert not same({"5": 1.0}, {"5": 1.0, "50": 2.0}) and not same(1.0, 1.0 + 1e-15)


def test_a_summary_field_missing_on_either_side_is_a_difference(kept, tmp_path):
    root, _ = kept
    original = root / "results" / "unit-verify" / "runs" / "hetlora-s0"
    changed = tmp_path / "changed"
    shutil.copytree(original, changed)
    summary = json.loads((changed / "summary.json").read_text())
    del summary["bytes_up_total"]
    (changed / "summary.json").write_text(json.dumps(summary))
    assert differences(changed, original) == ["bytes_up_total: absent in the kept summary, present now"]


def test_the_cli_wants_label_colon_seed(tmp_path):
    from hetlora.cli import app

    out = CliRunner().invoke(app, ["study", "--preset", "smoke", "--results", str(tmp_path), "--work", str(tmp_path / "w"),
                                   "--verify", "hetlora-0"])
    assert out.exit_code == 2 and "--verify takes LABEL:SEED" in out.output
