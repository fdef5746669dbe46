"""The study's pre-registered design: seeds per claim from the paired spread of earlier runs.

Written once into ``<results>/plan.json`` before the first run of a study (docs/algorithm.md §10) and
never changed after: a study whose design in code no longer matches its registered plan refuses to
run. The plan states, for every claim, the paired mean and sd of the earlier study it was sized
from, the seeds needed for 80 % power at the Holm-adjusted level of the claim's first step (α/m,
the most demanding), the power the chosen n has, and so which claims are expected to stay
inconclusive at that n if the earlier effects hold. A user reads the verdicts against it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from scipy import stats as _scipy

from .stats import ALPHA

POWER = 0.8


def power(effect: float, sd: float, n: int, alpha: float, sides: int = 2) -> float:
    """Power of the one-sample (paired) t-test at level ``alpha`` for a true mean ``effect`` with spread ``sd``."""
    if n < 2:
        return 0.0
    if sd == 0:
        return 1.0 if effect != 0 else 0.0
    df, shift = n - 1, abs(effect) / sd * math.sqrt(n)
    critical = float(_scipy.t.ppf(1 - alpha / sides, df))
    upper = float(_scipy.nct.sf(critical, df, shift))
    if math.isnan(upper):  # scipy's noncentral t gives up far in the tail, where the power is ~1
        upper = statistics.NormalDist().cdf(shift - critical)
    lower = float(_scipy.nct.cdf(-critical, df, shift)) if sides == 2 else 0.0
    return min(1.0, upper + (0.0 if math.isnan(lower) else lower))


def seeds_needed(effect: float, sd: float, alpha: float, sides: int = 2, target: float = POWER, most: int = 200) -> int | None:
    """The smallest n ≥ 2 with ``power`` ≥ ``target`` (None when even ``most`` seeds would not do)."""
    return next((n for n in range(2, most + 1) if power(effect, sd, n, alpha, sides) >= target), None)


def size_claim(cid: str, diffs: Sequence[float], family_size: int, n_run: int, margin_pct: float | None = None) -> dict[str, Any]:
    """One claim's sizing: the earlier paired differences → n needed and the power of ``n_run`` seeds.

    A non-inferiority claim (``margin_pct`` given, C4) is one-sided against −margin, so its effect
    is the distance of the earlier mean from −margin.
    """
    alpha = ALPHA / family_size
    if len(diffs) < 2:
        return {"id": cid, "prior_n": len(diffs), "note": "no earlier paired runs: sized by the minimum only"}
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    effect, sides = (mean + margin_pct, 1) if margin_pct is not None else (mean, 2)
    p = power(effect, sd, n_run, alpha, sides)
    return {"id": cid, "prior_n": len(diffs), "prior_mean": mean, "prior_sd": sd, "alpha_first_step": alpha,
            "sides": sides, "seeds_needed_80pct": seeds_needed(effect, sd, alpha, sides), "power_at_n": p,
            "expected": "powered (≥ 80 %) if the earlier effect holds" if p >= POWER else "underpowered at this n (< 80 %): may stay inconclusive"}


def preregister(design: Mapping[str, Any], prior_claims: Sequence[Mapping[str, Any]], prior_c8: Mapping[str, Sequence[float]],
                prior_source: str) -> dict[str, Any]:
    """The plan: ``design`` (what will run and how it is judged) and the sizing of every claim from earlier runs."""
    n = len(design["core_seeds"])
    main = [size_claim(c["id"], c.get("diffs") or [], len(prior_claims), n,
                       design["equivalence_margin_pct"] if c["id"] == "C4" else None) for c in prior_claims]
    c8 = [size_claim(f"C8:{label}", prior_c8.get(label, []), max(1, len(design["core_labels"]) - 1), n)
          for label in design["core_labels"] if label != "hetlora"]
    needed = sorted(c["seeds_needed_80pct"] or 10**6 for c in main if "seeds_needed_80pct" in c)
    median = statistics.median(needed) if needed else None
    return {"design": dict(design), "sized_from": prior_source, "claims": main, "c8": c8, "median_seeds_needed_c1_c7": median,
            "rule": (f"n = {n} seeds for every core label, fixed before any run: at least 10, and about the median of "
                     f"what C1–C7 need for 80 % power at their Holm first-step level ({median}); a claim whose earlier "
                     "effect needs more is listed as expected inconclusive, never given more seeds after the fact; "
                     f"a report with fewer than {n} seeds is interim")}


N_MIN, N_MAX = 10, 20  # study v4: the fewest seeds a core label runs, and the most its compute budget allows (plan.compute)


def size_family(prior_rows: Sequence[Mapping[str, Any]], n_run: int | None = None) -> dict[str, Any]:
    """Study v4's sizing (docs/algorithm.md §10): every comparison of the one Holm family from the earlier study's per-seed
    effects (% of hetlora's perplexity, the statistic v4 tests), at α/m; n = the median of what the comparisons with an
    earlier estimate need for 80 % power, within [N_MIN, N_MAX]. A comparison needing more is expected inconclusive."""
    m = len(prior_rows)
    alpha = ALPHA / m
    needed: list[int] = []
    sized = []
    for row in prior_rows:
        effects = list(row.get("effects_pct") or [])
        entry: dict[str, Any] = {"id": row["id"], "label": row["label"], "prior_n": len(effects), "alpha_first_step": alpha}
        if len(effects) >= 2:
            mean, sd = statistics.fmean(effects), statistics.stdev(effects)
            need = seeds_needed(mean, sd, alpha)
            needed.append(need or 10**6)
            entry |= {"prior_mean_pct": mean, "prior_sd_pct": sd, "seeds_needed_80pct": need}
        else:
            entry["note"] = "no earlier paired runs: n by the others"
        sized.append(entry)
    median = math.ceil(statistics.median(needed)) if needed else N_MIN
    n = n_run if n_run is not None else min(N_MAX, max(N_MIN, median))
    for entry in sized:
        if "prior_mean_pct" in entry:
            entry["power_at_n"] = power(entry["prior_mean_pct"], entry["prior_sd_pct"], n, alpha)
            entry["expected"] = ("powered (≥ 80 %) if the earlier effect holds" if entry["power_at_n"] >= POWER
                                 else "underpowered at this n (< 80 %): may stay inconclusive")
    return {"family_size": m, "median_seeds_needed": median, "n": n, "comparisons": sized,
            "rule": (f"n = {n} seeds for every core label, fixed before any run: the median of what the family's comparisons need "
                     f"for 80 % power at Holm's first-step level α/{m} from the earlier study's paired effects ({median}), "
                     f"within [{N_MIN}, {N_MAX}] (the most the compute budget allows); a comparison whose earlier effect needs "
                     "more is listed as expected inconclusive and never given more seeds after the fact")}


def seconds_per_round(prior_runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean wall seconds per round of the earlier study's runs, per machine class (device, precision): what a round costs
    where each class ran, evaluation included."""
    per_class: dict[str, list[float]] = {}
    for run in prior_runs:
        prov, rounds = run.get("provenance") or {}, len(run["curve"]) - 1
        if rounds > 0:
            per_class.setdefault(f"{prov.get('device', 'unknown')}, {prov.get('precision', '?')}", []).append(run["seconds"] / rounds)
    return {cls: statistics.fmean(v) for cls, v in per_class.items()}


def compute_plan(sections: Mapping[str, tuple[int, int, bool]], per_round: Mapping[str, float], rouge_seconds: float = 0.0) -> dict[str, Any]:
    """≈ runs × rounds × seconds per round on each machine class, + ROUGE-L's responses for the runs that score them:
    ``sections`` maps a part of the study to (runs, rounds per run, whether its runs score ROUGE-L)."""
    rounds = sum(n * r for n, r, _ in sections.values())
    runs = sum(n for n, _, _ in sections.values())
    scored = sum(n for n, _, rouge in sections.values() if rouge)
    return {"sections": {k: {"runs": n, "rounds_per_run": r, "rouge_l": rouge} for k, (n, r, rouge) in sections.items()},
            "runs": runs, "rounds": rounds, "seconds_per_round_by_class": dict(per_round), "rouge_seconds_per_run": rouge_seconds,
            "hours_by_class": {cls: (rounds * sec + scored * rouge_seconds) / 3600 for cls, sec in per_round.items()}}
