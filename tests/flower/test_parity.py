"""Every method Flower accepts gives the in-process result over Flower's own apps and messages.

The ServerApp's strategy and the ClientApp's handlers run for real (Flower ``Message``s,
``ArrayRecord``s, ``ConfigRecord``s); only the transport is a loopback, and every
message meets a fresh client process (the ClientApp's host cache is cleared), as a
deployed SuperNode does. A real Ray simulation is in test_simulation.py.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid

from hetlora.config import RunConfig
from hetlora.flower import client_app as client_module
from hetlora.flower.server_app import serve
from hetlora.methods import METHODS
from hetlora.runner import run


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp of the node it is addressed to, in this process."""

    def __init__(self, partitions: int, fresh_process: bool = True):
        self.contexts = {100 + pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
                         for pid in range(partitions)}
        self.fresh_process = fresh_process
        self.bytes_sent = 0

    def set_run(self, run):  # pragma: no cover - not used by serve()
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            if self.fresh_process:
                client_module._HOSTS.clear()
            self.bytes_sent += sum(a.numpy().nbytes for rec in message.content.array_records.values() for a in rec.values())
            replies.append(client_module.app(message, self.contexts[message.metadata.dst_node_id]))
        return replies


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp process before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


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
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                result = reply.content.config_records.get("result")
                if result is not None and result["client-id"] == sorted(result_ids)[0]:
                    result["num-examples"] = 10**15
            return replies

    out = tmp_path / "flower"
    cfg = tiny(out, rounds=1, clients_per_round=4)
    from hetlora.host import ClientHost

    result_ids = ClientHost(cfg).client_ids
    serve(Lying(partitions=4, fresh_process=False), cfg)
    (row,) = rows(out)
    assert [d["client"] for d in row["dropped"]] == [sorted(result_ids)[0]]
    assert "reports 1000000000000000 examples" in row["dropped"][0]["reason"] and len(row["clients"]) == 3
