"""A secure deployment on localhost: TLS, SuperNode authentication, identity from the operator's binding.

One SuperLink with TLS (our CA) and ``--enable-supernode-auth``; two SuperNodes whose keys were registered
with ``flwr supernode register``; the run binds the registered node ids to their partitions
(``node-clients``) and aggregates under SecAgg+ (``secure-aggregation``: the server sees only sums). It completes
a round with the numbers of the same run in process, in the clear (two secure rounds in a row: the loopback
test in test_secure_aggregation.py, which runs Flower's own SecAgg+ workflow in one process). And the attacks
fail: an unregistered node is refused by the SuperLink and never receives a message, a node without the
CA cannot connect, and ``flwr run`` without the CA cannot start a run. Every process is ended by its pid.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flower.test_deployment import end_all, free_port, rounds_of_two_clients, wait_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr not installed")


def connection(home: Path, address: str, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca}"\n' if ca else ""
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "{address}"\n{tls}')


def test_tls_authenticated_supernodes_bound_to_clients_and_the_attacks_fail(tmp_path):
    from hetlora.config import RunConfig
    from hetlora.flower.credentials import write_credentials
    from hetlora.server.runner import run

    creds = tmp_path / "creds"
    write_credentials(creds, nodes=3)
    link = free_port()
    address = f"127.0.0.1:{link}"
    home = tmp_path / "flwr-home"
    connection(home, address, creds / "ca.crt")
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []

    def start(args, log):
        f = open(tmp_path / log, "w")
        procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path))
        return procs[-1]

    def supernode(k: int, log: str, ca: bool = True, pid: int = 0):
        args = [str(BIN / "flower-supernode"), "--superlink", address, "--auth-supernode-private-key", str(creds / f"node-{k}"),
                "--node-config", f"partition-id={pid} num-partitions=2", "--port", str(free_port()), "--max-retries", "3",
                "--max-wait-time", "20"]
        return start(args + (["--root-certificates", str(creds / "ca.crt")] if ca else []), log)

    try:
        start([str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(link), "--database", str(tmp_path / "state.db"),
               "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile", str(creds / "server.pem"),
               "--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth"], "superlink.log")
        wait_for(tmp_path / "superlink.log", "Uvicorn running", 60)
        node_ids = []
        for k in (1, 2):
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(creds / f"node-{k}.pub"), "deployment", "--format", "json"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert reg.returncode == 0, reg.stdout + reg.stderr
            node_ids.append(int(json.loads(reg.stdout[reg.stdout.index("{"):])["node-id"]))
        for k, pid in ((1, 0), (2, 1)):
            supernode(k, f"supernode{k}.log", pid=pid)
        for k in (1, 2):
            wait_for(tmp_path / f"supernode{k}.log", "SuperNode ID", 60)
        # attack 1: a node with a valid key that nobody registered
        intruder = supernode(3, "intruder.log", pid=0)
        # attack 2: a registered node's key, but no CA: it cannot verify the SuperLink
        no_ca = supernode(1, "no-ca.log", ca=False, pid=1)  # both retry for a while: judged once the run is over
        # attack 3: `flwr run` without the CA cannot start a run
        bare = tmp_path / "flwr-home-no-ca"
        connection(bare, address, None)
        refused = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "deployment"], env=env | {"FLWR_HOME": str(bare)},
                                 capture_output=True, text=True, timeout=120)
        assert "Successfully started run" not in refused.stdout and refused.returncode != 0, refused.stdout + refused.stderr

        out = tmp_path / "out"
        binding = ",".join(f"{n}={p}" for n, p in zip(node_ids, (0, 1)))
        result = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "deployment", "--stream", "--run-config",
                                 f'out="{out}" rounds=1 node-clients="{binding}" norm-bound="off" secure-aggregation=true '
                                 'method="fedavg"'],  # every client at r_max: the covered rank is r_max, the plain rule's sum
                                env=env, capture_output=True, text=True, timeout=420)
        rows = rounds_of_two_clients(result, out, 180, rounds=1)  # 2 rounds under SecAgg+: the simulation engine's test
        assert intruder.wait(timeout=120) != 0 and no_ca.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
        assert "Received" not in (tmp_path / "intruder.log").read_text()  # it never got a message
        # the same run in process, in the clear: the same numbers (TLS and SecAgg+ add transport and masks, not arithmetic)
        saved = json.loads((out / "config.json").read_text())
        assert saved["secure_aggregation"] and all(r["secure_seconds"] > 0 for r in rows)  # the server saw only sums
        plain = {"out": str(tmp_path / "local"), "secure_aggregation": False}
        local = RunConfig(**{k: v for k, v in saved.items() if not k.startswith("_") and k != "node_clients"} | plain)
        run(local, progress=False)
        local_rows = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
        assert [r["eval_loss"] for r in rows] == pytest.approx([r["eval_loss"] for r in local_rows], rel=1e-4, abs=1e-4)
    finally:
        end_all(procs)
