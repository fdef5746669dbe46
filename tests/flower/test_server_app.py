"""The ServerApp trusts only what it sent and what the operator set: claims, metrics, resumes, the pool."""

from __future__ import annotations

import json

import pytest

from hetlora.config import RunConfig
from hetlora.server.federation import Federation
from hetlora.flower.server_app import HetLoRAStrategy, serve
from hetlora.server.runner import run

from .loopback import LoopbackGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def tiny(out, **kw):
    base = dict(model="tiny", rounds=1, clients_per_round=2, local_steps=1, batch_size=2, max_length=48, lr=5e-3,
                r_min=2, r_max=6, eval_size=4, min_examples=400, max_clients=3, out=str(out), seed=4, precision="fp32")
    return RunConfig(**(base | kw))


class Untouchable(LoopbackGrid):
    def get_node_ids(self):
        raise AssertionError("the grid was used")

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the grid was used")

    def push_messages(self, messages):
        raise AssertionError("the grid was used")


def test_a_resume_through_the_server_app_refuses_changed_settings(tmp_path):
    out = tmp_path / "run"
    run(tiny(out), progress=False)
    with pytest.raises(ValueError, match=r"differ from the saved run: lr: 0.005 → 0.05"):
        serve(Untouchable(partitions=2), tiny(out, lr=5e-2, rounds=2), resume=True)
    with pytest.raises(ValueError, match=r"--rounds 0 is below"):
        serve(Untouchable(partitions=2), tiny(out, rounds=0), resume=True)


def test_a_second_claim_for_a_held_client_is_refused_and_named(tmp_path):
    """Nodes 101 and 102 both say they hold the client at partition 1: the first keeps it, the second is named."""
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[102].node_config["partition-id"] = 1
    cfg = tiny(tmp_path / "run")
    strategy = HetLoRAStrategy(Federation(cfg))
    strategy.discover(grid)
    held = strategy.fed.client_ids[1]
    assert strategy.node_of == {strategy.fed.client_ids[0]: 100, held: 101}
    assert strategy.refused == [{"node": 102, "client": held, "reason": f"claims client {held}, already held by node 101; "
                                                                         "refused (the first claim keeps it)"}]


def test_identity_comes_from_the_operators_binding_not_the_nodes_claim(tmp_path):
    """node_clients binds node ids (tied to registered keys by the SuperLink) to partitions: node 101 claiming
    partition 2 (another client) and node 102, bound to nothing, are refused; only the bound claim is kept."""
    import dataclasses

    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[101].node_config["partition-id"] = 2  # claims the client bound to no one… or to someone else
    cfg = dataclasses.replace(tiny(tmp_path / "run"), node_clients="100=0,101=1")
    strategy = HetLoRAStrategy(Federation(cfg))
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    assert strategy.node_of == {ids[0]: 100}
    reasons = {r["node"]: r["reason"] for r in strategy.refused}
    assert reasons[101] == f"claims client {ids[2]} but the operator bound it to {ids[1]}; refused"
    assert reasons[102].startswith("is not bound to a client by the operator")
    with pytest.raises(ValueError, match="node_clients 'nonsense': expected NODE=PARTITION"):
        dataclasses.replace(cfg, node_clients="nonsense").validate()


def test_a_node_whose_metrics_contradict_what_it_was_sent_is_dropped(tmp_path):
    """A reply claiming it trained from another rank (which would feed pruning_events) is dropped with the reason."""

    class Lying(LoopbackGrid):
        def deliver(self, message):
            reply = super().deliver(message)
            if "metrics" in reply.content.metric_records and reply.metadata.src_node_id == 100:
                reply.content.metric_records["metrics"]["rank_in"] = 99.0
            return reply

    out = tmp_path / "flower"
    cfg = tiny(out, clients_per_round=3)
    serve(Lying(partitions=3, fresh_process=False), cfg)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(row["dropped"]) == 1 and "reports it trained from rank 99.0, but was sent rank" in row["dropped"][0]["reason"]
    assert len(row["clients"]) == 2 and row["aggregated"]


