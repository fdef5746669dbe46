"""Round wall time on Flower's simulation engine vs the in-process engine (same tiny config).

Runs the same experiment twice per engine and compares the mean round time of the
rounds after the first (warm), as recorded in metrics.jsonl.

    python benchmarks/flower_overhead.py [--rounds 4] [--json F]
    python benchmarks/flower_overhead.py --smoke     # 2 rounds of 1 local step: the test suite runs it
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from hetlora.config import RunConfig
from hetlora.server.runner import run


def config(out: Path, rounds: int, local_steps: int = 5) -> RunConfig:
    return RunConfig(
        model="tiny", rounds=rounds, clients_per_round=4, local_steps=local_steps, batch_size=8, max_length=64,
        r_min=2, r_max=8, eval_size=16, min_examples=400, max_clients=8, out=str(out), seed=0,
    )


def warm_round_seconds(out: Path) -> float:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    warm = rows[1:] or rows
    return sum(r["seconds"] for r in warm) / len(warm)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="2 rounds of 1 local step: for the test suite")
    p.add_argument("--json", type=Path, default=None, help="also write the figures (and commit, device, library versions) here")
    args = p.parse_args()
    steps = 1 if args.smoke else 5
    if args.smoke:
        args.rounds = 2
    from hetlora.flower.simulation import run_simulation

    root = Path(tempfile.mkdtemp(prefix="hl-fo-"))
    try:
        t = time.perf_counter()
        run(config(root / "local", args.rounds, steps), progress=False)
        local_total = time.perf_counter() - t
        t = time.perf_counter()
        run_simulation(config(root / "flower", args.rounds, steps))
        flower_total = time.perf_counter() - t
        local, flower = warm_round_seconds(root / "local"), warm_round_seconds(root / "flower")
        print(f"in-process: {local:.2f} s/round (warm), {local_total:.1f} s total")
        print(f"flower sim: {flower:.2f} s/round (warm), {flower_total:.1f} s total incl. Ray start-up")
        print(f"flower / in-process (warm rounds) = {flower / local:.2f}x")
        if args.json:
            from hetlora.provenance import environment

            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**environment("cpu"), "rounds": args.rounds, "local_steps": steps,
                                             "warm_round_seconds": {"in_process": local, "flower_simulation": flower},
                                             "total_seconds": {"in_process": local_total, "flower_simulation": flower_total}}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
