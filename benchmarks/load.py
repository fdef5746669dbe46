"""A cross-device federation at scale (issue #43): 1,000 registered tiny clients, 20 per round, 50 rounds,
in process and on Flower's simulation engine (one virtual SuperNode per client, Ray).

The server keeps O(1) state per client (its rank; visits are counted from metrics.jsonl at the end) and
re-reads nothing per client each round, so its resident memory should stay flat across rounds and a round's
time should not grow with the rounds done. Each engine runs in a fresh process: ``peak_rss_mb`` is that
process's peak (the server's; on Flower the ClientApps run in Ray's worker processes, not counted).
``--closing`` adds rounds that close as cross-device rounds do (docs/algorithm.md §7.3): over-selection
(F = 0.25), seeded lognormal reply times with 5 % silent clients, and a deadline.

    python benchmarks/load.py [--engines local flower] [--clients 1000] [--per-round 20] [--rounds 50] [--closing]
                              [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLOSING = {"over_select": 0.25, "client_delay": "lognormal:1.0:0.75,silent=0.05", "round_timeout": 3.0}


def child(spec: dict) -> None:
    """One engine's run, in this (fresh) process; prints one JSON line."""
    from hetlora.config import RunConfig

    out = Path(tempfile.mkdtemp(prefix="hl-load-"))
    try:
        cfg = RunConfig(model="tiny", rounds=spec["rounds"], clients_per_round=spec["per_round"], local_steps=1, batch_size=2,
                        max_length=32, r_min=2, r_max=8, eval_size=8, min_examples=1, max_clients=spec["clients"],
                        out=str(out / "run"), engine=spec["engine"], tier_eval="off", seed=0,
                        **(CLOSING if spec["closing"] else {}))
        start = time.perf_counter()
        if spec["engine"] == "flower":
            from hetlora.flower.simulation import run_simulation

            summary = run_simulation(cfg, quiet=True)
        else:
            from hetlora.server.runner import run

            summary = run(cfg, progress=False)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps(spec | {
            "registered": summary["clients"], "wall_seconds": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "round_seconds": [r["seconds"] for r in rows], "server_rss_mb": [r["server_rss_mb"] for r in rows],
            "aggregated_per_round": [len(r["clients"]) for r in rows], "dropped_per_round": [len(r["dropped"]) for r in rows],
            "closed_by": {c: sum(r.get("closed_by") == c for r in rows) for c in {r.get("closed_by") for r in rows}},
            "final_eval_ppl": summary["final_eval_ppl"], "initial_eval_ppl": summary["initial_eval_ppl"],
            "clients_visited": len(summary["visits"]),
        }))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: the run failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(row: dict) -> str:
    rounds, rss = row["round_seconds"], row["server_rss_mb"]
    half = len(rounds) // 2
    return (f"{row['engine']:6s} {'closing' if row['closing'] else 'plain':7s} {row['registered']} clients, {row['per_round']}/round × "
            f"{len(rounds)} rounds: wall {row['wall_seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"median round {statistics.median(rounds):.2f} s (first half {statistics.median(rounds[:half] or rounds):.2f}, "
            f"second {statistics.median(rounds[half:]):.2f}), server RSS round 2 → last {rss[min(1, len(rss) - 1)]:.0f} → {rss[-1]:.0f} MB, "
            f"aggregated {min(row['aggregated_per_round'])}–{max(row['aggregated_per_round'])} per round, closed by {row['closed_by']}, "
            f"ppl {row['initial_eval_ppl']:.1f} → {row['final_eval_ppl']:.1f}, {row['clients_visited']} clients visited")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", nargs="+", default=["local", "flower"], choices=["local", "flower"])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--closing", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="plain rounds, rounds that close (over-selection, seeded delays, a deadline), or both")
    p.add_argument("--json", type=Path, default=None, help="also write the figures (with commit, device, library versions) here")
    p.add_argument("--smoke", action="store_true", help="2 rounds of 4 among 20 clients, in process, closing: seconds, for the test suite")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.smoke:
        args.rounds, args.clients, args.per_round, args.engines, args.closing = 2, 20, 4, ["local"], ["on"]
    rows = []
    for engine in args.engines:
        for closing in args.closing:
            row = measure({"engine": engine, "closing": closing == "on", "clients": args.clients, "per_round": args.per_round,
                           "rounds": args.rounds})
            rows.append(row)
            print(describe(row), flush=True)
    if args.json:
        from hetlora.provenance import environment

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"provenance": environment("cpu"), "closing": CLOSING, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