def test_the_simulation_starts_one_node_per_client_of_the_pool(tmp_path, monkeypatch):
    """client_pool registers N clients drawn by the seed: the simulation needs exactly N SuperNodes."""
    import flwr.simulation

    started = {}

    def fake_simulation(**kwargs):
        started.update(kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_simulation)
    from hetlora.flower.simulation import run_simulation

    with pytest.raises(RuntimeError, match="ended without finishing"):
        run_simulation(tiny(tmp_path / "sim", max_clients=None, client_pool=3, engine="flower"))
    assert started["num_supernodes"] == 3


def test_quiet_silences_flowers_info_lines(tmp_path, monkeypatch):
    import logging

    import flwr.simulation

    levels = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: levels.setdefault("flwr", logging.getLogger("flwr").getEffectiveLevel()))
    monkeypatch.setattr(logging.getLogger("flwr"), "level", logging.INFO)
    from hetlora.flower.simulation import run_simulation

    with pytest.raises(RuntimeError):
        run_simulation(tiny(tmp_path / "sim", engine="flower"), quiet=True)
    assert levels["flwr"] == logging.WARNING


def test_ray_processes_left_by_a_killed_run_are_ended_when_it_starts_again(tmp_path, monkeypatch):
    """A SIGKILLed simulation leaves Ray's processes running; the next start of that run directory ends every
    process whose command line names the run's Ray temp dir, and no other."""
    import subprocess
    import sys

    import flwr.simulation

    from hetlora.flower import simulation
    from hetlora.flower.simulation import _ray_temp_dir, run_simulation

    monkeypatch.setattr(simulation, "MAX_RAY_DIR", 0)  # every --out too deep: Ray's files go to a short sibling under /tmp
    out = tmp_path / "sim"
    ray_dir = _ray_temp_dir(out)
    (ray_dir / "logs").mkdir(parents=True, exist_ok=True)  # a sibling of an earlier session's same path may be there
    sleeper = "import time; time.sleep(60)"
    named = subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={ray_dir}"])
    # Ray renames some processes (ray::DashboardAgent): this one only holds a log file of the run open
    holding = subprocess.Popen([sys.executable, "-c", f"f = open({str(ray_dir / 'logs' / 'agent.out')!r}, 'w'); {sleeper}"])
    bystander = subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={tmp_path / 'other' / '.ray'}"])
    import time

    time.sleep(1.0)  # let the holder open its file
    try:
        monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: None)
        with pytest.raises(RuntimeError):
            run_simulation(tiny(out, engine="flower"))
        assert named.wait(timeout=10) == -9 and holding.wait(timeout=10) == -9 and bystander.poll() is None
        assert not ray_dir.exists()  # the /tmp sibling goes when the simulation returns, failed or not
    finally:
        for p in (named, holding, bystander):
            p.kill()
            p.wait()


def test_a_second_simulation_of_a_directory_is_refused_and_touches_nothing_and_a_ray_dir_inside_the_run_stays(tmp_path, monkeypatch):
    """The sibling's removal and the stale-Ray ending happen under the directory's simulation lock: a second simulation
    of the same --out, while the first holds it, is refused before it ends any process or removes any file (it used to
    be refused only inside its ServerApp, after its Ray had started). A Ray dir inside the run (a short --out) is the
    run's own and is kept."""
    import subprocess
    import sys

    import flwr.simulation

    from hetlora.flower import simulation
    from hetlora.flower.simulation import RAY_LOCK, _ray_temp_dir, run_simulation
    from hetlora.server.runner import run_lock

    monkeypatch.setattr(simulation, "MAX_RAY_DIR", 0)
    out = tmp_path / "sim"
    ray_dir = _ray_temp_dir(out)
    ray_dir.mkdir(parents=True, exist_ok=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--temp-dir={ray_dir}"])
    try:
        monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: None)
        with run_lock(out, RAY_LOCK):  # the first simulation of this directory, still running
            with pytest.raises(ValueError, match="in use by another hetlora run"):
                run_simulation(tiny(out, engine="flower"))
        assert live.poll() is None and ray_dir.is_dir()
    finally:
        live.kill()
        live.wait()
    monkeypatch.setattr(simulation, "MAX_RAY_DIR", 10_000)
    short = tmp_path / "short"
    with pytest.raises(RuntimeError):  # the patched simulation finishes no run
        run_simulation(tiny(short, engine="flower"))
    assert _ray_temp_dir(short) == (short / ".ray").resolve() and _ray_temp_dir(short).is_dir()
    import shutil

    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 1e400, True, "lots"])
