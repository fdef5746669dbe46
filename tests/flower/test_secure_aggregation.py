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

from hetlora import aggregate
from hetlora.config import RunConfig
from hetlora.core.adapter import ClientUpdate, truncate_adapter
from hetlora.server.federation import Federation
from hetlora.flower import client_app, secure_round
from hetlora.flower.server_app import HetLoRAStrategy, serve
from hetlora.server.runner import run

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


@pytest.mark.parametrize("method", ["hetlora", "hetlora-naive", "hetlora-svd-revive"])
def test_a_secure_run_equals_the_plain_run_when_every_component_is_covered(tmp_path, monkeypatch, method):
    """Every client at r_max and no pruning: the covered rank is r_max, so the secure sum is the plain rule's —
    and hetlora-svd-revive's re-factoring runs on the unmasked sum as on the plain aggregate (its label's run)."""
    same = dict(rank_dist="fixed", prune=False)
    plain_seen = aggregates(monkeypatch)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "plain", method=method, **same))
    plain = list(plain_seen)
    plain_seen.clear()

    def no_individual_updates(*args, **kwargs):
        raise AssertionError("the secure server took the per-update path")

    monkeypatch.setattr(Federation, "complete_round", no_individual_updates)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "secure", method=method, secure_aggregation=True,
                                                           secure_clip=100.0, **same))
    secure = plain_seen
    assert len(secure) == len(plain) == 2
    for a, b in zip(secure, plain):  # each round's aggregate: SecAgg+ quantises to 2³⁰ levels, nothing else differs
        assert a.keys() == b.keys() and relative(a, b) <= 1e-4
    for x, y in zip(rows(tmp_path / "secure"), rows(tmp_path / "plain")):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-4)
        assert x["ranks"] == y["ranks"] and x["clients"] == y["clients"] and not x["dropped"]
        assert x["secure_rank"] == 6 and x["secure_min_clients"] == 2


def recorded_shares(monkeypatch):
    """Each client's trained adapter (at the rank it trained) and its share of the sum, as the client makes them."""
    trained, shares = {}, {}
    train_one, client_share = client_app._train_one, client_app.client_share

    def recording_train(cfg, host, job, **options):
        update = train_one(cfg, host, job, **options)
        trained[job.client_id] = update
        return update

    def recording_share(adapter, cover, clip):
        share = client_share(adapter, cover, clip)
        shares[len(shares)] = share
        return share

    monkeypatch.setattr(client_app, "_train_one", recording_train)
    monkeypatch.setattr(client_app, "client_share", recording_share)
    return trained, shares


def component(adapter, j, suffix):
    """Rank component j of every module's B (column) or A (row), concatenated."""
    parts = [v[:, j] if suffix == "lora_B.weight" else v[j, :] for k, v in sorted(adapter.items()) if k.endswith(suffix)]
    return torch.cat([p.double().flatten() for p in parts])


def test_the_server_reads_no_rank_component_of_one_client_alone(tmp_path, monkeypatch):
    """The attack of issue 40: ranks 2 and 4 in a round of two; before the covered rank, component 3 of the published
    global adapter was the rank-4 client's own (cosine 0.99999998). Now the server unmasks only components both
    clients hold: each one it reads is the two clients' weighted sum (recomputed here with the plain rule), the
    others keep the previous global's values, and no component read matches one client's."""
    seen = aggregates(monkeypatch)
    trained, _ = recorded_shares(monkeypatch)
    cfg = tiny(tmp_path / "run", rounds=1, r_min=2, r_max=4, clients_per_round=2, max_clients=2, rank_dist="list",
               ranks=[2, 4], secure_aggregation=True, secure_clip=100.0, seed=0)
    fed_before = Federation(cfg)
    previous = {k: v.clone() for k, v in fed_before.state["global"].items()}
    serve(LoopbackGrid(2, fresh_process=False), cfg)
    (row,) = rows(tmp_path / "run")
    (g,) = seen
    ranks = sorted(u.rank for u in trained.values())
    assert row["aggregated"] and len(trained) == 2 and ranks[0] < ranks[1]  # mixed ranks: the top one unique
    cover = row["secure_rank"]
    assert cover == ranks[0]  # the second-largest rank of the round (m = 2)
    shares = [ClientUpdate(truncate_adapter(u.adapter, cover), u.num_examples, client_id=c, rank=cover)
              for c, u in sorted(trained.items())]
    expected = aggregate("hetlora", shares, r_max=cover)  # the plain rule on what each client may show
    for key, value in g.items():
        covered = value[:, :cover] if key.endswith("lora_B.weight") else value[:cover, :]
        rest, before = (value[:, cover:], previous[key][:, cover:]) if key.endswith("lora_B.weight") else (value[cover:], previous[key][cover:])
        assert torch.allclose(covered, expected[key], atol=1e-6, rtol=1e-4)
        assert torch.equal(rest, before)  # not sent: the previous global's values, nothing of the top client
    top = max(trained.values(), key=lambda u: u.rank)
    for j in range(cover, top.rank):  # what the server used to read: the top client's own components
        for suffix in ("lora_B.weight",):
            assert not torch.allclose(component(g, j, suffix), component(top.adapter, j, suffix))
    worst = max(abs(float(torch.nn.functional.cosine_similarity(component(g, j, "lora_B.weight"),
                                                                component(u.adapter, j, "lora_B.weight"), dim=0)))
                for j in range(cover) for u in trained.values())
    print(f"largest |cos| between a read component and one client's: {worst:.4f}")
    assert worst < 0.99  # a sum of two: no component read is one client's up to scale (it was 0.99999998)


