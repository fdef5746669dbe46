"""The README's study block, written from study.json alone (docs/algorithm.md §10, "What the report counts").

A number in the README that was copied by hand can drift from the runs it came from; this block is rendered from the
report (the same dict that study.json holds) and replaces the text between two marker lines of the README, so every
figure there rebuilds from the committed runs (``hetlora study --preset cpu-v4 --report-only --readme README.md``), and
a test checks the committed README against the committed study.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .report import best_vs_runner_up, ci_text, compute_per_block, fmt, p_text, ranking_text


def markers(preset: str) -> tuple[str, str]:
    """The lines that open and close a preset's generated block (the opening one may carry a comment after the name)."""
    return f"<!-- study:{preset} begin", f"<!-- study:{preset} end -->"


def progress_line(report: Mapping[str, Any]) -> tuple[str, bool]:
    """How many of the plan's runs are in, and whether every core run is (only then is a verdict read)."""
    sections = (report.get("plan") or {}).get("compute", {}).get("sections", {})
    core, long = sections.get("core", {}).get("runs"), sections.get("long", {}).get("runs")
    done_core, done_long = len(report.get("runs") or []), len(report.get("long_runs") or [])
    tuning = (report.get("config") or {}).get("tuning") or {}
    if core is None:  # a plan without its compute sections: say what is in, never "of None"
        return f"{done_core} core runs and {done_long} long-regime runs finished (the plan states no totals).", False
    line = (f"{done_core} of {core} core runs and {done_long} of {long} long-regime runs finished; tuning "
            f"{'complete' if tuning.get('complete') else 'under way'}.")
    return line, done_core >= core