def test_a_node_with_a_nonsense_memory_budget_is_left_out_and_named_not_fatal(tmp_path, budget):
    """One SuperNode with ``memory-budget-mb=nan`` used to stop the ServerApp before round 1 (int(nan) while
    fitting ranks): now that node is left out, named, and the federation runs with the others."""
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[101].node_config["memory-budget-mb"] = budget
    strategy = HetLoRAStrategy(Federation(tiny(tmp_path / "run")))
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    assert strategy.node_of == {ids[0]: 100, ids[2]: 102}
    (refused,) = strategy.refused
    assert refused["node"] == 101 and "states memory-budget-mb" in refused["reason"] and "left out" in refused["reason"]


def test_under_dp_a_node_that_states_its_memory_is_left_out_not_fitted(tmp_path):
    """The config refuses memory budgets with DP; a node's own stated budget must not bring them back (its rank
    would be refitted from it, outside the seed-assigned ranks DP runs with): that node is left out and named."""
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[101].node_config["memory-budget-mb"] = 4000.0
    strategy = HetLoRAStrategy(Federation(tiny(tmp_path / "run", dp_clip=1.0, dp_noise=1.0)))
    ranks = dict(strategy.fed.ranks)
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    assert strategy.node_of == {ids[0]: 100, ids[2]: 102} and strategy.fed.ranks == ranks
    (refused,) = strategy.refused
    assert refused["node"] == 101 and "memory budgets and DP together are not supported" in refused["reason"]


def test_when_every_node_is_refused_the_federation_stops_at_discovery_naming_why(tmp_path):
    """A DP run whose every node states its memory: each is left out, and the ServerApp says so before any round
    (it used to go on and fail rounds later for too few clients)."""
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    for node in (100, 101, 102):
        grid.contexts[node].node_config["memory-budget-mb"] = 4000.0
    strategy = HetLoRAStrategy(Federation(tiny(tmp_path / "run", dp_clip=1.0, dp_noise=1.0)))
    with pytest.raises(ValueError, match=r"every node that answered was refused \(3\): memory budgets and DP together"):
        strategy.discover(grid)


def test_a_node_stating_a_budget_no_footprint_was_measured_for_is_left_out_by_name_then_fitted_once_one_is(tmp_path, monkeypatch):
    """A folding method's clients (fedex-lora) have a footprint of their own: where none was measured for the run's
    setting, a node's stated budget used to crash the whole ServerApp in discovery (the fit raised there); the node is
    left out and named instead. With a fit for the setting, the node's rank comes from it (4000 MB at 1000 + 1000/rank: 3)."""
    import json as _json

    from hetlora.device import footprint
    from hetlora.device.footprint import setting_key

    monkeypatch.setattr(footprint, "CALIBRATION", tmp_path / "calibration.json")  # none: no setting was measured
    cfg = tiny(tmp_path / "run", method="fedex-lora")
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[101].node_config["memory-budget-mb"] = 4000.0
    strategy = HetLoRAStrategy(Federation(cfg, device_clients=True))
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    assert strategy.node_of == {ids[0]: 100, ids[2]: 102}
    (refused,) = strategy.refused
    assert refused["node"] == 101 and "no memory footprint calibration for tiny|" in refused["reason"]
    assert "|client=folding" in refused["reason"] and refused["reason"].endswith("the node is left out")
    key = setting_key("tiny", "dense", "fp32", cfg.checkpointing(True), 2, 48, "folding")
    footprint.CALIBRATION.write_text(_json.dumps({"fits": {key: {"fixed_mb": 1000.0, "per_rank_mb": 1000.0}}}))
    strategy = HetLoRAStrategy(Federation(cfg, device_clients=True))
    strategy.discover(grid)
    assert strategy.refused == [] and strategy.fed.ranks[ids[1]] == 3


