"""Benchmarks that cannot rot: each one's smoke mode (tiny model or shapes, one step, seconds) runs here, so a
refactor that breaks a benchmark fails the suite (throughput.py crashed for a release because nothing ran it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["aggregation.py", "throughput.py", "secure_aggregation.py", "load.py"]


@pytest.mark.parametrize("script", SMOKE)
def test_a_benchmark_runs_in_its_smoke_mode_and_writes_its_json(tmp_path, script):
    out = tmp_path / "figures.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert out.is_file() and out.stat().st_size > 0
