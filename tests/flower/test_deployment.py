"""Deployment on localhost: one SuperLink + two SuperNodes (insecure), a 2-round tiny run via `flwr run`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path.name} never said {text!r}:\n{path.read_text(errors='replace')[-2000:] if path.is_file() else ''}")


def end_all(procs: list[subprocess.Popen]) -> None:
    """End every process we started, by its pid: terminate, then kill what is still there after 20 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def rounds_of_two_clients(result: subprocess.CompletedProcess, out: Path, timeout: float, rounds: int = 2) -> list[dict]:
    """`flwr run` started the run, its ServerApp finished, and every round trained both clients; the rows."""
    assert "Successfully started run" in result.stdout, result.stdout + result.stderr
    deadline = time.time() + timeout
    while not (out / "summary.json").is_file() or "final_eval_ppl" not in (out / "summary.json").read_text():
        assert time.time() < deadline, "the ServerApp did not finish"
        time.sleep(0.5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)) and all(len(r["clients"]) == 2 and not r["dropped"] for r in rows)
    return rows


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr not installed")
def test_superlink_two_supernodes_two_rounds(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    # the SuperLink and SuperNodes start Flower's other executables by name: put ours first on PATH
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs = []

    def start(args, log):
        f = open(tmp_path / log, "w")
        procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path))

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
               "--database", str(tmp_path / "state.db")], "superlink.log")
        wait_for(tmp_path / "superlink.log", "Uvicorn running", 60)
        for pid in (0, 1):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--node-config", f"partition-id={pid} num-partitions=2", "--port", str(free_port())], f"supernode{pid}.log")
        for pid in (0, 1):
            wait_for(tmp_path / f"supernode{pid}.log", "SuperNode ID", 60)
        out = tmp_path / "out"
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "deployment", "--stream", "--run-config", f'out="{out}" rounds=2'],
            env=env, capture_output=True, text=True, timeout=420,
        )
        rounds_of_two_clients(result, out, 120)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        end_all(procs)
