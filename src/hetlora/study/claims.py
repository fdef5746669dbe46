"""The study's claims, judged on paired per-seed differences to ``hetlora`` (docs/algorithm.md §10).

Pure arithmetic over the finished runs' records (:func:`load_runs`): C1–C7 (the paper's claims, one
Holm family), C8 (does any core method beat HetLoRA, a second family), the rank-health variants'
final and r_min-tier perplexity, and the long regime's curves. Pairs never cross a seed block.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Collection

from ..server.outputs import read_metrics
from .stats import ALPHA, holm, t_interval, t_test, verdict

log = logging.getLogger(__name__)

# Pre-registered before the v3 runs: a "no worse" claim holds when the one-sided non-inferiority test
# rejects "worse by at least this much" (per-seed relative perplexity difference, in %).
EQUIVALENCE_MARGIN_PCT = 1.0


def block_key(block: dict[str, Any] | None) -> tuple | None:
    return None if block is None else (block.get("device_class"), block.get("precision"), block.get("behaviour"))


RUN_DIR = re.compile(r"(?P<label>[a-z0-9][a-z0-9-]*)-s(?P<seed>0|[1-9][0-9]*)")


def run_problem(path: Path, summary: dict[str, Any], seeds: Collection[int] | None, labels: Collection[str] | None) -> str | None:
    """Why the finished run in ``path`` is not one of the study's (None: it is): a directory name that is not
    ``<label>-s<seed>`` exactly (``hetlora-s1_9`` is not seed 19), a seed or label the plan does not register,
    or a recorded config whose seed is not the directory's (a run copied or planted under another name)."""
    match = RUN_DIR.fullmatch(path.name)
    if match is None:
        return "its directory name is not <label>-s<seed>"
    label, seed = match["label"], int(match["seed"])
    if seeds is not None and seed not in seeds:
        return f"seed {seed} is not a registered seed of the plan"
    if labels is not None and label not in labels:
        return f"label {label} is not a registered label of the plan"
    recorded = (summary.get("config") or {}).get("seed")
    if recorded != seed:
        return f"its own config records seed {recorded!r}, not the directory's {seed}"
    return None


