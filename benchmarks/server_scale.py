"""Server memory and time against the clients per round (issue #43): the server path alone.

Clients are replaced by ready updates that arrive one at a time (a seeded generator: SmolLM2-135M-shaped,
30 layers × 7 modules, ranks uniform in [5, 50], r_max 50; fedavg's clients all at rank 27), fed to the
one aggregation path both engines take (:func:`hetlora.server.aggregation.aggregate_replies`). Each row is
a fresh process: ``peak_rss_mb`` is that process's peak, ``baseline_mb`` its resident memory before the
round (imports and the global adapter). ``seconds`` is the server's time only (making the updates is not
counted). ``path``: ``stream`` (a weighted-sum method folds each reply in; a module-wise one spills each reply and
aggregates a module at a time; others aggregate a list) or ``list`` (every method holds the round's replies: the
reference, and the server before #43). ``plain``
rows: hetlora's weighted padded sum as a bare fp32 loop over the same updates (the time goal's yardstick). ``dp-fedavg``:
hetlora wrapped in DP-FedAvg (its list row at K = 256 holds ~8.7 GB, under the rows' 21 GB limit).

    python benchmarks/server_scale.py [--clients 4 16 64 256] [--methods ...] [--engines in-process serverapp] [--bound 1.5] [--repeats N] [--json FILE]

``--engines serverapp``: the same round through the Flower ServerApp's own path (:func:`serverapp_round`): each client's
train message pushed, the replies pulled one at a time as Flower ``Message`` s and decoded by the strategy, then the same
aggregation; a streamed method only (the ServerApp takes every method's replies one at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from aggregation import MODULES, make_adapter  # SmolLM2's module shapes and a seeded adapter of them (this directory)

METHODS = ["hetlora", "hetlora-naive", "fedavg", "fedex-lora", "recon-svd", "flexlora", "flora", "florist", "rb-lora", "fslora",
           "dp-fedavg"]
DP_CLIP, DP_NOISE = 1.0, 1.0  # "dp-fedavg": user-level DP-FedAvg wrapping hetlora (--dp-clip 1 --noise-multiplier 1)


def method_of(name: str, clients: int):
    """The aggregation method a row measures: a registered one, or ``dp-fedavg`` (hetlora wrapped in DP-FedAvg,
    its expected clients the round's K)."""
    from hetlora.methods import get_method

    if name == "dp-fedavg":
        from hetlora.methods.dp import DPFedAvg

        return DPFedAvg(get_method("hetlora"), DP_CLIP, DP_NOISE, clients)
    return get_method(name)
R_MIN, R_MAX, FEDAVG_RANK = 5, 50, 27
FLORA_MAX_CLIENTS = 64  # FLoRA's aggregate stacks every client: rank Σ r_k, ~8.5 GB at 256 clients (stated, not run)


def client_ranks(clients: int, method: str, seed: int) -> list[int]:
    import random

    if method == "fedavg":
        return [FEDAVG_RANK] * clients
    rng = random.Random(f"server-scale:{seed}")
    return [rng.randint(R_MIN, R_MAX) for _ in range(clients)]


class Replies:
    """The round's replies, made one at a time as the server asks for the next; the time spent making them is
    kept apart (``making``) so the server's own time can be told."""

    def __init__(self, ranks: list[int], layers: int, round_index: int = 0):
        self.ranks, self.layers, self.round_index, self.making = ranks, layers, round_index, 0.0

    def __iter__(self):
        from hetlora.core.adapter import ClientUpdate

        for k, rank in enumerate(self.ranks):
            t0 = time.perf_counter()
            update = ClientUpdate(make_adapter(rank, 1000 + k, self.layers), 20 + k % 7, f"c{k:04d}", rank=rank, round=self.round_index)
            self.making += time.perf_counter() - t0
            yield update


class ReplyGrid:
    """A Flower Grid whose nodes answer at once with ready updates: each pull hands back one reply ``Message``, made at
    the pull (as a ClientApp would send it: the adapter as an ArrayRecord, the result and metrics records), so the
    ServerApp's own path is measured, message decoding included, without a transport. The pushed train messages are
    let go as a SuperLink would (it, not the ServerApp, holds them)."""

    def __init__(self, ranks: list[int], layers: int, node_of: dict[str, int]):
        self.ranks, self.layers, self.making = ranks, layers, 0.0
        self.client_of = {node: cid for cid, node in node_of.items()}
        self._pushed: dict[str, tuple[int, "object"]] = {}

    def push_messages(self, messages):
        from uuid import uuid4

        from flwr.app import RecordDict

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            message.content = RecordDict()  # the payload is the SuperLink's to hold now; the envelope is kept to reply to
            self._pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        wanted = set(message_ids)
        for message_id in [i for i in self._pushed if i in wanted]:
            sent = self._pushed.pop(message_id)
            t0 = time.perf_counter()
            cid = self.client_of[sent.metadata.dst_node_id]
            k = int(cid[1:])
            adapter = make_adapter(self.ranks[k], 1000 + k, self.layers)
            reply = Message(RecordDict({"adapter": ArrayRecord(adapter), "metrics": MetricRecord({"rank_in": float(self.ranks[k])}),
                                        "result": ConfigRecord({"client-id": cid, "num-examples": 20 + k % 7, "rank": self.ranks[k],
                                                                "round": 0})}), reply_to=sent)
            del adapter, sent
            self.making += time.perf_counter() - t0
            return [reply]
        return []


def serverapp_round(spec: dict, ranks: list[int], ctx, previous: dict) -> tuple:
    """One round through the ServerApp's own path: its train messages made and pushed one at a time by the strategy
    (:meth:`HetLoRAStrategy.outgoing`, each client's job made as its message is: here the LoRA kind's job, the
    truncated global adapter), the replies pulled one at a time (:func:`hetlora.flower.server_app.arriving`), decoded
    by the strategy (:meth:`HetLoRAStrategy.decoded`, the reply checks included) and fed to the aggregation path both
    engines take. What is not the ServerApp's is a stand-in: the Federation (its config, its jobs, no model) and the
    grid (:class:`ReplyGrid`)."""
    from types import SimpleNamespace

    from hetlora.clients import Job
    from hetlora.config import RunConfig
    from hetlora.core.adapter import num_bytes, truncate_adapter
    from hetlora.flower.server_app import HetLoRAStrategy, arriving
    from hetlora.server.aggregation import aggregate_replies

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what Flower sets in a ServerApp's process
    clients = [f"c{k:04d}" for k in range(len(ranks))]
    rank_of = dict(zip(clients, ranks))
    fed = SimpleNamespace(cfg=RunConfig(model="tiny", round_timeout=None), delays=None, state={"global": previous},
                          job=lambda cid, t: Job(cid, rank_of[cid], t, truncate_adapter(previous, rank_of[cid]), {}, 0))
    strategy = HetLoRAStrategy(fed)
    strategy.node_of = {cid: 1000 + k for k, cid in enumerate(clients)}
    strategy.examples_of = {cid: 20 + k % 7 for k, cid in enumerate(clients)}
    strategy.sent = dict(rank_of)
    strategy.opening = SimpleNamespace(round_index=0)
    grid = ReplyGrid(ranks, spec["layers"], strategy.node_of)
    failed: list = []
    updates = strategy.decoded(arriving(grid, strategy.outgoing(clients), timeout=3600.0), failed, 0)
    done = aggregate_replies(method_of(spec["method"], len(ranks)), ctx, updates, assigned_ranks=ctx.ranks, exact_rank=False,
                             min_clients=1, upload_bytes=lambda u: num_bytes(u.adapter), stream=True)
    assert done.new is not None and not failed, (done.dropped, failed)
    return done, grid.making


def plain_loop(replies: Replies, r_max: int) -> dict:
    """HetLoRA's arithmetic as one bare fp32 loop: ‖ΔW_k‖ by the trace trick, w_k pad(x_k) added, divided by Σ w_k."""
    import torch

    from hetlora.core.adapter import A_SUFFIX, B_SUFFIX

    sums: dict = {}
    total = 0.0
    for u in replies:
        keys = [k[: -len(A_SUFFIX)] for k in u.adapter if k.endswith(A_SUFFIX)]
        sq = sum(float(((u.adapter[m + B_SUFFIX].T @ u.adapter[m + B_SUFFIX]) * (u.adapter[m + A_SUFFIX] @ u.adapter[m + A_SUFFIX].T)).sum())
                 for m in keys)
        w = sq ** 0.5
        total += w
        for key, value in u.adapter.items():
            if key not in sums:
                shape = list(value.shape)
                shape[0 if key.endswith(A_SUFFIX) else 1] = r_max
                sums[key] = torch.zeros(shape)
            target = sums[key][: value.shape[0]] if key.endswith(A_SUFFIX) else sums[key][:, : value.shape[1]]
            target.add_(value, alpha=w)
    return {k: v / total for k, v in sums.items()}


def child(spec: dict) -> None:
    """One row in this fresh process; prints one JSON line."""

    from hetlora.core.adapter import num_bytes
    from hetlora.core.validation import layer_shapes
    from hetlora.device.memory import peak_rss_mb, rss_mb
    from hetlora.methods import AggregationContext
    from hetlora.server.aggregation import aggregate_replies
    import torch

    ranks = client_ranks(spec["clients"], spec["method"], spec["seed"])
    previous = make_adapter(R_MAX, 0, spec["layers"])
    ctx = AggregationContext(r_max=R_MAX, previous=previous, norm_bound=spec["bound"], shapes=layer_shapes(previous),
                             seed=spec["seed"], round_index=0, ranks={f"c{k:04d}": r for k, r in enumerate(ranks)},
                             generator=torch.Generator().manual_seed(spec["seed"]))
    replies = Replies(ranks, spec["layers"])
    if spec["engine"] == "serverapp":  # the ServerApp's imports are in its resident memory before a round, not in its time
        import importlib

        importlib.import_module("hetlora.flower.server_app")
    baseline = rss_mb()
    t0 = time.perf_counter()
    if spec["path"] == "plain":
        plain_loop(replies, R_MAX)
        kept, dropped = spec["clients"], 0
    elif spec["engine"] == "serverapp":
        done, replies.making = serverapp_round(spec, ranks, ctx, previous)
        kept, dropped = len(done.kept), len(done.dropped)
    else:
        done = aggregate_replies(method_of(spec["method"], spec["clients"]), ctx, replies, assigned_ranks=ctx.ranks, exact_rank=False,
                                 min_clients=1, upload_bytes=lambda u: num_bytes(u.adapter), stream=spec["path"] == "stream")
        assert done.new is not None, done.dropped
        kept, dropped = len(done.kept), len(done.dropped)
    seconds = time.perf_counter() - t0 - replies.making
    print(json.dumps(spec | {"peak_rss_mb": peak_rss_mb(), "baseline_mb": baseline, "seconds": seconds,
                             "seconds_per_update": seconds / spec["clients"], "kept": kept, "dropped": dropped,
                             "mean_update_mb": sum(r * sum(o + i for o, i in MODULES.values()) for r in ranks) * spec["layers"] * 4
                             / len(ranks) / 2**20}))


MEMORY_LIMIT_GB = 21  # a row's address space: past it the row fails and is recorded, the machine is spared


def _limit_memory() -> None:
    import resource

    limit = MEMORY_LIMIT_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure(spec: dict) -> dict:
    """One row in a fresh process; a row that fails (out of memory past :data:`MEMORY_LIMIT_GB`) is recorded as such."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         preexec_fn=_limit_memory)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return spec | {"failed": f"exit {out.returncode}: {tail[-300:]}", "memory_limit_gb": MEMORY_LIMIT_GB}
    return json.loads(out.stdout.strip().splitlines()[-1])


def combined(tries: list[dict]) -> dict:
    """One row from its repeats: the median seconds, the largest peak, every try's seconds and peak kept."""
    import statistics

    failed = [t for t in tries if "failed" in t]
    if failed or len(tries) == 1:
        return failed[0] if failed else tries[0]
    seconds = [t["seconds"] for t in tries]
    row = dict(tries[0])
    row.update(seconds=statistics.median(seconds), seconds_per_update=statistics.median(seconds) / row["clients"],
               peak_rss_mb=max(t["peak_rss_mb"] for t in tries), seconds_all=seconds,
               peak_rss_mb_all=[t["peak_rss_mb"] for t in tries])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--paths", nargs="+", default=["stream", "list"], help="stream (today's server), list (every method holds the replies)")
    p.add_argument("--engines", nargs="+", default=["in-process"], choices=["in-process", "serverapp"],
                   help="in-process (the aggregation path alone), serverapp (Flower's ServerApp path: messages pushed, replies "
                        "pulled one at a time and decoded; streamed methods only)")
    p.add_argument("--bound", type=float, default=1.5, help="the norm bound (the run default); 0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each row this many times, each in a fresh process, interleaved across paths so a slow "
                        "spell of the machine hits both: seconds = the median, peak_rss_mb = the largest, all kept")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="hetlora and fedex-lora, 2 layers, 2 and 4 clients: seconds, for the test suite")
    p.add_argument("--child", default=None)
    p.add_argument("--plot", type=Path, default=None, help="also draw peak RSS and seconds per round against K (a PNG)")
    p.add_argument("--plot-from", type=Path, nargs="+", default=None,
                   help="draw --plot from these result files (one machine class: their rows are compared) and exit")
    p.add_argument("--plot-note", default=None, help="what the title adds of the machine class (e.g. its CPU capability)")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.plot_from:
        rows = [r | {"source": f.stem} for f in args.plot_from for r in json.loads(f.read_text())["rows"] if "failed" not in r]
        devices = sorted({json.loads(f.read_text())["provenance"]["device"] for f in args.plot_from})
        plot(rows, args.plot or Path("server_scale.png"), devices + ([args.plot_note] if args.plot_note else []))
        return
    from hetlora.methods import AggregationContext
    from hetlora.methods.streaming import one_at_a_time
    from hetlora.provenance import environment

    layers = 2 if args.smoke else 30
    clients = [2, 4] if args.smoke else args.clients
    if args.smoke:
        args.methods, args.engines = ["hetlora", "fedex-lora"], ["in-process", "serverapp"]
        args.plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    bound = args.bound or None
    rows = []

    provenance = environment("cpu")  # once, before the first write: a tracked result file rewritten after a row would
    # make every later row's tree look locally changed ("-dirty")

    def write() -> None:  # after every row: a long run keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"provenance": provenance, "r_max": R_MAX, "ranks": [R_MIN, R_MAX], "bound": bound,
                                             "layers": layers, "memory_limit_gb": MEMORY_LIMIT_GB, "rows": rows,
                                             "goals": goals([r for r in rows if "failed" not in r])}, indent=1))

    print(f"{'method':>14} {'engine':>10} {'path':>6} {'K':>5} {'peak MB':>9} {'base MB':>8} {'s/round':>8} {'ms/update':>9}")
    for method in args.methods:
        streams = one_at_a_time(method_of(method, 1), AggregationContext(r_max=R_MAX))
        paths = [p for p in args.paths if streams or p == "list"] + (["plain"] if method == "hetlora" else [])
        runs = [(engine, path) for engine in args.engines for path in paths
                if engine == "in-process" or (path == "stream" and streams)]  # the ServerApp takes replies one at a time
        for k in clients:
            if method == "flora" and k > FLORA_MAX_CLIENTS:
                continue
            specs = [{"method": method, "path": path, "engine": engine, "clients": k, "layers": layers, "bound": bound,
                      "seed": args.seed} for engine, path in runs]
            tries = [[measure(spec) for spec in specs] for _ in range(args.repeats)]  # a repeat measures every path
            for row in (combined([t[i] for t in tries]) for i in range(len(specs))):
                row["clients_per_round"] = row.pop("clients")
                rows.append(row)
                write()
                if "failed" in row:
                    print(f"{method:>14} {row['engine']:>10} {row['path']:>6} {k:>5} failed: {row['failed']}")
                    continue
                print(f"{method:>14} {row['engine']:>10} {row['path']:>6} {k:>5} {row['peak_rss_mb']:>9.0f} {row['baseline_mb']:>8.0f} "
                      f"{row['seconds']:>8.2f} {1000 * row['seconds_per_update']:>9.1f}")
    for line in goals([r for r in rows if "failed" not in r])["lines"]:
        print(line)
    if args.plot:
        plot([r for r in rows if "failed" not in r], args.plot, [provenance["device"]])


