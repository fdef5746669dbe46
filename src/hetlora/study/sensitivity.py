"""How much each registered verdict rests on single seeds (descriptive; docs/algorithm.md §10, "Sensitivity").

Pure arithmetic over the Holm family that :func:`family.comparisons` built (each row's ``seeds`` and per-seed
``effects_pct``). The registered rule — paired t-test, Holm over the family — stays the verdict; this says how far a
reviewer can lean on it when a few seeds are rough (a tuned rate near instability, a run whose curve oscillates):

* **the rank-test reading**: the median per-seed effect, how many seeds fall on HetLoRA's side, and the two-sided
  Wilcoxon signed-rank p, Holm-adjusted over the same family, read with the same rule (its side: the sign of W+ − W−);
  a verdict the t-test reaches only through one large seed does not survive it;
* **one seed left out**: for each seed, every row recomputed without it and the family Holm-adjusted again; the row's
  effect range over those, the seed that moves it most, and the seeds whose removal changes its verdict.

Added after registration (after seeds 0–3 of study v4 had been seen): it changes no verdict and enters no family.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from scipy import stats as _scipy

from .family import words
from .stats import holm, t_test


def wilcoxon_p(values: Sequence[float]) -> float | None:
    """Two-sided exact Wilcoxon signed-rank p of "median = 0": zeros dropped, tied |values| given their mid-rank, and
    the null distribution of W+ (each rank's sign a fair coin) counted exactly, so ties do not push it onto a normal
    approximation (scipy's does, and per-seed effects tie often). None with fewer than two values, 1 when all are 0."""
    if len(values) < 2:
        return None
    nonzero = [v for v in values if v != 0]
    if not nonzero:
        return 1.0
    doubled = [int(round(2 * r)) for r in _scipy.rankdata([abs(v) for v in nonzero])]  # mid-ranks are multiples of 1/2
    counts = [1] + [0] * sum(doubled)  # counts[w]: sign patterns whose positive ranks sum to w (in half-ranks)
    for r in doubled:
        counts = [c + (counts[w - r] if w >= r else 0) for w, c in enumerate(counts)]
    observed = sum(r for r, v in zip(doubled, nonzero) if v > 0)
    total = 2 ** len(nonzero)
    below, above = sum(counts[: observed + 1]) / total, sum(counts[observed:]) / total
    return min(1.0, 2 * min(below, above))


def signed_rank_side(values: Sequence[float]) -> float:
    """W+ − W− (mid-ranks, zeros dropped): the side the signed-rank test leans to (> 0: HetLoRA's), which a median of 0
    cannot say (a C4 trade of exactly 0 on the seeds where pruning never fired)."""
    nonzero = [v for v in values if v != 0]
    if not nonzero:
        return 0.0
    ranks = _scipy.rankdata([abs(v) for v in nonzero])
    return float(sum(r if v > 0 else -r for r, v in zip(ranks, nonzero)))


def tested(row: Mapping[str, Any]) -> bool:
    """A row the registered rule tested: finite per-seed effects on at least two seeds."""
    values = row.get("effects_pct") or []
    return len(values) >= 2 and all(math.isfinite(v) for v in values)


def _adjusted(pvalues: Mapping[str, float | None]) -> dict[str, float]:
    """Holm over the whole family; a row without a p counts as 1 (as the registered family does)."""
    return holm({cid: p if p is not None and math.isfinite(p) else 1.0 for cid, p in pvalues.items()})


def _verdict(row: Mapping[str, Any], effect: float | None, p_holm: float) -> str:
    return words({"id": row["id"], "label": row["label"], "effect_pct": effect}, p_holm)


def without_seed(family: Sequence[Mapping[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Every row's mean effect and verdict with ``seed`` left out of every row, the family Holm-adjusted again."""
    kept = {}
    for row in family:
        values = [v for s, v in zip(row.get("seeds") or [], row.get("effects_pct") or []) if s != seed]
        # a row the registered rule left untested stays untested (p = 1), whichever seed is left out
        ok = tested(row) and len(values) >= 2 and all(math.isfinite(v) for v in values)
        kept[row["id"]] = (statistics.fmean(values) if ok else None, t_test(values) if ok else None)
    adjusted = _adjusted({cid: p for cid, (_, p) in kept.items()})
    return {row["id"]: {"effect_pct": kept[row["id"]][0],
                        "verdict": row["verdict"] if not tested(row) else _verdict(row, kept[row["id"]][0], adjusted[row["id"]])}
            for row in family}


def sensitivity(family: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per row of the family (in its order): the rank-test reading and the leave-one-seed-out reading."""
    ranks = {row["id"]: wilcoxon_p(row["effects_pct"]) if tested(row) else None for row in family}
    ranks_holm = _adjusted(ranks)
    seeds = sorted({s for row in family if tested(row) for s in row["seeds"]})
    left_out = {s: without_seed(family, s) for s in seeds}
    out = []
    for row in family:
        entry: dict[str, Any] = {"id": row["id"], "label": row["label"], "verdict": row["verdict"], "n": row.get("n", 0)}
        if not tested(row):
            out.append(entry | {"note": "not tested by the registered rule"})
            continue
        values, median = row["effects_pct"], statistics.median(row["effects_pct"])
        mean = statistics.fmean(values)
        loo = {s: left_out[s][row["id"]] for s in row["seeds"]}
        moved = {s: abs(r["effect_pct"] - mean) for s, r in loo.items() if r["effect_pct"] is not None}
        most = max(moved, key=moved.get) if moved else None
        effects = [r["effect_pct"] for r in loo.values() if r["effect_pct"] is not None]
        out.append(entry | {
            "median_pct": median, "seeds_on_hetloras_side": sum(v > 0 for v in values),
            "seeds_on_other_side": sum(v < 0 for v in values),
            "wilcoxon_p": ranks[row["id"]], "wilcoxon_p_holm": ranks_holm[row["id"]],
            "wilcoxon_verdict": _verdict(row, signed_rank_side(values), ranks_holm[row["id"]]),
            "leave_one_out_pct": [min(effects), max(effects)] if effects else None,
            "most_influential_seed": most, "effect_without_it_pct": loo[most]["effect_pct"] if most is not None else None,
            "verdict_flips_without": [s for s, r in loo.items() if r["verdict"] != row["verdict"]],
        })
    return out
