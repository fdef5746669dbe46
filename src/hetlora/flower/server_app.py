"""The ServerApp: HetLoRA's server over Flower's Grid, with the in-process runner's outputs.

:class:`HetLoRAStrategy` is a Flower ``Strategy``: ``configure_train`` sends every
sampled node its *own* truncated ``ArrayRecord`` (one ``Message`` per node), and
``aggregate_train`` turns the replies into :class:`ClientUpdate` s and completes the
round through :class:`Federation` (validation, dropping bad clients, ``hetlora.aggregate``).
Server-side evaluation, metrics.jsonl, checkpoints and the final adapter come from
:func:`hetlora.server.runner.run`, exactly as for the in-process engine.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from ..config import RunConfig, node_partitions
from ..core.adapter import ClientUpdate
from ..server.federation import Federation
from ..server.runner import Progress, check_resumable, run
from ..core.secure_sum import auto_clip, min_holders
from ..core.ranks import budget_problem
from ..device.footprint import calibration_problem, stated_setting
from ..methods import get_method
from .common import config_from_run_config, encode_config, from_array_record, to_array_record

from .secure_round import contribution_bytes, reports_as_updates, secure_round, sums_to_tensors

log = logging.getLogger(__name__)
app = ServerApp()
DEFAULT_TIMEOUT = 3600.0  # a round's deadline without --round-timeout (s)
PULL_SECONDS = 0.1  # between pulls while replies are pending (Flower's own grids pull every 0.1 s)


def stated_by(identity) -> tuple[object, object] | None:
    """The (base weights, precision) a node said it runs (hetlora.flower.client_app.footprint_statement), if it did."""
    return (identity["base-weights"], identity["precision"]) if "base-weights" in identity and "precision" in identity else None


class HetLoRAStrategy(Strategy):
    """Per-node truncated payloads out, heterogeneous-rank aggregation in."""

    def __init__(self, federation: Federation, timeout: float | None = None):
        self.fed = federation
        # the real deadline; under a simulated delay model the simulated clock closes rounds (§7.3), and the real
        # one is only the default's safety net: a simulation's compute time is not the clients' reply time
        real = federation.cfg.round_timeout if federation.delays is None else None
        self.timeout = timeout or real or DEFAULT_TIMEOUT
        self.node_of: dict[str, int] = {}  # client id -> node id
        self.examples_of: dict[str, int] = {}  # client id -> examples it reported when it joined
        self.refused: list[dict[str, Any]] = []  # claims refused at discovery (node, client, reason)
        self.sent: dict[str, int] = {}  # client id -> the rank sent to it this round
        self.opening = None  # this round's RoundOpening (who is asked, how the round closes)
        self.last_row: dict[str, Any] = {}
        self.bytes_down = 0
        # the fixed bound every secure client applies (mandatory; public): the config's, else from the initial global
        self.secure_clip = (federation.cfg.secure_clip or auto_clip(federation.state["global"])
                            if federation.cfg.secure_aggregation else None)
        if federation.cfg.secure_aggregation:
            k = federation.cfg.clients_per_round
            m = min_holders(federation.cfg.secure_min_clients, k)
            if k < m + 1:
                log.warning("secure aggregation with %d clients per round and every component held by %d: one client that "
                            "drops out (or is out of range) loses the whole round; %d clients per round survive one", k, m, m + 1)

    # -- identity: which node holds which client (stable across rounds) -------------------
    def discover(self, grid: Grid) -> None:
        """Ask every node which client it holds; the server only sees opaque node ids.

        A claim is accepted only for a client of this federation that no other node holds: a
        second claim for a held client is refused (the first node keeps it) and named, as is a
        claim for a client the federation does not have.
        """
        config = ConfigRecord({"hetlora-config": encode_config(self.fed.cfg)})
        nodes = list(grid.get_node_ids())
        messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query") for n in nodes]
        registered = set(self.fed.client_ids)
        budgets: dict[str, float] = {}
        settings: dict[str, str] = {}  # the footprint setting each budget-stating node runs (its base, its precision)
        for reply in sorted(grid.send_and_receive(messages, timeout=self.timeout), key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not identify itself: %s", node, reply.error.reason)
                continue
            identity = reply.content.config_records["identity"]
            cid = str(identity["client-id"])
            problem = self.claim_problem(cid, node, registered) or self.budget_problem(identity)
            if problem:
                self.refused.append({"node": node, "client": cid, "reason": problem})
                self.fed.refused_claims.append({"node": int(node), "client": cid, "reason": problem})
                log.warning("node %s: %s", node, problem)
                continue
            self.node_of[cid] = node
            self.examples_of[cid] = int(identity["num-examples"])
            if "memory-budget-mb" in identity:
                budgets[cid] = float(identity["memory-budget-mb"])
                if stated_by(identity):  # checked by budget_problem above
                    settings[cid] = stated_setting(self.fed.cfg, *stated_by(identity))
        if budgets:  # nodes stated their memory: their ranks come from it (others keep the run's budget, if any)
            default = self.fed.cfg.memory_budget_mb
            held = [c for c in self.fed.client_ids if c in budgets or default is not None]
            self.fed.fit_ranks_to_memory({c: budgets.get(c, default) for c in held}, settings)
            for cid, why in self.fed.left_out.items():
                log.warning("client %s (node %s) left out: %s", cid, self.node_of.get(cid), why)
        if self.refused and not self.node_of:  # nothing can run: say why now, not rounds later as "too few clients"
            reasons = sorted({r["reason"] for r in self.refused})
            raise ValueError(f"every node that answered was refused ({len(self.refused)}): " + "; ".join(reasons))
        missing = [c for c in self.fed.client_ids if c not in self.node_of]
        if missing:
            log.warning("%d of %d clients have no node and will not be sampled", len(missing), len(self.fed.client_ids))

    def budget_problem(self, identity) -> str | None:
        """Why a node's stated memory budget leaves it out (None: no budget, or a valid one): one node's
        ``memory-budget-mb=nan`` must not stop the federation, so it is named and left out instead. A budget the run's
        config would refuse leaves its node out too, named: under DP (ranks are seed-assigned there, and one might not
        fit the device that said what it can hold), for a method whose rank does not set its clients' memory (fft), and
        where no footprint was measured for the run's setting (hetlora.device.footprint.calibration_problem)."""
        if "memory-budget-mb" not in identity:
            return None
        cfg = self.fed.cfg
        if cfg.dp_clip is not None:
            return "memory budgets and DP together are not supported: a node that states its memory is left out under DP"
        if not get_method(cfg.method).footprint_calibrated:
            return (f"states memory-budget-mb, but {cfg.method}'s clients' memory footprint was never calibrated (no rank "
                    "can be fitted to it); the node is left out")
        missing = calibration_problem(cfg, self.fed.host.precision, self.fed.device_clients, stated_by(identity))
        if missing:
            return f"states memory-budget-mb, but {missing}; the node is left out"
        problem = budget_problem(identity["memory-budget-mb"])
        return f"states memory-budget-mb {problem}; the node is left out" if problem else None

    def bound_client(self, node: int) -> str | None:
        """The client the operator bound to ``node`` (``node_clients``: node id → partition id), if any."""
        pid = node_partitions(self.fed.cfg.node_clients).get(int(node))
        ids = self.fed.host.client_ids
        return ids[pid] if pid is not None and 0 <= pid < len(ids) else None

    def claim_problem(self, cid: str, node: int, registered: set[str]) -> str | None:
        """Why node ``node``'s claim to hold ``cid`` is refused (None: accepted).

        With ``node_clients`` set, identity comes from the operator, not the node: a SuperLink with
        SuperNode authentication ties each node id to the key registered for it, and the operator
        binds node ids to clients; a node's own claim must agree, and an unbound node is refused.
        """
        if self.fed.cfg.node_clients:
            bound = self.bound_client(node)
            if bound is None:
                return f"is not bound to a client by the operator (node_clients); its claim to {cid} is refused"
            if bound != cid:
                return f"claims client {cid} but the operator bound it to {bound}; refused"
        if cid not in registered:
            return f"claims client {cid}, which is not a client of this federation; refused"
        if cid in self.node_of and self.node_of[cid] != node:
            return f"claims client {cid}, already held by node {self.node_of[cid]}; refused (the first claim keeps it)"
        return None

    # -- Strategy API ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Open the round (docs/algorithm.md §7.3) and return a message for every client it asks."""
        return self.messages(self.open_round(server_round - 1).order)

    def open_round(self, t: int):
        """The round's opening among the clients a node holds; what every asked client is sent is accounted here
        (its rank, its download), whether or not its message is ever pushed."""
        self.opening = self.fed.open_round(t, reachable=self.node_of)
        if self.fed.delays is None:  # the real clock closes the round: its deadline is the one named
            self.opening.deadline = self.timeout
        self.sent = {cid: self.fed.ranks[cid] for cid in self.opening.asked}
        self.bytes_down = self.fed.round_download(self.opening)  # counted here; each job made again as it is sent
        return self.opening

    def messages(self, clients: Iterable[str]) -> list[Message]:
        """One train message per client (:meth:`message`), all of them: what a secure round hands its protocol."""
        return list(self.outgoing(clients))

    def outgoing(self, clients: Iterable[str]) -> Iterator[Message]:
        """The clients' train messages, each made (its job too) when it is asked for and let go once taken: pushed one
        at a time (:func:`arriving`), so the server never holds the round's payloads together (K copies of the
        truncated global adapter, and of a folding method's base delta)."""
        run_config = ConfigRecord({"hetlora-config": encode_config(self.fed.cfg)})
        for cid in clients:
            message = self.message(cid, run_config)
            yield message
            del message

    def message(self, cid: str, run_config: ConfigRecord) -> Message:
        """One client's train message: its own truncated adapter (and base delta), its task and the run's config."""
        t = self.opening.round_index
        job = self.fed.job(cid, t)
        records = {
            "adapter": to_array_record(job.payload),
            "task": ConfigRecord({"client-id": cid, "rank": job.rank, "round": t, "base-version": job.base_version}),
            "config": run_config,
        }
        if job.base:
            records["base"] = to_array_record(job.base)
        return Message(RecordDict(records), dst_node_id=self.node_of[cid], message_type="train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Complete the round from its replies. A weighted-sum method takes them as they arrive (``replies`` may be
        a stream: :func:`arriving`), one decoded update at a time (docs/algorithm.md §7.2); the others gather them
        (hetlora.server.aggregation puts them in client order). Under
        over-selection the replies are taken until K valid ones are in (§7.3)."""
        t = server_round - 1
        failed: list[tuple[str, str]] = self.opening.late_failures()
        updates = self.decoded(replies, failed, t)
        self.last_row = self.fed.complete_round(t, updates, failed, self.opening) | {"bytes_down": self.bytes_down}
        summary = MetricRecord({"clients": float(len(self.last_row["clients"])), "dropped": float(len(self.last_row["dropped"]))})
        return to_array_record(self.fed.state["global"]), summary

    def replies(self, grid: Grid) -> Iterator[Message]:
        """The round's replies as they arrive, until its deadline. With a simulated delay model the clients are asked
        in waves in order of their simulated reply time, each wave as many as the round can still take, so a
        simulation takes the same replies as the in-process engine; otherwise every asked client at once."""
        opening, close = self.opening, self.opening.close
        deadline = time.monotonic() + self.timeout
        if self.fed.delays is None:
            yield from arriving(grid, self.outgoing(opening.order), self.timeout)
            return
        queue = list(opening.order)
        while queue and not close.full and time.monotonic() < deadline:
            n = close.missing or len(queue)
            wave, queue = queue[:n], queue[n:]
            yield from arriving(grid, self.outgoing(wave), until=deadline)

    def decoded(self, replies: Iterable[Message], failed: list[tuple[str, str]], t: int) -> Iterator[ClientUpdate]:
        """Each reply as a :class:`ClientUpdate`, decoded when it is asked for; a failed or refused reply goes to ``failed``."""
        client_of = {node: cid for cid, node in self.node_of.items()}
        for reply in replies:
            if reply.has_error():  # named by the client its node holds (the node id if it holds none)
                node = reply.metadata.src_node_id
                failed.append((client_of.get(node, str(node)), f"node error: {reply.error.reason}"))
                continue
            result = reply.content.config_records["result"]
            cid = str(result["client-id"])
            if "error" in result:
                failed.append((cid, f"client failed: {str(result['error']).strip().splitlines()[-1]}"))
                continue
            metrics = dict(reply.content.metric_records.get("metrics", {}))
            problem = self.reply_problem(cid, reply.metadata.src_node_id, result, metrics, t)
            if problem:
                failed.append((cid, problem))
                continue
            update = ClientUpdate(from_array_record(reply.content.array_records["adapter"]), result["num-examples"], client_id=cid,
                                  rank=int(result["rank"]) or None, round=int(result["round"]), metrics=metrics)
            del reply, result  # the message's arrays go with it; the server holds the decoded update alone
            yield update

    def reply_problem(self, cid: str, node: int, result, metrics: dict[str, Any], t: int) -> str | None:
        """Why a client's reply is not accepted: from a node that does not hold it, or an account that
        contradicts what it reported when it joined or what it was sent (None: accepted)."""
        if self.node_of.get(cid) != node:
            return f"reply from node {node}, which does not hold this client"
        if result["num-examples"] != self.examples_of.get(cid):
            return f"reports {result['num-examples']!r} examples, but {self.examples_of.get(cid)} when it joined"
        return self.metrics_problem(cid, metrics, int(result["round"]), t)

    def complete_secure(self, t: int, collector, plan, seconds: float) -> dict[str, Any]:
        """Close a SecAgg+ round from the unmasked sum and the clients' reports (docs/algorithm.md §6.1).

        A report that contradicts what was sent (another node's client, a wrong round, a rank above the
        one sent) cannot be taken out of a sum: the whole round's aggregate is refused and named, as is a
        sum beyond what the clipped clients can sum to, or one that dropouts left uncovered (not unmasked)."""
        received = sorted(collector.reports, key=lambda r: str(r[1]["client-id"]))  # order independent of arrival
        reports = reports_as_updates(received)
        problems = [(u.client_id, p) for (node, raw), u in zip(received, reports) if (p := self.report_problem(node, raw, u, t))]
        reported = {u.client_id for u in reports}
        failed = [(c, "dropped out of the secure round (no masked vector in the sum)") for c in sorted(self.sent) if c not in reported]
        for failure in collector.failures:
            log.warning("secure round %d: %s", t + 1, failure)
        aggregate, shapes = None, plan.shapes(self.fed.state["global"])
        if plan.halted:
            failed.append(("(sum)", plan.halted))
        elif problems:
            failed += [(c, f"{p}; its contribution cannot be removed from the sum, so this round's aggregate is refused")
                       for c, p in problems]
        elif collector.sums is not None:
            try:
                examples = sum(self.examples_of[u.client_id] for u in reports)
                sums = sums_to_tensors(collector.sums, shapes)
                aggregate, refused = plan.aggregate(sums, self.fed.state["global"], len(reports), examples)
                if refused:
                    failed.append(("(sum)", refused))
            except ValueError as err:
                failed.append(("(sum)", str(err)))
        upload = contribution_bytes(shapes) * len(reports)
        row = self.fed.complete_secure_round(t, aggregate, reports if aggregate is not None else [], failed, upload)
        self.last_row = row | {"bytes_down": self.bytes_down, "secure_seconds": seconds, "secure_rank": plan.cover,
                               "secure_min_clients": plan.min_clients, "secure_clip": plan.clip}
        return self.last_row

    def report_problem(self, node: int, raw, update: ClientUpdate, t: int) -> str | None:
        """Why a secure report is not accepted (None: it is): :meth:`reply_problem`, or a rank above the one sent."""
        problem = self.reply_problem(update.client_id, node, raw, update.metrics, t)
        if problem is None and update.rank is not None and not 1 <= update.rank <= self.sent[update.client_id]:
            problem = f"reports rank {update.rank} after pruning, but was sent rank {self.sent[update.client_id]}"
        return problem

    def metrics_problem(self, cid: str, metrics: dict[str, Any], reply_round: int, t: int) -> str | None:
        """A reply whose own account contradicts what the server sent it (never trusted for ranks or pruning)."""
        if cid not in self.sent:
            return "replied without being sent a task this round"
        if reply_round != t:
            return f"reply is for round {reply_round}, not round {t}"
        rank_in = metrics.get("rank_in")
        if rank_in is not None and int(rank_in) != self.sent[cid]:
            return f"reports it trained from rank {rank_in}, but was sent rank {self.sent[cid]}"
        if any(not math.isfinite(float(v)) for v in metrics.values() if isinstance(v, (int, float))):
            return "reports metrics that are not finite"
        return None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # evaluation is centralised on the held-out set

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("HetLoRAStrategy: method %s, %d clients", self.fed.cfg.method, len(self.fed.client_ids))

    # -- one round, as the runner's round function ------------------------------------------
    def round_fn(self, grid: Grid):
        def flower_round(fed: Federation, t: int, progress: Progress, hook=None) -> dict[str, Any]:
            opening = self.open_round(t)
            progress.round_started(t, len(opening.asked))
            if self.fed.cfg.secure_aggregation:
                return secure_round(self, grid, t, self.messages(opening.order))
            self.aggregate_train(t + 1, self.replies(grid))
            return self.last_row

        return flower_round


def arriving(grid: Grid, messages: Iterable[Message], timeout: float | None = None, *, until: float | None = None) -> Iterator[Message]:
    """The replies to ``messages`` as they arrive, until every one is in or ``timeout`` seconds have passed since they
    were pushed (or the monotonic clock reaches ``until``, a round's own deadline): Flower's push, then pulls in a loop
    (what ``send_and_receive`` does, without gathering the replies). Each message is pushed on its own and let go (a
    list is emptied as it goes): the server never holds the round's payloads together."""
    if (timeout is None) == (until is None):
        raise ValueError("arriving needs a timeout or a deadline (until), one of them")
    pending = _push_each(grid, messages)
    deadline = until if until is not None else time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        if not pulled:  # nothing in yet: wait before asking again (a pull that brought replies is followed at once)
            time.sleep(PULL_SECONDS)
            continue
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        while pulled:
            yield pulled.pop(0)


def _push_each(grid: Grid, messages: Iterable[Message]) -> set[str]:
    """Push every message on its own, as it comes (a list is popped from the front); the ids to pull replies for.
    Nothing here outlives its push: the server holds one outgoing payload at a time."""
    pending: set[str] = set()
    source = (messages.pop(0) for _ in range(len(messages))) if isinstance(messages, list) else iter(messages)
    for message in source:
        pending.update(i for i in grid.push_messages([message]) if i)
        del message  # not kept while the next one is made
    return pending


def serve(grid: Grid, cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run the experiment over ``grid`` and write the usual ``--out`` contract (a resume with changed
    settings is refused before any model loads or any node is asked)."""
    if resume:
        check_resumable(cfg)
    fed = Federation(cfg, device_clients=True)
    strategy = HetLoRAStrategy(fed)
    strategy.discover(grid)
    return run(cfg, resume=resume, progress=False, federation=fed, round_fn=strategy.round_fn(grid))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    resume = bool(context.run_config.get("resume", False))
    serve(grid, cfg, resume=resume)