def test_a_nodes_budget_is_fitted_with_the_footprint_setting_it_runs_not_the_servers(tmp_path, monkeypatch):
    """A device states how it holds its base and the precision it resolved (they need not be the server's: a bf16
    server with fp32 devices found no fit for its own setting). The server builds the setting from them and the run's
    own: node 101 runs bf16, which has a fit (1000 MB + 1000 MB/rank: 4000 MB gives rank 3) though the server's fp32
    has none; node 102 runs fp16, never measured, and is left out naming that setting; node 103 states values that are
    none of the known ones and is left out without them echoed."""
    import json as _json

    from hetlora.device import footprint
    from hetlora.device.footprint import setting_key
    from hetlora.flower import client_app

    cfg = tiny(tmp_path / "run", max_clients=4)
    monkeypatch.setattr(footprint, "CALIBRATION", tmp_path / "calibration.json")
    bf16 = setting_key("tiny", "dense", "bf16", cfg.checkpointing(True), 2, 48)
    footprint.CALIBRATION.write_text(_json.dumps({"fits": {bf16: {"fixed_mb": 1000.0, "per_rank_mb": 1000.0}}}))
    grid = LoopbackGrid(partitions=4, fresh_process=False)
    for node in (101, 102, 103):
        grid.contexts[node].node_config["memory-budget-mb"] = 4000.0
    stated = iter([{"base-weights": "dense", "precision": "bf16"}, {"base-weights": "dense", "precision": "fp16"},
                   {"base-weights": "dense\nEVIL" * 1000, "precision": "fp32"}])  # the budget-stating nodes answer in node order
    monkeypatch.setattr(client_app, "footprint_statement", lambda host: next(stated))
    strategy = HetLoRAStrategy(Federation(cfg, device_clients=True))
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    reasons = {r["node"]: r["reason"] for r in strategy.refused}
    assert set(reasons) == {102, 103} and f"no memory footprint calibration for {bf16.replace('bf16', 'fp16')}" in reasons[102]
    assert "not one of dense/gguf and fp32/bf16/fp16" in reasons[103] and "EVIL" not in reasons[103]
    assert strategy.node_of == {ids[0]: 100, ids[1]: 101} and strategy.fed.ranks[ids[1]] == 3


def test_a_node_cannot_bring_back_a_budget_its_runs_method_has_no_footprint_for(tmp_path):
    """fft's clients train every weight: no LoRA footprint predicts them, so the config refuses budgets for it, and a
    node's own stated budget is not fitted either: that node is left out and named, the others keep their ranks."""
    grid = LoopbackGrid(partitions=3, fresh_process=False)
    grid.contexts[100].node_config["memory-budget-mb"] = 4000.0
    strategy = HetLoRAStrategy(Federation(tiny(tmp_path / "run", method="fft", lr=1e-4)))
    strategy.discover(grid)
    ids = strategy.fed.client_ids
    assert strategy.node_of == {ids[1]: 101, ids[2]: 102}
    (refused,) = strategy.refused
    assert refused["node"] == 100 and "fft's clients' memory footprint was never calibrated" in refused["reason"]


