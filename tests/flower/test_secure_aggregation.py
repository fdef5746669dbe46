"""HetLoRA under SecAgg+ (``--secure-aggregation``): the plain run's numbers, and the server never holds an update.

Each node's messages go through Flower's own ``secaggplus_mod`` and ``SecAggPlusWorkflow`` (in this
process, over the loopback grid: the protocol and its arithmetic are Flower's, only the transport is
skipped). The attacks: the server reads a client's reply (it finds noise), a client lies about its rank
(the round is refused, named), a client inflates its update (it is bounded, or refused and left out).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from hetlora.config import RunConfig
from hetlora.federation import Federation
from hetlora.flower import client_app
from hetlora.flower.server_app import serve
from hetlora.runner import run

from .loopback import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def tiny(out, **kw):
    base = dict(model="tiny", rounds=2, clients_per_round=3, local_steps=1, batch_size=2, max_length=48, lr=5e-3,
                r_min=2, r_max=6, eval_size=4, min_examples=400, max_clients=3, out=str(out), seed=4, precision="fp32",
                norm_bound=None)
    return RunConfig(**(base | kw))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def aggregates(monkeypatch):
    """Every round's new global adapter, as the federation applies it."""
    seen = []
    apply = Federation._apply

    def recording(self, round_index, new, base_update, kept):
        seen.append({k: v.clone() for k, v in new.items()})
        return apply(self, round_index, new, base_update, kept)

    monkeypatch.setattr(Federation, "_apply", recording)
    return seen


def relative(a, b):
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


@pytest.mark.parametrize("method", ["hetlora", "hetlora-naive"])
def test_a_secure_run_equals_the_plain_run_round_by_round(tmp_path, monkeypatch, method):
    plain_seen = aggregates(monkeypatch)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "plain", method=method))
    plain = list(plain_seen)
    plain_seen.clear()

    def no_individual_updates(*args, **kwargs):
        raise AssertionError("the secure server took the per-update path")

    monkeypatch.setattr(Federation, "complete_round", no_individual_updates)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "secure", method=method, secure_aggregation=True))
    secure = plain_seen
    assert len(secure) == len(plain) == 2
    for a, b in zip(secure, plain):  # each round's aggregate: SecAgg+ quantises to 2³⁰ levels, nothing else differs
        assert a.keys() == b.keys() and relative(a, b) <= 1e-4
    for x, y in zip(rows(tmp_path / "secure"), rows(tmp_path / "plain")):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-4)
        assert x["ranks"] == y["ranks"] and x["clients"] == y["clients"] and not x["dropped"]
        assert x["bytes_up"] > y["bytes_up"]  # every client pads to r_max and sends int64 masked entries


def test_what_the_server_receives_from_a_client_tells_it_nothing_of_the_update(tmp_path, monkeypatch):
    """The attack: the server dequantises one client's masked vector as if it were plain; it finds noise
    uncorrelated with that client's contribution, while the unmasked sum is the clients' sum."""
    sent = {}
    contribution = client_app.contribution

    def recording(adapter, weight, r_max, scale):
        values = contribution(adapter, weight, r_max, scale)
        sent[len(sent)] = torch.cat([v.flatten() for v in values.values()]).numpy()
        return values

    monkeypatch.setattr(client_app, "contribution", recording)
    received = []

    class Recording(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            received.extend(replies)
            return replies

    serve(Recording(3, fresh_process=False), tiny(tmp_path / "run", rounds=1, secure_aggregation=True))
    masked = [r for r in received if RECORD_KEY_CONFIGS in r.content.config_records
              and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3 and len(sent) == 3
    for reply in received:  # no reply holds an array the server could read: SecAgg+ clears them
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    for reply in masked:
        arrays = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert all(a.dtype == np.int64 for a in arrays)
        vector = np.concatenate([a.ravel() for a in arrays[1:]]).astype(np.float64)  # [0] is the weight factor
        for own in sent.values():
            assert abs(np.corrcoef(vector, own)[0, 1]) < 0.05  # masks mod 2⁴⁰: uniform noise


def test_a_client_that_lies_about_its_rank_gets_the_round_refused_and_named(tmp_path, monkeypatch):
    train_one = client_app._train_one

    def lying(cfg, host, job):
        update = train_one(cfg, host, job)
        return dataclasses.replace(update, rank=cfg.r_max + 3) if job.client_id == host.client_ids[0] else update

    monkeypatch.setattr(client_app, "_train_one", lying)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "run", rounds=1, secure_aggregation=True))
    (row,) = rows(tmp_path / "run")
    assert not row["aggregated"] and row["clients"] == []
    (liar,) = [d for d in row["dropped"] if "after pruning" in d["reason"]]
    assert "reports rank 9 after pruning, but was sent rank" in liar["reason"] and "aggregate is refused" in liar["reason"]


def test_an_inflated_update_is_bounded_by_the_clients_clip_or_left_out_of_the_sum(tmp_path, monkeypatch):
    train_one = client_app._train_one

    def inflating(cfg, host, job):
        update = train_one(cfg, host, job)
        if job.client_id != host.client_ids[0]:
            return update
        return dataclasses.replace(update, adapter={k: v * 1e4 for k, v in update.adapter.items()})

    monkeypatch.setattr(client_app, "_train_one", inflating)
    # without a clip, its contribution leaves the quantiser's range: it refuses, drops out, the other two are summed
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "open", rounds=1, secure_aggregation=True))
    (row,) = rows(tmp_path / "open")
    assert row["aggregated"] and len(row["clients"]) == 2
    assert [d["reason"] for d in row["dropped"]] == ["dropped out of the secure round (no masked vector in the sum)"]
    # with the clients' fixed bound every factor is brought to it first: all three are summed, the aggregate bounded
    seen = aggregates(monkeypatch)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "clip", rounds=1, secure_aggregation=True, secure_clip=0.05))
    (row,) = rows(tmp_path / "clip")
    assert row["aggregated"] and len(row["clients"]) == 3
    (g,) = seen
    for suffix in ("lora_A.weight", "lora_B.weight"):  # a convex combination of factors each ≤ C·√r
        norm = sum(float(v.double().pow(2).sum()) for k, v in g.items() if k.endswith(suffix)) ** 0.5
        assert norm <= 0.05 * 6**0.5 * (1 + 1e-4)


@pytest.mark.parametrize("change, problem", [
    (dict(method="fslora"), "fslora's is not"),
    (dict(method="rbla"), "rbla's is not"),
    (dict(per_layer=True), "per_layer weights"),
    (dict(norm_bound=1.5), "use --norm-bound off"),
    (dict(clients_per_round=1), "at least 2 clients"),
    (dict(dp_clip=1.0), "DP and secure aggregation"),
])
def test_what_secure_aggregation_cannot_carry_is_refused_with_the_reason(tmp_path, change, problem):
    with pytest.raises(ValueError, match=problem):
        tiny(tmp_path, secure_aggregation=True, **change).validate()


def test_the_in_process_engine_refuses_secure_aggregation(tmp_path):
    with pytest.raises(ValueError, match="runs on Flower's SecAgg"):
        run(tiny(tmp_path / "run", secure_aggregation=True), progress=False)
    with pytest.raises(ValueError, match="secure_clip needs secure_aggregation"):
        tiny(tmp_path, secure_clip=1.0).validate()
