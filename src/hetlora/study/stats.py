"""Intervals, tests and verdicts for paired per-seed differences (the study and the plots use them).

Every quantile is exact for its degrees of freedom (scipy's t distribution). A family of claims
is corrected for multiplicity with Holm's step-down procedure, which controls the family-wise
error rate at α without assuming the claims are independent. "No worse" is a one-sided
non-inferiority test against a margin stated before the runs, never "not significantly worse".
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from scipy import stats as _scipy

ALPHA = 0.05


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    return float(_scipy.t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, tuple[float, float] | None]:
    """Mean and its two-sided ``level`` t-interval (None with fewer than two values, or with a value that is not finite:
    a diverged run's perplexity has no interval, and must not crash the report)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, None
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, (mean - half, mean + half)


def t_test(values: Sequence[float], null: float = 0.0, alternative: str = "two-sided") -> float:
    """p-value of the one-sample t-test of mean = ``null`` (``greater``: mean > null; ``less``: mean < null)."""
    if len(values) < 2:
        return 1.0
    if not all(math.isfinite(v) for v in values):
        return math.nan  # no test of a mean that is not a number (a Holm family counts it as p = 1)
    sd = statistics.stdev(values)
    mean = statistics.fmean(values)
    if sd == 0:
        side = {"two-sided": mean != null, "greater": mean > null, "less": mean < null}[alternative]
        return 0.0 if side else 1.0
    t = (mean - null) / (sd / math.sqrt(len(values)))
    df = len(values) - 1
    if alternative == "greater":
        return float(_scipy.t.sf(t, df))
    if alternative == "less":
        return float(_scipy.t.cdf(t, df))
    return float(2 * _scipy.t.sf(abs(t), df))


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values: the i-th smallest of m is multiplied by (m − i + 1), made monotone, capped at 1."""
    order = sorted(pvalues, key=pvalues.get)
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def verdict(mean: float | None, p_adjusted: float | None, alpha: float = ALPHA) -> str:
    """``reproduced`` when the (adjusted) test rejects with the mean on the paper's side (> 0), ``not reproduced``
    when it rejects on the other side, else ``inconclusive``."""
    if mean is None or p_adjusted is None or math.isnan(mean) or p_adjusted >= alpha:
        return "inconclusive"
    return "reproduced" if mean > 0 else "not reproduced"


def interval_verdict(ci: tuple[float, float] | None) -> str:
    """The same rule read off an interval: above 0 reproduced, below 0 not reproduced, else inconclusive."""
    if ci is None:
        return "inconclusive"
    return "reproduced" if ci[0] > 0 else "not reproduced" if ci[1] < 0 else "inconclusive"
