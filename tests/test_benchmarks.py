"""Benchmarks that cannot rot: each one's smoke mode (tiny model or shapes, one step, seconds) runs here, so a
refactor that breaks a benchmark fails the suite (throughput.py crashed for a release because nothing ran it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["aggregation.py", "secure_aggregation.py", "load.py", "client_step.py", "flower_overhead.py", "footprint.py",
         "rank_health_pilot.py", "behaviour_check.py", "quantised_base.py", "server_scale.py"]
BY_THE_GPU_SCRIPT = ["throughput.py", "reproduce.py"]  # gpu_study.sh's smoke mode runs their smoke modes (its test, below)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_every_benchmark_has_a_smoke_mode_here():
    """A new benchmark joins SMOKE (and gets a --smoke), or nothing notices when it rots."""
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")) == sorted(SMOKE + BY_THE_GPU_SCRIPT)
    script = (ROOT / "benchmarks" / "gpu_study.sh").read_text()
    assert all(f"benchmarks/{name} --smoke" in script for name in BY_THE_GPU_SCRIPT)


@pytest.mark.parametrize("script", SMOKE)
def test_a_benchmark_runs_in_its_smoke_mode_and_writes_its_json(tmp_path, script):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert out.is_file() and out.stat().st_size > 0


def test_the_gpu_sitting_script_runs_in_its_smoke_mode(tmp_path):
    """benchmarks/gpu_study.sh names test files and result directories: its smoke mode collects those tests (a moved file
    fails), runs the throughput and study steps in their smoke forms and packs what it would bring back."""
    env = ENV | {"SMOKE": "1", "OUT": str(tmp_path), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed (collected)" in (tmp_path / "gpu_tests.log").read_text()
    assert (tmp_path / "gpu_throughput.json").stat().st_size > 0 and (tmp_path / "gpu_results.tgz").is_file()
    assert "round_seconds" in (tmp_path / "gpu_throughput.json").read_text()  # throughput's round section ran (it once crashed)
