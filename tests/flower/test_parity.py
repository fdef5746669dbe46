"""Every method Flower accepts gives the in-process result over Flower's own apps and messages.

The ServerApp's strategy and the ClientApp's handlers run for real (Flower ``Message``s,
``ArrayRecord``s, ``ConfigRecord``s); only the transport is a loopback, and every
message meets a fresh client process (the ClientApp's host cache is cleared), as a
deployed SuperNode does. A real Ray simulation is in test_simulation.py.
"""

from __future__ import annotations

import json

import pytest

from hetlora.config import RunConfig
from hetlora.flower.server_app import serve
from hetlora.methods import METHODS
from hetlora.server.runner import run

from .loopback import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def tiny(out, **kw):
    base = dict(
        model="tiny", rounds=2, clients_per_round=3, local_steps=2, batch_size=4, max_length=48, lr=5e-2,
        r_min=2, r_max=6, eval_size=8, min_examples=400, max_clients=4, out=str(out), seed=4, precision="fp32",
    )
    return RunConfig(**(base | kw))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_flower_apps_give_the_in_process_result(tmp_path, method):
    kw = {"rank": 3} if METHODS[method].uniform_rank else {}
    local, flower = tmp_path / "local", tmp_path / "flower"
    run(tiny(local, method=method, **kw), progress=False)
    grid = LoopbackGrid(partitions=4, fresh_process=METHODS[method].folds_into_base)
    serve(grid, tiny(flower, method=method, **kw))
    a, b = rows(local), rows(flower)
    assert [r["round"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["eval_loss"] - y["eval_loss"]) <= 1e-4, (method, x["round"], x["eval_loss"], y["eval_loss"])
        assert x["ranks"] == y["ranks"] and x["clients"] == y["clients"] and not y["dropped"]
        assert x["bytes_up"] == y["bytes_up"] and x["bytes_down"] == y["bytes_down"]
    # what the server counts as sent is what went into the messages (adapter + base delta)
    assert sum(r["bytes_down"] for r in b) == grid.bytes_sent


def test_a_node_that_inflates_its_example_count_is_dropped(tmp_path):
    """The count a node reports with its update must be the one it reported when it joined."""

    class Lying(LoopbackGrid):
        def deliver(self, message):
            reply = super().deliver(message)
            result = reply.content.config_records.get("result")
            if result is not None and result["client-id"] == sorted(result_ids)[0]:
                result["num-examples"] = 10**15
            return reply

    out = tmp_path / "flower"
    cfg = tiny(out, rounds=1, clients_per_round=4)
    from hetlora.device.host import ClientHost

    result_ids = ClientHost(cfg).client_ids
    serve(Lying(partitions=4, fresh_process=False), cfg)
    (row,) = rows(out)
    assert [d["client"] for d in row["dropped"]] == [sorted(result_ids)[0]]
    assert "reports 1000000000000000 examples" in row["dropped"][0]["reason"] and len(row["clients"]) == 3


def test_a_round_that_closes_early_takes_the_same_replies_on_flower_as_in_process(tmp_path):
    """Seeded delays (some clients silent), a deadline and over-selection: Flower asks in waves by simulated reply
    time, so it takes, drops and names exactly the clients the in-process engine does, with the same aggregate."""
    closing = dict(clients_per_round=2, over_select=0.5, round_timeout=1.5, client_delay="exp:1.0,silent=0.25", rounds=3)
    local, flower = tmp_path / "local", tmp_path / "flower"
    run(tiny(local, **closing), progress=False)
    grid = LoopbackGrid(partitions=4, fresh_process=False)
    serve(grid, tiny(flower, **closing))
    a, b = rows(local), rows(flower)
    assert sum(len(r["dropped"]) for r in a) >= 2  # the setting does close rounds without some clients
    for x, y in zip(a, b):
        assert abs(x["eval_loss"] - y["eval_loss"]) <= 1e-4
        assert (x["clients"], x["dropped"], x["closed_by"], x["asked"]) == (y["clients"], y["dropped"], y["closed_by"], y["asked"])
        assert x["bytes_down"] == y["bytes_down"] and x["bytes_up"] == y["bytes_up"]