def verdict_rows(report: Mapping[str, Any], complete: bool) -> list[str]:
    """The family's rows; until the study is complete each says interim, and how many seeds its row has finished (a
    C7 seed lacking hetlora's r_min tier perplexity is finished, and named, as study.md counts it)."""
    rows = report.get("comparisons") or []
    if not rows:
        return ["No comparison yet: hetlora and another core label have no seed in common."]
    planned = (report.get("plan") or {}).get("n") or len((report.get("config") or {}).get("seeds") or [])
    lines = ["| id | versus | effect, % of HetLoRA's perplexity (95 % CI; > 0: HetLoRA better) | the paper's % | n | Holm p | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in rows:
        finished = c["n"] + len(c.get("lacking_seeds") or [])
        verdict = (c["verdict"] if complete else f"{c['verdict']} (interim, {finished} of {planned} seeds)" if finished < planned
                   else f"{c['verdict']} (interim: other rows still owe seeds)")
        if c.get("lacking_seeds"):
            verdict += f" (seed(s) {', '.join(map(str, c['lacking_seeds']))} lack {c['lacking']})"
        lines.append(f"| {c['id']} | {c['label']} | {fmt(c.get('effect_pct'))} {ci_text(c.get('ci95_pct'))} | "
                     f"{fmt(c.get('paper_effect_pct'), 1)} | {c['n']} | {p_text(c.get('p_holm'))} | {verdict} |")
    return lines


def single_seed_line(report: Mapping[str, Any]) -> str:
    """The rows whose verdict one seed decides, or whose rank-test reading differs (the sensitivity section's gist)."""
    if "sensitivity" not in report:
        return "Resting on single seeds: not computed in this study.json (rebuild it with `make study-report`)."
    rows = [r for r in report["sensitivity"] if "median_pct" in r]
    if not rows:
        return "Resting on single seeds: no row tested yet."
    notes = []
    for r in rows:
        parts = []
        if r["verdict_flips_without"]:
            parts.append(f"its verdict changes without seed {', '.join(map(str, r['verdict_flips_without']))}")
        if r["wilcoxon_verdict"] != r["verdict"]:
            parts.append(f"the rank test reads it {r['wilcoxon_verdict']}")
        if parts and r["most_influential_seed"] is not None:
            parts.append(f"the seed that moves it most is {r['most_influential_seed']} ({fmt(r['effect_without_it_pct'])} % without it)")
        if parts:
            notes.append(f"{r['id']} ({r['label']}): " + "; ".join(parts))
    return ("Resting on single seeds (descriptive, study.md): " + (". ".join(notes) + "." if notes else
            "no row's verdict changes with any one seed left out, and the rank test reads every row the same way."))


def constraint_rows(report: Mapping[str, Any]) -> list[str]:
    """Which method for which constraint, in brief: the ranked constraints as a table (the first four labels), then the
    ones that change the algorithm, each label with what it runs as there."""
    lines = ["| your constraint | the labels it allows, best first (mean on the seeds all of them finished) | best vs runner-up, paired % (95 % CI), n | refused |",
             "|---|---|---|---|"]
    grouped = []
    for c in report.get("constraints") or []:
        refused = ", ".join(r["label"] for r in c["refused"]) or "none"
        if not c.get("ranked"):
            grouped.append(f"* **{c['need']}** (not ranked: the study ran nothing under it): "
                           + "; ".join(f"{', '.join(g['labels'])} → {g['runs_as']}" for g in c["becomes"]) + f". Refused: {refused}.")
            continue
        duel = best_vs_runner_up(c) + (f", n = {c['n']}" if c.get("runner_up") else "")
        by = "" if c.get("by_final_ppl") else f"; ranked by {c['score']}"
        lines.append(f"| {c['need']}{by} | {ranking_text(c, shown=4)} | {duel} | {refused} |")
    return lines + ([""] + grouped if grouped else [])


def long_rows(report: Mapping[str, Any]) -> list[str]:
    """The long regime in brief: each label's final perplexity, its paired effect against hetlora, its best rounds and
    how many seeds' curves turn up while the train loss falls (the paper's overfitting)."""
    long = report.get("long") or {}
    planned = (report.get("plan") or {}).get("compute", {}).get("sections", {}).get("long", {}).get("runs")
    if not long.get("methods"):
        return [f"**The long regime** ({long.get('design', 'more rounds')}): no run finished yet"
                + (f" (0 of {planned})." if planned else ".")]
    done = sum(m["n"] for m in long["methods"].values())
    lines = [f"**The long regime** ({long.get('design')}; descriptive, outside the family; "
             f"{done if planned is None else f'{done} of {planned}'} runs):", "",
             "| label | final test ppl (95 % CI) | vs hetlora, % (95 % CI) | best round per seed | curve turns up while train loss falls |",
             "|---|---:|---:|---|---:|"]
    for label, m in long["methods"].items():
        paired = long.get("paired", {}).get(label)
        versus = f"{fmt(paired.get('effect_pct'))} {ci_text(paired.get('ci95_pct'))}" if paired else "—"
        best = ", ".join(f"s{s['seed']}: {s['best_round']}" for s in sorted(m["seeds"], key=lambda s: s["seed"]))
        lines.append(f"| {label} | {fmt(m['final_eval_ppl_mean'])} {ci_text(m['final_eval_ppl_ci95'])} | {versus} | {best} | "
                     f"{m['overfitting_seeds']} of {m['n']} |")
    return lines


def rouge_line(report: Mapping[str, Any]) -> str:
    """ROUGE-L against hetlora in one line: the labels whose paired interval excludes 0, the rest said together."""
    every = [r for r in report.get("rouge_vs_hetlora") or [] if r["n"]]
    rows = [r for r in every if r.get("ci95_points")]
    if not rows:
        return "ROUGE-L (the paper's second metric, secondary): no paired runs yet."
    apart = [r for r in rows if r["ci95_points"][0] > 0 or r["ci95_points"][1] < 0]
    named = "; ".join(f"{r['label']} {fmt(r['mean_points'])} {ci_text(r['ci95_points'])}" for r in apart)
    short = [f"{r['label']} (n = {r['n']})" for r in every if not r.get("ci95_points")]
    return ("ROUGE-L (the paper's second metric; secondary, unadjusted; hetlora − label in F-measure points, > 0: hetlora "
            "better): " + (f"{named}; every other label's interval includes 0" if apart else "every label's interval includes 0")
            + (f" (no interval yet: {', '.join(short)})." if short else "."))


def compute_line(report: Mapping[str, Any]) -> str:
    """The compute each machine class spent (core, long-regime and tuning runs), from the report's seed blocks."""
    rows = compute_per_block(dict(report))
    if not rows:
        return "Compute: no run yet."
    return "Compute per machine class (sum of the runs' own seconds): " + "; ".join(
        f"{r['block']}: {r['runs']} runs, {r['seconds'] / 3600:.1f} h ({r['seeds']})" for r in rows) + "."


def readme_block(report: Mapping[str, Any], preset: str) -> str:
    """The block between the README's markers: where the study stands, its family's rows, what rests on one seed, and
    which method fits which constraint — every figure read off ``report``."""
    if (report.get("version") or 3) < 4:
        raise ValueError("the README block is written for a v4 report (one Holm family); this report is v3")
    progress, complete = progress_line(report)
    begin, end = markers(preset)
    head = (f"**Where study v4 stands** (rebuilt from its runs): {progress} "
            + ("Every core label has its registered seeds: these are its verdicts (Holm-adjusted, one family)."
               if complete else "Interim: each row pairs the seeds both methods have finished, and no verdict is read until "
                                "every core label has its registered seeds."))
    body = [f"{begin} (generated from study.json by `hetlora study --preset {preset} --report-only --readme README.md`; "
            "edit hetlora/study/readme.py, not this block) -->", "", head, ""]
    body += verdict_rows(report, complete) + ["", single_seed_line(report), "",
                                                "**Which method for which constraint** (these runs; descriptive, outside the "
                                                "registered family; study.md gives each refusal's reason):", ""]
    body += constraint_rows(report) + [""] + long_rows(report) + ["", rouge_line(report), "", compute_line(report), "", end]
    return "\n".join(body)


def load_report(path: Path) -> dict[str, Any]:
    """study.json as the report dict it was written from: the strings "inf", "-inf" and "nan" that strict JSON needs
    (report.strict_json) read back as numbers."""
    def number(value: Any) -> Any:
        if isinstance(value, str) and value in ("inf", "-inf", "nan"):
            return float(value)
        if isinstance(value, dict):
            return {k: number(v) for k, v in value.items()}
        if isinstance(value, list):
            return [number(v) for v in value]
        return value

    return number(json.loads(path.read_text()))


def update_readme(path: Path, preset: str, block: str) -> Path:
    """Replace the text between ``preset``'s two marker lines of ``path`` with ``block`` (the markers included); the
    rest of the file is left as it is. A README without both markers is refused, naming them."""
    text = path.read_text()
    begin, end = markers(preset)
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    if start < 0 or stop < start:
        raise ValueError(f"{path} has no generated block for {preset}: add a line starting '{begin}' and, below it, "
                         f"a line '{end}' where the study's numbers go")
    path.write_text(text[:start] + block + text[stop + len(end):])
    return path
