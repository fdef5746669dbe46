"""Rounds that close (docs/algorithm.md §7.3), in process: a deadline, over-selection, late and silent clients.

A client the round closes without is never trained, costs the round only its slot, and is named with why;
the aggregate is the reference rule's over the replies the round took."""

from __future__ import annotations

import json

import pytest
import torch

from hetlora.config import RunConfig
from hetlora.methods import aggregate_valid, get_method
from hetlora.server.federation import Federation
from hetlora.server.runner import run


def tiny(out, **kw):
    base = dict(model="tiny", rounds=1, clients_per_round=4, local_steps=1, batch_size=2, max_length=48, lr=5e-2,
                r_min=2, r_max=6, eval_size=4, min_examples=400, max_clients=4, out=str(out), seed=4, precision="fp32",
                tier_eval="off")
    return RunConfig(**(base | kw))


class Watched(Federation):
    """Records which clients train, in order; ``broken`` clients send a non-finite update (skipping their own checks)."""

    def __init__(self, cfg, broken=()):
        super().__init__(cfg)
        self.trained: list[str] = []
        self.broken = set(broken)

    def train(self, jobs):
        self.trained += [j.client_id for j in jobs]
        updates = super().train(jobs)
        for u in updates:
            if u.client_id in self.broken:
                key = next(k for k in u.adapter if k.endswith("lora_B.weight"))
                u.adapter[key] = torch.full_like(u.adapter[key], float("nan"))
        return updates


def delays(tmp_path, table) -> str:
    path = tmp_path / "delays.json"
    path.write_text(json.dumps(table))
    return str(path)


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return Federation(tiny(tmp_path_factory.mktemp("probe") / "run")).client_ids


def test_a_round_closes_at_its_deadline_with_the_others_aggregate(tmp_path, ids):
    """ids[1] replies after the 5 s deadline and ids[2] never: neither trains, both are named, and the global
    adapter is the reference hetlora rule over the two replies in time."""
    table = {ids[0]: 0.5, ids[1]: 9.0, ids[2]: None, ids[3]: 1.0}
    cfg = tiny(tmp_path / "run", round_timeout=5.0, client_delay=delays(tmp_path, table))
    fed = Watched(cfg)
    ctx, taken = fed.context(0), []
    run(cfg, progress=False, federation=fed, hook=lambda t, updates: taken.extend(updates) or updates)
    assert fed.trained == [ids[0], ids[3]]  # in order of their replies
    expected = aggregate_valid(get_method("hetlora"), taken, ctx)
    for key, value in expected.items():
        torch.testing.assert_close(fed.state["global"][key], value, rtol=1e-6, atol=1e-8)
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == sorted([ids[0], ids[3]]) and row["aggregated"] and row["asked"] == 4
    assert {d["client"]: d["reason"] for d in row["dropped"]} == {
        ids[1]: "no reply by the round deadline (simulated delay 9.00 s > 5 s)",
        ids[2]: "never replied (a silent client in the simulated delay model)"}
    assert row["closed_by"] == "deadline"


def test_over_selection_takes_the_first_k_valid_replies_and_never_trains_the_rest(tmp_path, ids):
    """K = 2 of 4 asked (F = 1): the first reply is invalid and does not count, the next two valid ones close the
    round, and the fourth client is never trained but named as over-selected."""
    table = {ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0, ids[3]: 4.0}
    cfg = tiny(tmp_path / "run", clients_per_round=2, over_select=1.0, client_delay=delays(tmp_path, table))
    fed = Watched(cfg, broken=[ids[0]])
    summary = run(cfg, progress=False, federation=fed)
    assert fed.trained == [ids[0], ids[1], ids[2]]
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == [ids[1], ids[2]] and row["closed_by"] == "enough valid replies"
    reasons = {d["client"]: d["reason"] for d in row["dropped"]}
    assert reasons[ids[0]].endswith("contains NaN or Inf")
    assert reasons[ids[3]] == "over-selected: the round closed with its 2 valid replies before this one was taken"
    assert summary["visits"] == {ids[1]: 1, ids[2]: 1}


def test_over_selection_takes_full_fine_tuning_replies_too(tmp_path, ids):
    """fft's replies are dense weights, not LoRA factors: the first-K-valid rule used to read their factor norms and
    crash the round ("adapter has no single rank"); each is checked value by value instead, and the round closes."""
    table = {ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0, ids[3]: 4.0}
    cfg = tiny(tmp_path / "run", method="fft", lr=1e-4, clients_per_round=2, over_select=1.0, client_delay=delays(tmp_path, table))
    fed = Watched(cfg)
    run(cfg, progress=False, federation=fed)
    assert fed.trained == [ids[0], ids[1]]
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == [ids[0], ids[1]] and row["closed_by"] == "enough valid replies" and row["aggregated"]


def test_without_a_delay_model_or_over_selection_a_round_takes_every_sampled_client(tmp_path, ids):
    """The defaults change nothing: K of N asked, all trained, the round closes when every reply is in."""
    fed = Watched(tiny(tmp_path / "run", clients_per_round=3))
    run(fed.cfg, progress=False, federation=fed)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert sorted(fed.trained) == row["clients"] == fed.sample(0) and len(row["clients"]) == 3
    assert row["closed_by"] == "all replies" and row["dropped"] == []


def test_over_selection_without_a_delay_model_does_not_favour_the_lowest_ids(tmp_path, ids):
    """All four asked reply at once (no delay model); the round takes 2. Which two must come from a seeded order per
    round, not the sorted ids: over 12 rounds every client is taken, the highest id as well as the lowest."""
    fed = Federation(tiny(tmp_path / "run", clients_per_round=2, over_select=1.0))
    first = [fed.open_round(t).order[:2] for t in range(12)]
    assert all(len(set(o)) == 2 for o in first)
    taken = [c for o in first for c in o]
    assert {ids[0], ids[3]} <= set(taken) and taken.count(ids[0]) < 12
    assert fed.open_round(3).order == fed.open_round(3).order  # seeded: the same round, the same order


def test_a_reply_whose_product_overflows_does_not_count_toward_k(tmp_path, ids):
    """Finite factors whose ‖B‖·‖A‖ overflows would pass the per-reply checks and then be dropped by the rule:
    it must not take one of the round's K places (the round would aggregate one client while a valid reply waited)."""
    table = {ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0, ids[3]: 4.0}
    cfg = tiny(tmp_path / "run", clients_per_round=2, over_select=1.0, client_delay=delays(tmp_path, table),
               norm_bound=None)

    class Overflowing(Watched):
        def train(self, jobs):
            updates = super().train(jobs)
            for u in updates:
                if u.client_id == ids[0]:
                    for key in u.adapter:  # finite float64 factors whose ‖B‖·‖A‖ overflows even in float64
                        u.adapter[key] = torch.full_like(u.adapter[key], 1e200, dtype=torch.float64)
            return updates

    fed = Overflowing(cfg)
    run(cfg, progress=False, federation=fed)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["clients"] == [ids[1], ids[2]] and fed.trained == [ids[0], ids[1], ids[2]]
    assert "is not finite" in {d["client"]: d["reason"] for d in row["dropped"]}[ids[0]]
