"""The rank-health pilot (issue #23): HetLoRA and its variants on the **validation** split, to choose which go
into the next study's core. Never the test split: the study judges the chosen ones there.

    python benchmarks/rank_health_pilot.py --seeds 0 1 [--budget-minutes 50]
    python benchmarks/rank_health_pilot.py --smoke --json F   # the tiny smoke preset, 2 labels, 1 round, a temporary directory

The CPU study preset's design (SmolLM2 + chitchat, a pool of 12 returning clients, 4 a round, 9 rounds × 2
local steps), scored on 256 validation examples after the last round, plus the r_min tier (the global adapter
truncated to r = 5) on the same examples. Finished runs under ``benchmarks/results/pilot-rank-health/runs/``
are reused (same settings only), so the pilot continues across sittings; ``pilot.json`` and ``pilot.md``
are rebuilt from them every time, with provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from hetlora.study.compare import variant
from hetlora.config import RunConfig
from hetlora.provenance import environment
from hetlora.server.runner import finished_as_asked, run
from hetlora.study.stats import t_interval
from hetlora.study.runs import PRESETS

LABELS = ["hetlora", "hetlora-svd", "hetlora-revive", "hetlora-svd-revive", "hetlora-ordered", "hetlora-svd-ordered"]
RESULTS = Path("benchmarks/results/pilot-rank-health")
LR = 1e-3  # the CPU study's tuned LoRA rate (benchmarks/results/cpu-v2/tuning.json); not re-tuned for the pilot


def config(label: str, seed: int, work: Path, preset: str = "cpu", rounds: int | None = None) -> RunConfig:
    extra = {"rounds": rounds} if rounds else {}
    base = RunConfig(**(PRESETS[preset].base | {"eval_split": "validation", "lr": LR, "seed": seed, "out": str(work)} | extra))
    return dataclasses.replace(variant(label, base), out=str(work / f"{label}-s{seed}"))


def collect(seeds: list[int], results: Path = RESULTS, labels: list[str] = LABELS, preset: str = "cpu") -> dict:
    tier = str(PRESETS[preset].base["r_min"])
    rows = {}
    for label in labels:
        per_seed = {}
        for seed in seeds:
            path = results / "runs" / f"{label}-s{seed}" / "summary.json"
            if path.is_file():
                s = json.loads(path.read_text())
                per_seed[seed] = {"validation_ppl": s["full_eval_ppl"], "r_min_tier_ppl": s["final_tier_eval_ppl"].get(tier),
                                  "live_rank": s.get("final_live_rank"), "trainable_rank": s.get("final_trainable_rank"),
                                  "bytes_up_total": s["bytes_up_total"], "seconds": s["seconds_total"],
                                  "commit": s["provenance"]["commit"], "device": s["provenance"]["device"],
                                  "precision": s["provenance"]["precision"]}
        rows[label] = per_seed
    paired = {}
    for label in labels[1:]:
        seeds_both = sorted(set(rows[label]) & set(rows["hetlora"]))
        for key in ("validation_ppl", "r_min_tier_ppl"):
            diffs = [rows[label][s][key] - rows["hetlora"][s][key] for s in seeds_both]
            mean, ci = t_interval(diffs) if diffs else (None, None)
            paired.setdefault(label, {})[key] = {"seeds": seeds_both, "diffs": diffs, "mean": mean, "ci95": list(ci) if ci else None}
    return {"design": {"split": "validation", "r_min": int(tier), "labels": labels, "seeds": seeds, "lr": LR, "preset": preset,
                       "final_eval_size": PRESETS[preset].base.get("final_eval_size")},
            "runs": rows, "vs_hetlora": paired, "provenance": environment("cpu")}


def render(report: dict) -> str:
    r_min = report["design"]["r_min"]
    lines = ["# Rank-health pilot (validation split; lower is better)", "",
             f"| label | n | validation ppl (mean) | r = {r_min} tier ppl (mean) | Δ vs hetlora, validation (mean, 95 % CI) | Δ vs hetlora, r = {r_min} tier | live / trainable rank |",
             "|---|---:|---:|---:|---|---|---|"]
    for label, per_seed in report["runs"].items():
        if not per_seed:
            lines.append(f"| {label} | 0 | — | — | — | — | — |")
            continue
        mean = lambda key: statistics.fmean(r[key] for r in per_seed.values())  # noqa: E731
        def delta(key):
            d = report["vs_hetlora"].get(label, {}).get(key)
            if not d or d["mean"] is None:
                return "—"
            ci = f" ({d['ci95'][0]:+.2f}…{d['ci95'][1]:+.2f})" if d["ci95"] else ""
            return f"{d['mean']:+.2f}{ci}"
        ranks = ", ".join(f"{r['live_rank']}/{r['trainable_rank']}" for r in per_seed.values())
        lines.append(f"| {label} | {len(per_seed)} | {mean('validation_ppl'):.2f} | {mean('r_min_tier_ppl'):.2f} | "
                     f"{delta('validation_ppl')} | {delta('r_min_tier_ppl')} | {ranks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/pilot-rank-health"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="the tiny smoke preset, 2 labels, 1 round, seed 0, in a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also copy pilot.json here")
    args = parser.parse_args()
    preset, labels, rounds = "cpu", LABELS, None
    if args.smoke:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="hl-pilot-"))
        preset, labels, rounds, args.seeds, args.work, args.results = "smoke", LABELS[:2], 1, [0], tmp / "work", tmp / "results"
    started = time.perf_counter()
    for seed in args.seeds:  # seed-major: a partial pilot still pairs every label on the seeds it has
        for label in labels:
            cfg = config(label, seed, args.work, preset, rounds)
            kept = args.results / "runs" / f"{label}-s{seed}"
            if finished_as_asked(kept, cfg):
                continue
            if args.budget_minutes is not None and time.perf_counter() - started > 60 * args.budget_minutes:
                print("time budget used up; run again to continue")
                break
            work = Path(cfg.out)
            t = time.perf_counter()
            summary = run(cfg, resume=(work / "config.json").is_file(), progress=False)
            kept.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "summary.json"):
                (kept / name).write_bytes((work / name).read_bytes())
            print(f"{label:>20} seed {seed}: validation ppl {summary['full_eval_ppl']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
            write(collect(args.seeds, args.results, labels, preset), args.results)
    report = collect(args.seeds, args.results, labels, preset)
    write(report, args.results)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def write(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "pilot.json").write_text(json.dumps(report, indent=1))
    (results / "pilot.md").write_text(render(report))


if __name__ == "__main__":
    main()
