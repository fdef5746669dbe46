"""Server memory under load: 1,000 registered tiny clients, 50 sampled per round.

The server keeps no per-client state beyond a rank, so its resident memory should stay
flat across rounds. Prints RSS after each round (metrics.jsonl's ``server_rss_mb``).

    python benchmarks/load.py [--rounds 6] [--clients 1000] [--per-round 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from hetlora.config import RunConfig
from hetlora.server.runner import run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--json", type=Path, default=None, help="also write the figures (with commit, device, library versions) here")
    p.add_argument("--smoke", action="store_true", help="2 rounds of 4 among 20 clients: seconds, for the test suite")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.clients, args.per_round = 2, 20, 4
    out = Path(tempfile.mkdtemp(prefix="hl-load-"))
    try:
        cfg = RunConfig(
            model="tiny", rounds=args.rounds, clients_per_round=args.per_round, local_steps=1, batch_size=2,
            max_length=32, r_min=2, r_max=8, eval_size=8, min_examples=1, max_clients=args.clients, out=str(out / "run"),
        )
        summary = run(cfg, progress=False)
        rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        print(f"{summary['clients']} registered clients, {args.per_round} per round")
        for r in rows:
            print(f"round {r['round']}: server RSS {r['server_rss_mb']:.0f} MB, {r['seconds']:.1f} s, ranks tracked {len(summary['final_ranks'] or {})}")
        growth = rows[-1]["server_rss_mb"] - rows[1]["server_rss_mb"]
        print(f"RSS change from round 2 to round {rows[-1]['round']}: {growth:+.0f} MB")
        if args.json:
            from hetlora.provenance import environment

            report = {**environment("cpu"), "args": {k: str(v) for k, v in vars(args).items()}, "clients": summary["clients"],
                      "server_rss_mb": [r["server_rss_mb"] for r in rows], "seconds": [r["seconds"] for r in rows],
                      "rss_growth_mb_after_round_2": growth}
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
