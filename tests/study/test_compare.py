"""The quick comparison of a few runs (hetlora.study.compare): variant labels and the command."""

import json

import pytest

from hetlora.study.compare import variant
from hetlora.config import RunConfig


def base(out, **kw):
    return RunConfig(**(dict(
        model="tiny", rounds=2, clients_per_round=2, local_steps=1, batch_size=4, max_length=48, lr=5e-3,
        r_min=2, r_max=6, eval_size=8, min_examples=400, max_clients=8, out=str(out), seed=5,
    ) | kw))


def test_variant_labels():
    b = base("/tmp/x")
    assert variant("fedavg:3", b).rank == 3 and variant("fedavg:3", b).method == "fedavg"
    assert variant("fedavg-rmin", b).rank == 2 and variant("fedavg-rmax", b).rank == 6
    assert variant("hetlora-noprune", b).prune is False and not variant("hetlora-noprune", b).prunes
    with pytest.raises(ValueError, match="unknown method"):
        variant("nope", b)


def test_a_shared_option_applies_where_the_method_takes_it_and_is_reset_where_not():
    """compare shares one base across methods: --florist-energy reaches florist only, per_layer and prune the methods
    that take them, budgets the clients with a calibrated footprint; each other run records the default it ran with
    (a lone `hetlora run` refuses such an option instead of ignoring it)."""
    b = base("/tmp/x", florist_energy=0.8, per_layer=True, prune=True, memory_budget_mb=4000.0)
    assert variant("florist", b).florist_energy == 0.8 and variant("hetlora", b).florist_energy != 0.8
    assert variant("hetlora", b).per_layer and not variant("fedavg", b).per_layer
    assert variant("hetlora", b).prune is True and variant("fedavg:3", b).prune is None and variant("fslora", b).prune is None
    assert variant("fslora", b).memory_budget_mb == 4000.0 and variant("fft", b).memory_budget_mb is None
    assert variant("fedex-lora", b).memory_budget_mb == 4000.0  # a folding client has its own footprint
    with pytest.raises(ValueError, match="florist_energy is florist's"):
        b.validate()


TINY_FLAGS = ["--model", "tiny", "--rounds", "2", "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "4",
              "--max-length", "48", "--lr", "5e-3", "--r-min", "2", "--r-max", "6", "--eval-size", "8",
              "--min-examples", "400", "--max-clients", "8", "--seed", "5"]


def test_compare_command_writes_table_and_plot_and_report_rerenders(tmp_path):
    """The command itself (it once failed on every call: 'unknown config key run_compare')."""
    from typer.testing import CliRunner

    from hetlora.cli import app

    result = CliRunner().invoke(app, ["compare", "--methods", "hetlora,fedavg:2", "--out", str(tmp_path), "--quiet"] + TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert "hetlora: final ppl" in result.output and "fedavg:2: final ppl" in result.output
    md = (tmp_path / "comparison.md").read_text()
    assert "| hetlora |" in md and "| fedavg:2 |" in md
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    # the same seed gave both methods the same clients each round
    m1 = [json.loads(l)["clients"] for l in (tmp_path / "hetlora" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(l)["clients"] for l in (tmp_path / "fedavg-r2" / "metrics.jsonl").read_text().splitlines()]
    assert m1 == m2
    (tmp_path / "comparison.md").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--target-ppl", "1e9"])
    assert result.exit_code == 0, result.output
    assert "rounds to ppl ≤ 1000000000.0" in (tmp_path / "comparison.md").read_text()