def test_a_client_that_skips_its_own_clip_and_range_check_gets_the_sum_refused(tmp_path, monkeypatch):
    """SecAgg+'s quantiser cuts a ×1e6 contribution to ±8 per entry silently; the server checks the unmasked sum
    against what clipped clients can sum to, refuses the round, and the previous global adapter stays."""
    client_share = client_app.client_share

    def unclipped(adapter, cover, clip):
        share = client_share(adapter, cover, 1e30)
        return {k: v * 1e6 for k, v in share.items()} if not unclipped.done else share

    unclipped.done = False

    def no_range_check(values, bound):
        unclipped.done = True  # the first client is the cheat; the others are honest
        return None

    monkeypatch.setattr(client_app, "client_share", unclipped)
    monkeypatch.setattr(client_app, "range_problem", no_range_check)
    seen = aggregates(monkeypatch)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "run", rounds=1, secure_aggregation=True))
    (row,) = rows(tmp_path / "run")
    assert not row["aggregated"] and not seen  # nothing applied: the previous global stays
    (refusal,) = [d["reason"] for d in row["dropped"] if d["client"] == "(sum)"]
    assert "exceed what clients clipped to" in refusal and "skipped its clip" in refusal


def test_a_dropout_that_leaves_a_component_with_one_holder_stops_the_sum_before_unmasking(tmp_path, monkeypatch):
    """Ranks 6, 6, 2 (m = 2, covered rank 6): one rank-6 client drops out after masking, so components 2–5 would
    be the other one's alone: the server halts SecAgg+ before its unmask stage and names why."""
    train_one = client_app._train_one

    def failing(cfg, host, job, **options):
        if job.rank == 6 and not failing.done:
            failing.done = True
            raise RuntimeError("the device went away")
        return train_one(cfg, host, job, **options)

    failing.done = False
    monkeypatch.setattr(client_app, "_train_one", failing)
    unmasked = []
    monkeypatch.setattr(secure_round.SecAggPlusWorkflow, "unmask_stage", lambda *a: unmasked.append(1) or False)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "run", rounds=1, secure_aggregation=True, rank_dist="list",
                                                      ranks=[6, 6, 2]))
    (row,) = rows(tmp_path / "run")
    assert not row["aggregated"] and not unmasked
    (halt,) = [d["reason"] for d in row["dropped"] if d["client"] == "(sum)"]
    assert len([d for d in row["dropped"] if "dropped out" in d["reason"]]) == 1  # the one that failed, not the others
    assert "only 1 of the 2 clients left in the sum hold all 6 covered components" in halt


def test_two_clients_per_round_are_told_that_one_dropout_loses_the_round(tmp_path, caplog):
    fed = Federation(tiny(tmp_path / "run", clients_per_round=2, max_clients=3, secure_aggregation=True))
    with caplog.at_level("WARNING"):
        HetLoRAStrategy(fed)
    assert "one client that drops out (or is out of range) loses the whole round; 3 clients per round survive one" in caplog.text


