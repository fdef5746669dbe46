"""The Flower simulation engine gives the in-process engine's numbers (same seed)."""

import json

import pytest


from hetlora.config import RunConfig
from hetlora.server.runner import run


def tiny(out, **kw):
    base = dict(
        model="tiny", rounds=2, clients_per_round=3, local_steps=2, batch_size=4, max_length=48, lr=5e-3,
        r_min=2, r_max=6, eval_size=8, min_examples=400, max_clients=5, out=str(out), seed=11,
    )
    return RunConfig(**(base | kw))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_flower_simulation_matches_in_process(tmp_path):
    from hetlora.flower.simulation import run_simulation

    local, flower = tmp_path / "local", tmp_path / "flower"
    run(tiny(local), progress=False)
    summary = run_simulation(tiny(flower, engine="flower"))
    a, b = rows(local), rows(flower)
    assert [r["round"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["eval_loss"] - y["eval_loss"]) <= 1e-4
        assert x["ranks"] == y["ranks"] and x["clients"] == y["clients"]
        assert x["bytes_up"] == y["bytes_up"] and x["bytes_down"] == y["bytes_down"]
    assert (flower / "adapter" / "adapter_model.safetensors").is_file()
    assert (flower / "checkpoint").is_dir() and summary["rounds"] == 2


def test_secure_aggregation_on_the_simulation_engine_gives_the_plain_numbers(tmp_path, capfd):
    """`hetlora run --engine flower --secure-aggregation`: SecAgg+ over Ray's transport, the plain run's loss."""
    from typer.testing import CliRunner

    from hetlora.cli import app

    local, secure = tmp_path / "local", tmp_path / "secure"
    # fedavg: every client at r_max, no pruning, so the covered rank is r_max and the secure sum is the plain rule's
    small = dict(rounds=1, clients_per_round=2, max_clients=2, norm_bound=None, method="fedavg")
    run(tiny(local, **small), progress=False)
    args = ["run", "--engine", "flower", "--secure-aggregation", "--norm-bound", "off", "--model", "tiny", "--rounds", "1",
            "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "4", "--max-length", "48", "--lr", "5e-3",
            "--r-min", "2", "--r-max", "6", "--eval-size", "8", "--min-examples", "400", "--max-clients", "2", "--seed", "11",
            "--out", str(secure), "--quiet", "--method", "fedavg", "--secure-clip", "100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (a,), (b,) = rows(local), rows(secure)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4) and b["ranks"] == a["ranks"] and b["secure_seconds"] > 0
    printed = "".join(capfd.readouterr())  # --quiet: Flower's INFO and DEBUG lines (the server's and the actors') stay out
    assert "Secure aggregation commencing" not in printed and "[Stage" not in printed and "stage 2" not in printed