def test_replies_are_taken_as_they_arrive_and_a_silent_node_costs_only_the_deadline():
    """The ServerApp pushes a round's messages, keeps none of them, and takes each reply as a pull brings it; a node
    that never answers leaves the round when the deadline passes, the others' replies already taken."""
    import time

    from flwr.app import Message, RecordDict

    from hetlora.flower.server_app import arriving

    class Echo(LoopbackGrid):
        def deliver(self, message):
            return Message(RecordDict(), reply_to=message)

    grid = Echo(partitions=3, fresh_process=False)
    grid.silent = {101}
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (100, 101, 102)]
    start = time.monotonic()
    replies = arriving(grid, messages, timeout=0.5)
    first = next(replies)
    assert messages == [] and first.metadata.src_node_id == 100  # pushed and let go; the first reply before the rest
    rest = list(replies)
    assert [r.metadata.src_node_id for r in rest] == [102]
    assert 0.5 <= time.monotonic() - start < 3


def test_the_serverapp_pushes_each_train_message_as_it_is_made_and_holds_no_other():
    """A round's train messages carry each client's own copy of the truncated global adapter: K of them held together
    were the ServerApp's peak (8.6 GB at K = 256, benchmarks/server_scale.py --engines serverapp). Each is pushed as it
    is made; when the grid takes one, no other made message is alive outside the grid."""
    import gc
    import weakref

    from flwr.app import Message, RecordDict

    from hetlora.flower.server_app import arriving

    alive: weakref.WeakSet = weakref.WeakSet()
    held_at_push: list[int] = []

    class Counting(LoopbackGrid):
        def deliver(self, message):
            return Message(RecordDict(), reply_to=message)

        def push_messages(self, messages):
            messages = list(messages)
            gc.collect()
            held_at_push.append(len([m for m in alive if all(m is not kept for kept in self._pushed.values())]))
            return super().push_messages(messages)

    def made():
        for node in (100, 101, 102, 103):
            message = Message(RecordDict(), dst_node_id=node, message_type="train")
            alive.add(message)
            yield message

    replies = list(arriving(Counting(partitions=4, fresh_process=False), made(), timeout=5.0))
    assert sorted(r.metadata.src_node_id for r in replies) == [100, 101, 102, 103]
    assert held_at_push == [1, 1, 1, 1]  # the one being pushed, nothing else


def test_the_strategy_makes_each_clients_payload_when_it_sends_it_and_keeps_none(tmp_path, monkeypatch):
    """Opening a round counts its download from jobs made and let go; each train message's job is made as the message
    is, and no client's payload is alive once its message is made (before: every asked client's job was made when the
    round opened and held until sent)."""
    import gc
    import weakref

    strategy = HetLoRAStrategy(Federation(tiny(tmp_path / "run", clients_per_round=3)))
    strategy.discover(LoopbackGrid(partitions=3, fresh_process=False))
    alive: weakref.WeakSet = weakref.WeakSet()
    made = strategy.fed.job

    def job(cid, t):
        j = made(cid, t)
        alive.update(j.payload.values())
        return j

    monkeypatch.setattr(strategy.fed, "job", job)
    opening = strategy.open_round(0)
    gc.collect()
    assert len(opening.order) == 3 and strategy.bytes_down > 0 and len(alive) == 0
    messages = strategy.outgoing(opening.order)
    for _ in opening.order:
        message = next(messages)
        gc.collect()
        assert len(alive) == 0 and message.content.array_records["adapter"]  # the payload went into the message
        del message