def test_a_secure_run_repeats_its_numbers_and_its_reports_carry_no_tail_norms(tmp_path, monkeypatch):
    """Flower's stochastic rounding is seeded per (run, round, client): the same seed gives the same aggregate in
    bf16 too; and what the server reads of each client is its id, examples, ranks, round and loss only."""
    seen = aggregates(monkeypatch)
    reports = []
    complete = HetLoRAStrategy.complete_secure

    def recording(self, t, collector, plan, seconds):
        reports.extend(raw for _, raw in collector.reports)
        return complete(self, t, collector, plan, seconds)

    monkeypatch.setattr(HetLoRAStrategy, "complete_secure", recording)
    for name in ("a", "b"):
        serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / name, rounds=1, secure_aggregation=True, precision="bf16"))
    a, b = seen
    assert all(torch.equal(a[k], b[k]) for k in a)
    allowed = {"client-id", "num-examples", "rank", "round", "metric.train_loss", "metric.rank_in", "metric.rank_out"}
    assert reports and all(set(r) <= allowed for r in reports)


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

    def lying(cfg, host, job, **options):
        update = train_one(cfg, host, job, **options)
        lie = update.metrics | {"rank_out": cfg.r_max + 3}
        return dataclasses.replace(update, metrics=lie) if job.client_id == host.client_ids[0] else update

    monkeypatch.setattr(client_app, "_train_one", lying)
    serve(LoopbackGrid(3, fresh_process=False), tiny(tmp_path / "run", rounds=1, secure_aggregation=True))
    (row,) = rows(tmp_path / "run")
    assert not row["aggregated"] and row["clients"] == []
    (liar,) = [d for d in row["dropped"] if "after pruning" in d["reason"]]
    assert "reports rank 9 after pruning, but was sent rank" in liar["reason"] and "aggregate is refused" in liar["reason"]


def test_an_inflated_update_is_bounded_by_the_mandatory_clip(tmp_path, monkeypatch):
    """A client whose training inflates its update ×1e4 (its code still clips): the clip is mandatory under secure
    aggregation, so every factor of the aggregate is within C·√r_c. With a small clip all three are summed; with
    the default (2‖A₀‖/√r) the clipped client's weight ‖BA‖/s still leaves the quantiser's range: it refuses, drops."""
    train_one = client_app._train_one

    def inflating(cfg, host, job, **options):
        update = train_one(cfg, host, job, **options)
        if job.client_id != host.client_ids[0]:
            return update
        return dataclasses.replace(update, adapter={k: v * 1e4 for k, v in update.adapter.items()})

    monkeypatch.setattr(client_app, "_train_one", inflating)
    for clip in (None, 0.05):
        seen = aggregates(monkeypatch)
        out = tmp_path / f"clip-{clip}"
        serve(LoopbackGrid(3, fresh_process=False), tiny(out, rounds=1, secure_aggregation=True, secure_clip=clip))
        (row,) = rows(out)
        assert row["aggregated"] and len(row["clients"]) == (3 if clip else 2) and (clip is None or row["secure_clip"] == clip)
        (g,) = seen
        for suffix in ("lora_A.weight", "lora_B.weight"):  # a convex combination of factors each ≤ C·√r_c
            norm = sum(float(v[:, :row["secure_rank"]].double().pow(2).sum()) if suffix == "lora_B.weight"
                       else float(v[:row["secure_rank"]].double().pow(2).sum()) for k, v in g.items() if k.endswith(suffix)) ** 0.5
            assert norm <= row["secure_clip"] * row["secure_rank"] ** 0.5 * (1 + 1e-4)


@pytest.mark.parametrize("change, problem", [
    (dict(method="fslora"), "fslora's is not"),
    (dict(method="rbla"), "rbla's is not"),
    (dict(per_layer=True), "per_layer weights"),
    (dict(norm_bound=1.5), "use --norm-bound off"),
    (dict(clients_per_round=1), "at least 2 clients"),
    (dict(dp_clip=1.0), "DP and secure aggregation"),
    (dict(secure_min_clients=1), "secure_min_clients must be between 2 and clients_per_round"),
    (dict(secure_min_clients=4), "secure_min_clients must be between 2 and clients_per_round"),
    (dict(secure_clip=float("inf")), "secure_clip must be a positive number"),
])
def test_what_secure_aggregation_cannot_carry_is_refused_with_the_reason(tmp_path, change, problem):
    with pytest.raises(ValueError, match=problem):
        tiny(tmp_path, secure_aggregation=True, **change).validate()


def test_the_in_process_engine_refuses_secure_aggregation(tmp_path):
    with pytest.raises(ValueError, match="runs on Flower's SecAgg"):
        run(tiny(tmp_path / "run", secure_aggregation=True), progress=False)
    with pytest.raises(ValueError, match="secure_clip needs secure_aggregation"):
        tiny(tmp_path, secure_clip=1.0).validate()
    with pytest.raises(ValueError, match="secure_min_clients needs secure_aggregation"):
        tiny(tmp_path, secure_min_clients=2).validate()