def load_runs(results: Path, where: str = "runs", *, seeds: Collection[int] | None = None, labels: Collection[str] | None = None,
              ignored: list[dict[str, str]] | None = None,
              check: Callable[[str, int, dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Every finished run under ``results/where`` that is one of the study's (:func:`run_problem`, then ``check(label,
    seed, its recorded config)`` when given; any other is left out with a warning and listed in ``ignored``); a seed
    whose runs come from two seed blocks is refused."""
    runs = []
    for path in sorted((results / where).glob("*-s*")):
        if not (path / "summary.json").is_file():
            continue
        summary = json.loads((path / "summary.json").read_text())
        problem = run_problem(path, summary, seeds, labels)
        label, _, seed = path.name.rpartition("-s")
        if problem is None and check is not None:
            problem = check(label, int(seed), summary.get("config") or {})
        if problem:
            log.warning("study: %s left out: %s", path, problem)
            if ignored is not None:
                ignored.append({"run": path.name, "reason": problem})
            continue
        rows = read_metrics(path)
        block = json.loads((path / "block.json").read_text()) if (path / "block.json").is_file() else None
        runs.append({
            "label": label, "seed": int(seed), "method": summary["method"],
            "final_eval_ppl": summary["full_eval_ppl"], "final_eval_size": summary.get("full_eval_size"),
            "round_eval_ppl": summary["final_eval_ppl"], "initial_eval_ppl": summary["initial_eval_ppl"],
            "curve": [[0, summary["initial_eval_ppl"]]] + [[r["round"], r["eval_ppl"]] for r in rows],
            "live_rank": [[r["round"], r.get("live_rank")] for r in rows],
            "trainable_rank": [[r["round"], r.get("trainable_rank")] for r in rows],
            "train_curve": [[r["round"], r.get("train_loss")] for r in rows],
            "block": block,
            "rank_energy": rows[-1].get("rank_energy") if rows else None,
            "tier_ppl": summary.get("final_tier_eval_ppl", {}),
            "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"],
            "trainable_params": summary["trainable_params"], "seconds": summary["seconds_total"],
            "mean_final_rank": statistics.fmean(summary["final_ranks"].values()) if summary.get("final_ranks") else None,
            "pruning_events": summary.get("pruning_events"), "visits": summary.get("visits"),
            "lr": summary["config"]["lr"], "provenance": summary.get("provenance"),
            "rouge_l": rows[-1].get("rouge_l") if rows else None,
            "rouge_size": rows[-1].get("rouge_size") if rows else None,  # the prompts it was scored on
            "rejected_rounds": summary.get("rejected_rounds") or [],
        })
    check_blocks(runs, results / where)
    return runs


def check_blocks(runs: list[dict[str, Any]], where: Path) -> None:
    """Pairs stay inside a seed block: refuse a seed whose runs were made in two (device class, precision, behaviour)."""
    per_seed: dict[int, dict[tuple | None, list[str]]] = {}
    for r in runs:
        per_seed.setdefault(r["seed"], {}).setdefault(block_key(r["block"]), []).append(r["label"])
    for seed, blocks in per_seed.items():
        if len(blocks) > 1:
            listing = "; ".join(f"{key}: {', '.join(labels)}" for key, labels in blocks.items())
            raise ValueError(f"seed {seed} under {where} mixes seed blocks ({listing}); re-run that seed in one block")


def by_label(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["label"], {})[r["seed"]] = r
    return out


def paired(runs: dict, other: str, key: Callable[[dict], float | None], sign: int = 1) -> tuple[list[int], list[float]]:
    """Seeds both ``hetlora`` and ``other`` finished, and sign·(key(other) − key(hetlora)) on each."""
    seeds, diffs = [], []
    for s in sorted(set(runs.get("hetlora", {})) & set(runs.get(other, {}))):
        a, b = key(runs["hetlora"][s]), key(runs[other][s])
        if a is None or b is None:
            continue  # a seed without the measure on either side is not a pair (nor listed as one)
        seeds.append(s)
        diffs.append(sign * (b - a))
    return seeds, diffs


def diff_claim(cid: str, title: str, other: str, evidence: str, runs: dict, key=lambda r: r["final_eval_ppl"], basis: str = "perplexity") -> dict:
    """A claim judged on the per-seed paired difference key(other) − key(hetlora) (> 0: the paper's side)."""
    seeds, diffs = paired(runs, other, key)
    if not diffs:
        return {"id": cid, "claim": title, "paper": evidence, "versus": other, "n": 0, "p": None,
                "mean_diff": None, "ci95": None, "verdict_basis": basis, "note": "no paired runs yet"}
    mean, ci = t_interval(diffs)
    return {"id": cid, "claim": title, "paper": evidence, "versus": other, "n": len(diffs), "seeds": seeds, "diffs": diffs,
            "mean_diff": mean, "ci95": list(ci) if ci else None, "p": t_test(diffs) if len(diffs) > 1 else None, "verdict_basis": basis}


def relative_pct(runs: dict, other: str) -> tuple[list[int], list[float]]:
    """Per seed, 100 · (ppl(other) − ppl(hetlora)) / ppl(hetlora): > 0 means hetlora is better."""
    seeds = sorted(set(runs.get("hetlora", {})) & set(runs.get(other, {})))
    return seeds, [100 * (runs[other][s]["final_eval_ppl"] - runs["hetlora"][s]["final_eval_ppl"]) / runs["hetlora"][s]["final_eval_ppl"]
                   for s in seeds]


def pruning_claim(runs: dict) -> dict:
    """C4: ranks shrink, upload bytes drop, perplexity no worse than hetlora-noprune's by more than the margin."""
    seeds, byte_diffs = paired(runs, "hetlora-noprune", lambda r: r["bytes_up_total"])
    _, rel = relative_pct(runs, "hetlora-noprune")
    _, rank_diffs = paired(runs, "hetlora-noprune", lambda r: r["mean_final_rank"])
    base = {"id": "C4", "claim": "Rank self-pruning: ranks shrink, upload bytes drop, quality no worse",
            "paper": "HetLoRA with γ = 0.99 prunes ranks during training and keeps its perplexity (paper, rank self-pruning ablation)",
            "versus": "hetlora-noprune", "equivalence_margin_pct": EQUIVALENCE_MARGIN_PCT,
            "verdict_basis": f"upload bytes must drop (one-sided t-test) and perplexity be no worse than {EQUIVALENCE_MARGIN_PCT:g} % "
                             "(one-sided non-inferiority test); p = the larger of the two (intersection-union), Holm-adjusted"}
    if len(byte_diffs) < 2:
        return base | {"n": len(byte_diffs), "p": None, "mean_diff": None, "ci95": None, "note": "fewer than two paired seeds"}
    b_mean, b_ci = t_interval(byte_diffs)
    p_mean, p_ci = t_interval(rel)
    r_mean, _ = t_interval(rank_diffs)
    p_saves = t_test(byte_diffs, alternative="greater")
    p_no_worse = t_test(rel, null=-EQUIVALENCE_MARGIN_PCT, alternative="greater")
    p_worse = t_test(rel, null=-EQUIVALENCE_MARGIN_PCT, alternative="less")  # pruning worse by more than the margin
    return base | {"n": len(byte_diffs), "seeds": seeds, "mean_diff": p_mean, "ci95": list(p_ci), "diffs": rel,
                   "p": max(p_saves, p_no_worse), "p_bytes_saved": p_saves, "p_no_worse": p_no_worse, "p_worse": p_worse,
                   "ranks_shrink": r_mean > 0, "bytes_up_saved_mean": b_mean, "bytes_up_saved_ci95": list(b_ci),
                   "mean_rank_reduction": r_mean}


def cost_claim(runs: dict) -> dict:
    """C6: HetLoRA closes at least half the gap from the best HomLoRA to full fine-tuning, at a fraction of its cost.

    Judged on the per-seed difference d = (ppl(best HomLoRA) + ppl(FFT)) / 2 − ppl(HetLoRA) (> 0: HetLoRA is past
    the midpoint of the gap), a linear combination with an exact t-interval; no seed is dropped, whichever side
    FFT falls on. The share of the gap closed is reported per seed as a description only.
    """
    base = {"id": "C6", "claim": "Cost and the gap to full fine-tuning",
            "paper": "FFT 32.70, HetLoRA 53.93, best HomLoRA 80.51: HetLoRA closes 56 % of the gap at a fraction of FFT's trainable parameters",
            "versus": "fft", "verdict_basis": "per-seed (best HomLoRA + FFT)/2 − HetLoRA perplexity (> 0: at least half the gap closed), "
                                               "and trainable parameters and bytes relative to FFT"}
    seeds = sorted(set(runs.get("hetlora", {})) & set(runs.get("fft", {})) & set(runs.get("fedavg-rmin", {})) & set(runs.get("fedavg-rmax", {})))
    if not seeds:
        return base | {"n": 0, "p": None, "mean_diff": None, "ci95": None, "note": "no paired runs yet"}
    diffs, closed, fft_better = [], [], []
    for s in seeds:
        het, fft = runs["hetlora"][s]["final_eval_ppl"], runs["fft"][s]["final_eval_ppl"]
        hom = min(runs["fedavg-rmin"][s]["final_eval_ppl"], runs["fedavg-rmax"][s]["final_eval_ppl"])
        diffs.append((hom + fft) / 2 - het)
        fft_better.append(hom - fft)
        closed.append((hom - het) / (hom - fft) if hom != fft else None)
    f = runs["fft"][seeds[0]]
    h = runs["hetlora"][seeds[0]]
    cost = {"trainable_params_vs_fft": h["trainable_params"] / f["trainable_params"],
            "bytes_up_vs_fft": statistics.fmean(runs["hetlora"][s]["bytes_up_total"] / runs["fft"][s]["bytes_up_total"] for s in seeds),
            "bytes_up_vs_fedavg_rmax": statistics.fmean(runs["hetlora"][s]["bytes_up_total"] / runs["fedavg-rmax"][s]["bytes_up_total"] for s in seeds),
            "fft_lr": f["lr"], "lora_lr": h["lr"]}
    mean, ci = t_interval(diffs)
    g_mean, g_ci = t_interval(fft_better)
    return base | cost | {"n": len(diffs), "seeds": seeds, "diffs": diffs, "mean_diff": mean, "ci95": list(ci) if ci else None,
                          "p": t_test(diffs) if len(diffs) > 1 else None, "gap_closed": closed,
                          "fft_minus_best_homlora_mean": g_mean, "fft_minus_best_homlora_ci95": list(g_ci) if g_ci else None}


def tier_claim(runs: dict, r_min: int) -> dict:
    """C7: the global adapter truncated to the smallest tier serves it at least as well as HomLoRA at that rank."""
    return diff_claim("C7", f"The global adapter truncated to each tier's rank serves that tier (r = {r_min})", "fedavg-rmin",
                      "a low-rank device runs the global adapter's truncation (the paper's deployment story)", runs,
                      key=lambda r: r["tier_ppl"].get(str(r_min)) if r["label"] == "hetlora" else r["final_eval_ppl"],
                      basis=f"perplexity of hetlora truncated to r = {r_min} vs HomLoRA trained at r = {r_min}")


def judge(family: list[dict]) -> list[dict]:
    """Holm-adjust the family's p-values and give each claim its verdict at α = 0.05."""
    adjusted = holm({c["id"]: c["p"] for c in family if c.get("p") is not None})
    out = []
    for c in family:
        p_holm = adjusted.get(c["id"])
        if c["id"] == "C4":
            v = verdict(1.0, p_holm) if c.get("ranks_shrink", True) else "not reproduced"
            if c.get("p_worse") is not None and c["p_worse"] < ALPHA:
                v = "not reproduced"
        else:
            v = verdict(c.get("mean_diff"), p_holm)
        out.append(c | {"p_holm": p_holm, "verdict": v})
    return out


def claims(runs: dict, preset: Any) -> list[dict]:  # preset: a study.runs.Preset (runs imports this module)
    r_min = preset.base["r_min"]
    return judge([
        diff_claim("C1", "HetLoRA beats HomLoRA at r_min", "fedavg-rmin", "53.93 vs 80.51 (HomLoRA r = 5)", runs),
        diff_claim("C2", "HetLoRA beats HomLoRA at r_max", "fedavg-rmax", "53.93 vs 307.96 (HomLoRA r = 50)", runs),
        diff_claim("C3", "HetLoRA beats reconstruction + SVD", "recon-svd", "53.93 vs 323.89", runs),
        pruning_claim(runs),
        diff_claim("C5", "Sparsity weighting beats data-size weighting", "hetlora-naive",
                   "HetLoRA's sparsity-weighted aggregation is part of its advantage (paper ablation)", runs),
        cost_claim(runs),
        tier_claim(runs, r_min),
    ])


def beats_hetlora(runs: dict, labels: list[str] | tuple[str, ...]) -> dict:
    """C8: does any core method beat HetLoRA? Each one vs hetlora, paired, two-sided, Holm across the family."""
    family = [diff_claim(f"C8:{label}", f"{label} vs hetlora", label, "", runs) for label in labels if label != "hetlora"]
    adjusted = holm({c["id"]: c["p"] for c in family if c.get("p") is not None})
    words = {"reproduced": "hetlora better", "not reproduced": "beats hetlora", "inconclusive": "inconclusive"}
    rows = [c | {"p_holm": adjusted.get(c["id"]), "verdict": words[verdict(c.get("mean_diff"), adjusted.get(c["id"]))]} for c in family]
    winners = [c["versus"] for c in rows if c["verdict"] == "beats hetlora"]
    answer = ("yes: " + ", ".join(winners)) if winners else "no method beats hetlora at this n" if adjusted else "no paired runs yet"
    return {"id": "C8", "claim": "Does any method beat HetLoRA?", "rows": rows, "winners": winners, "verdict": answer,
            "verdict_basis": "ppl(other) − ppl(hetlora) per seed, two-sided paired t-test, Holm across the core labels; "
                             "'beats hetlora' when the adjusted p < 0.05 with the other lower"}


def variant_rows(runs: dict, variants: list[str], r_min: int) -> list[dict]:
    """Each rank-health variant vs hetlora: final perplexity and the r_min tier's (paired 95 % intervals, unadjusted)."""
    rows = []
    for label in variants:
        final = diff_claim("final", "", label, "", runs)
        tier = diff_claim("tier", "", label, "", runs, key=lambda r: r["tier_ppl"].get(str(r_min)))
        rows.append({"label": label, "n": final["n"], "final_diff": final["mean_diff"], "final_ci95": final["ci95"],
                     "tier": r_min, "tier_n": tier["n"], "tier_diff": tier["mean_diff"], "tier_ci95": tier["ci95"]})
    return rows


def rouge_rows(runs: dict, labels: list[str] | tuple[str, ...]) -> list[dict]:
    """The paper's second metric against hetlora (a secondary outcome, never in a family): per seed, 100 · (ROUGE-L(hetlora)
    − ROUGE-L(label)) in F-measure points (> 0: hetlora better, as the perplexity rows read), paired, unadjusted."""
    rows = []
    for label in labels:
        if label == "hetlora":
            continue
        seeds, diffs = paired(runs, label, lambda r: None if r.get("rouge_l") is None else 100.0 * r["rouge_l"], sign=-1)
        mean, ci = t_interval(diffs) if diffs else (None, None)
        rows.append({"label": label, "n": len(diffs), "seeds": seeds, "diffs_points": diffs, "mean_points": mean,
                     "ci95_points": list(ci) if ci else None, "p": t_test(diffs) if len(diffs) > 1 else None})
    return rows


def curve_shape(run: dict) -> dict:
    """Where a run's per-round test perplexity is lowest, and whether it turns up afterwards while train loss falls."""
    curve = [(x, y) for x, y in run["curve"] if x > 0]
    best_round, best = min(curve, key=lambda point: point[1])
    last_round, last = curve[-1]
    train = {x: y for x, y in run["train_curve"] if y is not None}
    turns_up = best_round < last_round and last > best
    falls = train.get(last_round) < train.get(best_round) if turns_up and last_round in train and best_round in train else None
    return {"seed": run["seed"], "best_round": best_round, "best_round_ppl": best, "last_round_ppl": last,
            "final_eval_ppl": run["final_eval_ppl"], "turns_up": turns_up, "train_loss_falls_after_best": falls}


def long_regime(runs: list[dict]) -> dict:
    """The long regime (more local steps per visit): each method's curve shape per seed, and its paired differences."""
    if not runs:
        return {}
    grouped = by_label(runs)
    out: dict[str, Any] = {"methods": {}, "paired": {}}
    for label, seeds in grouped.items():
        shapes = [curve_shape(r) for r in seeds.values()]
        mean, ci = t_interval([r["final_eval_ppl"] for r in seeds.values()])
        overfit = [s["turns_up"] and bool(s["train_loss_falls_after_best"]) for s in shapes]
        out["methods"][label] = {"n": len(shapes), "final_eval_ppl_mean": mean, "final_eval_ppl_ci95": list(ci) if ci else None,
                                 "seeds": shapes, "overfitting_seeds": sum(overfit)}
    for other in grouped:  # every long label against hetlora (v3: the two HomLoRAs; v4 adds fslora and the best new method)
        if other != "hetlora" and "hetlora" in grouped:
            _, rel = relative_pct(grouped, other)
            mean_pct, ci_pct = t_interval(rel) if rel else (None, None)
            out["paired"][other] = diff_claim("long", "", other, "", grouped) | {
                "effect_pct": mean_pct, "ci95_pct": list(ci_pct) if ci_pct else None}  # as the core family's (family.pct)
    return out


def seed_blocks(runs: list[dict]) -> dict[str, dict]:
    """Per seed: the block its runs were made in, the commits and the compute (one block per seed, by :func:`check_blocks`)."""
    out: dict[str, dict] = {}
    for r in runs:
        entry = out.setdefault(str(r["seed"]), {"block": r["block"], "commits": set(), "runs": 0, "seconds": 0.0})
        entry["runs"] += 1
        entry["seconds"] += r["seconds"]
        if r.get("provenance"):
            entry["commits"].add(r["provenance"]["commit"])
    return {seed: e | {"commits": sorted(e["commits"])} for seed, e in sorted(out.items(), key=lambda kv: int(kv[0]))}


def summarise(runs: dict, order: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """One row per label (mean and interval over its seeds), in ``order`` (others last)."""
    rows = []
    for label, seeds in runs.items():
        ppl = [r["final_eval_ppl"] for r in seeds.values()]
        mean, ci = t_interval(ppl)
        any_run = next(iter(seeds.values()))
        live = [r["live_rank"][-1][1] for r in seeds.values() if r["live_rank"] and r["live_rank"][-1][1] is not None]
        rows.append({
            "label": label, "n": len(ppl), "final_eval_ppl_mean": mean, "final_eval_ppl_ci95": list(ci) if ci else None,
            "bytes_up_total": statistics.fmean(r["bytes_up_total"] for r in seeds.values()),
            "bytes_down_total": statistics.fmean(r["bytes_down_total"] for r in seeds.values()),
            "trainable_params": any_run["trainable_params"], "live_rank": statistics.fmean(live) if live else None,
            "pruning_events": statistics.fmean(r["pruning_events"] or 0 for r in seeds.values()),
            "seconds": statistics.fmean(r["seconds"] for r in seeds.values()), "lr": any_run["lr"],
            "rouge_l": statistics.fmean(rouge) if (rouge := [r["rouge_l"] for r in seeds.values() if r.get("rouge_l") is not None]) else None,
            "rouge_n": len(rouge),  # runs with a score (ROUGE-L is a secondary outcome: a run without one is still paired)
            "rouge_prompts_min": min((r["rouge_size"] for r in seeds.values() if r.get("rouge_size")), default=None),
        })
    rank = {label: i for i, label in enumerate(order)}
    return sorted(rows, key=lambda r: rank.get(r["label"], len(rank)))