def test_a_silent_node_leaves_the_round_at_its_deadline_and_the_others_are_aggregated(tmp_path):
    """Deployed (no delay model): node 101 never answers; the round closes --round-timeout seconds after it opened,
    with the other two replies aggregated and the silent client named."""
    import time

    class SilentInRounds(LoopbackGrid):  # node 101 joins (answers the query) but never answers a round
        """The other nodes train as their messages are pushed (as SuperNodes do, while the server waits), so the
        deadline measures the wait for the silent node, not this machine's training speed (a cold or busy machine
        took more than the 0.5 s to train the first client when training ran inside the pulls)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ready: dict = {}  # message id -> the reply its node computed at push

        def send_and_receive(self, messages, *, timeout=None):
            return [self.deliver(message) for message in messages]

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for message_id in ids:
                message = self._pushed.pop(message_id)
                if message.metadata.dst_node_id not in self.silent:
                    self.ready[message_id] = self.deliver(message)
            return ids

        def pull_messages(self, message_ids):
            taken = [i for i in self.ready if i in set(message_ids)][:1]
            return [self.ready.pop(i) for i in taken]

    grid = SilentInRounds(partitions=3, fresh_process=False)
    grid.silent = {101}
    cfg = tiny(tmp_path / "run", clients_per_round=3, round_timeout=0.5)
    start = time.monotonic()
    serve(grid, cfg)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert time.monotonic() - start < 60 and row["aggregated"] and len(row["clients"]) == 2
    (dropped,) = row["dropped"]
    assert dropped == {"client": strategy_client(grid, cfg, 101), "reason": "no reply by the round deadline (0.5 s)"}
    assert row["closed_by"] == "deadline"


def strategy_client(grid, cfg, node):
    """The client id the node at ``node`` holds (its partition of the federation's sorted ids)."""
    return Federation(cfg).client_ids[grid.contexts[node].node_config["partition-id"]]


def test_over_selection_on_a_deployment_takes_the_first_k_valid_replies_in_arrival_order(tmp_path):
    """No delay model: all ⌈K(1+F)⌉ = 3 asked at once, replies taken as they arrive (the loopback hands them over in
    push order) until K = 2 valid are in; the third client's message is never even delivered, and it is named."""
    class Counting(LoopbackGrid):
        delivered: list[int] = []

        def deliver(self, message):
            self.delivered.append(message.metadata.dst_node_id)
            return super().deliver(message)

    grid = Counting(partitions=3, fresh_process=False)
    serve(grid, tiny(tmp_path / "run", clients_per_round=2, over_select=0.5))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["asked"] == 3 and len(row["clients"]) == 2 and row["closed_by"] == "enough valid replies"
    assert [d["reason"] for d in row["dropped"]] == ["over-selected: the round closed with its 2 valid replies before this one was taken"]
    assert grid.delivered.count(100) + grid.delivered.count(101) + grid.delivered.count(102) == 3 + 2  # 3 queries, 2 trains


def test_under_a_delay_model_the_simulated_clock_closes_rounds_not_the_simulations_compute_time(tmp_path):
    """Every simulated reply time is 0.1 s, inside the 0.5 s deadline, but each reply takes 0.3 s of real compute:
    the round (and the discovery before it) must take every reply, as the in-process engine does. (A 1000-client
    Flower simulation once asked no client at all: its 3 s deadline had cut the discovery.)"""
    import time

    class Slow(LoopbackGrid):
        def deliver(self, message):
            time.sleep(0.3)
            return super().deliver(message)

    serve(Slow(partitions=3, fresh_process=False), tiny(tmp_path / "run", clients_per_round=3, round_timeout=0.5,
                                                         client_delay="fixed:0.1"))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert len(row["clients"]) == 3 and row["dropped"] == [] and row["closed_by"] == "all replies"


def test_a_node_whose_clientapp_fails_is_named_once_by_its_client(tmp_path):
    """A ClientApp that raises becomes an error reply: the round names the client its node holds, once (it replied,
    so it is not also named as missing the deadline), and aggregates the others."""
    class Failing(LoopbackGrid):
        def deliver(self, message):
            if message.metadata.message_type == "train" and message.metadata.dst_node_id == 101:
                from flwr.app import Error
                from flwr.common.constant import ErrorCode

                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=message)
            return super().deliver(message)

    from flwr.app import Message

    grid = Failing(partitions=3, fresh_process=False)
    cfg = tiny(tmp_path / "run", clients_per_round=3, round_timeout=30.0)
    serve(grid, cfg)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["dropped"] == [{"client": strategy_client(grid, cfg, 101), "reason": "node error: boom"}]
    assert len(row["clients"]) == 2 and row["closed_by"] == "all replies"