def plot(rows: list[dict], path: Path, devices: list[str]) -> None:
    """Peak RSS and seconds per round against the clients per round, a line per (method, engine, path), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def name(r: dict) -> str:
        engine = "" if r.get("engine", "in-process") == "in-process" else " (ServerApp)"
        return f"{r['method']} {r['path']}{engine}{'' if r.get('bound') else ', unbounded'}"

    sources: dict[str, set] = {}
    for r in rows:
        sources.setdefault(name(r), set()).add(r.get("source"))
    lines: dict[str, list[dict]] = {}
    for r in rows:  # a line measured in two files (before and after a change) is told apart by its file
        lines.setdefault(name(r) + (f" [{r['source']}]" if len(sources[name(r)]) > 1 else ""), []).append(r)
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax in (mem, sec):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more lines than ten colours
    for label, mine in sorted(lines.items()):
        mine.sort(key=lambda r: r["clients_per_round"])
        ks = [r["clients_per_round"] for r in mine]
        style = "--" if "list" in label or "plain" in label else "-"
        mem.plot(ks, [r["peak_rss_mb"] for r in mine], style, marker="o", label=label)
        sec.plot(ks, [r["seconds"] for r in mine], style, marker="o", label=label)
    for ax, what in ((mem, "server peak RSS (MB)"), (sec, "server seconds per round")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clients per round K")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    sec.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Server memory and time against K (SmolLM2-shaped updates, ranks 5–50) — {'; '.join(devices)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def goals(rows: list[dict]) -> dict:
    """#43's goals: peak at the largest K ≤ 1.5× the smallest K's (the weighted-sum methods, streamed); hetlora's
    seconds ≤ 1.5× the plain loop's at each K; seconds per update (linear in K when it stays flat)."""
    out: dict = {"lines": []}
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["path"] if r.get("engine", "in-process") == "in-process" else f"{r['path']} serverapp"), []).append(r)
    for (method, path), mine in by.items():
        mine.sort(key=lambda r: r["clients_per_round"])
        low, high = mine[0], mine[-1]
        ratio = high["peak_rss_mb"] / low["peak_rss_mb"]
        out[f"{method} {path} peak_ratio"] = ratio
        goal = " (goal ≤ 1.5)" if method in ("hetlora", "hetlora-naive", "fedavg", "fedex-lora") and path.startswith("stream") else ""
        per_update = ", ".join(f"{1000 * r['seconds_per_update']:.0f}" for r in mine)
        out["lines"].append(f"{method} {path}: peak at K={high['clients_per_round']} / K={low['clients_per_round']} = {ratio:.2f}{goal}; "
                            f"ms per update {per_update}")
    plain = {r["clients_per_round"]: r for r in by.get(("hetlora", "plain"), [])}
    for r in by.get(("hetlora", "stream"), []):
        if r["clients_per_round"] in plain:
            ratio = r["seconds"] / plain[r["clients_per_round"]]["seconds"]
            out[f"hetlora K={r['clients_per_round']} over_plain"] = ratio
            out["lines"].append(f"hetlora stream K={r['clients_per_round']}: {ratio:.2f}× the plain fp32 loop (goal ≤ 1.5)")
    return out


if __name__ == "__main__":
    main()
