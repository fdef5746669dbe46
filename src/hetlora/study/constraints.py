"""Which method for which constraint, from a study's own runs (docs/algorithm.md §10, "Which method for which constraint").

A user rarely asks "which method has the lowest perplexity"; they ask it under a constraint their deployment sets:
devices of different memory, a device that runs only the smallest tier, secure aggregation, differential privacy,
a 4-bit GGUF base on the device, a thin uplink. Each constraint here is a question put to the code, not a list kept
by hand: a label is allowed when its own study config, changed the way the constraint changes it, passes
:meth:`RunConfig.validate` (the one validation path every run goes through), so the table can never promise what a
run would refuse. The label's quality under the constraint is the study's measurement *without* it (no noise, no secure
sum, pruning as the label prunes): the table ranks what the study measured among the labels the constraint allows, and says so.

Descriptive, added after v4's registration: nothing here enters the Holm family. Each row ranks its allowed labels by
their mean over the seeds *all of them* finished (a paired design: the same seeds for every label), and gives the
best label's paired difference to the runner-up (unadjusted 95 % t-interval, exploratory: the best was picked on the
same runs, so the interval flatters it) and, where the registered family has them, the two leaders' registered
comparisons with hetlora.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..config import RunConfig
from ..methods import METHODS
from .stats import t_interval

FINAL_PPL = "final test perplexity"
Runs = Mapping[str, Mapping[int, Mapping[str, Any]]]  # label → seed → a loaded run (claims.load_runs)
NOT_PLAIN = ("C4", "C6", "C7")  # family rows that are not ppl(label) vs ppl(hetlora): the trade, the gap, the tier


@dataclass(frozen=True)
class Constraint:
    """One deployment constraint: which labels it allows (``allows(config)`` → None, or why not) and what it ranks them
    by (``measure(run, config)``, lower is better; None where a run did not measure it)."""

    key: str
    need: str
    allows: Callable[[RunConfig], str | None]
    score: str = FINAL_PPL
    measure: Callable[[Mapping[str, Any], RunConfig], float | None] = lambda run, cfg: run["final_eval_ppl"]


def refused_by(**changes: Any) -> Callable[[RunConfig], str | None]:
    """The constraint as a config change: a label is allowed when its config so changed still validates."""
    def check(cfg: RunConfig) -> str | None:
        try:
            dataclasses.replace(cfg, **changes).validate()
        except ValueError as e:
            return str(e).removeprefix("invalid configuration: ")
        return None
    return check


def own_rank(cfg: RunConfig) -> str | None:
    """Each client trains the rank its tier affords: not one rank for all (HomLoRA), not the whole model (FFT)."""
    method = METHODS[cfg.method]
    if method.client_kind == "fft":
        return "every client trains the whole model"
    if method.uniform_rank:
        return f"every client trains rank {cfg.global_rank}"
    return None


def smallest_tier(cfg: RunConfig) -> str | None:
    """A model an r_min device can hold: a heterogeneous global adapter truncated to r_min, or a HomLoRA at ≤ r_min."""
    method = METHODS[cfg.method]
    if method.uniform_rank and cfg.global_rank <= cfg.r_min:
        return None
    return own_rank(cfg)


def any_label(cfg: RunConfig) -> str | None:
    return None


def smallest_tier_ppl(run: Mapping[str, Any], cfg: RunConfig) -> float | None:
    """The r_min device's model: a HomLoRA at r_min is its own; a heterogeneous global adapter is truncated to r_min."""
    if METHODS[cfg.method].uniform_rank:
        return run["final_eval_ppl"]
    return (run.get("tier_ppl") or {}).get(str(cfg.r_min))


def upload_mb(run: Mapping[str, Any], cfg: RunConfig) -> float:
    return run["bytes_up_total"] / 1e6


CONSTRAINTS = (
    Constraint("own-rank", "devices of different memory, each training the rank it affords", own_rank),
    Constraint("smallest-tier", "a device that holds only the smallest tier's rank (r_min)", smallest_tier,
               score="the r_min model's test perplexity (the global adapter truncated to r_min; a HomLoRA at r_min its own)",
               measure=smallest_tier_ppl),
    Constraint("secagg", "secure aggregation (SecAgg+: the server sees only the sum)",
               refused_by(secure_aggregation=True, norm_bound=None)),
    Constraint("dp", "differential privacy (DP-FedAvg, client-level)", refused_by(dp_clip=1.0, dp_noise=1.0, prune=False, sampling="uniform")),
    Constraint("gguf", "a 4-bit GGUF base on the device (frozen, never dense)", refused_by(base_weights="gguf")),
    Constraint("upload", "the thinnest uplink", any_label, score="upload per run (MB)", measure=upload_mb),
)


def constraint_rows(runs: Runs, configs: Mapping[str, RunConfig], family: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per constraint: the labels it allows ranked on their common seeds, the labels it refuses and why."""
    return [constraint_row(c, runs, configs, family or []) for c in CONSTRAINTS]


def constraint_row(constraint: Constraint, runs: Runs, configs: Mapping[str, RunConfig], family: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = {label: constraint.allows(cfg) for label, cfg in configs.items()}
    allowed = [label for label, why in reasons.items() if why is None]
    refused = [{"label": label, "method": configs[label].method, "why": why} for label, why in reasons.items() if why is not None]
    scores = {label: {s: v for s, r in runs.get(label, {}).items() if (v := constraint.measure(r, configs[label])) is not None}
              for label in allowed}
    unscored = [{"label": label, "why": "its runs do not measure it" if runs.get(label) else "no finished run yet"}
                for label in allowed if not scores[label]]
    ranked = [label for label in allowed if scores[label]]
    seeds = sorted(set.intersection(*(set(scores[label]) for label in ranked))) if ranked else []
    base = {"key": constraint.key, "need": constraint.need, "score": constraint.score, "allowed": allowed, "refused": refused,
            "unscored": unscored, "seeds": seeds, "n": len(seeds)}
    if not seeds:
        return base | {"ranking": [], "best": None, "note": "no seed on which every allowed label finished yet"}
    means = {label: statistics.fmean(scores[label][s] for s in seeds) for label in ranked}
    ranking = sorted(ranked, key=lambda label: (not math.isfinite(means[label]), means[label]))
    best = ranking[0]
    ppl = {label: statistics.fmean(runs[label][s]["final_eval_ppl"] for s in seeds) for label in ranked}
    out = base | {"ranking": [{"label": label, "mean": means[label], "final_ppl": ppl[label]} for label in ranking], "best": best}
    if len(ranking) > 1:
        out["runner_up"] = ranking[1]
        out["best_vs_runner_up_pct"] = paired_pct([scores[best][s] for s in seeds], [scores[ranking[1]][s] for s in seeds])
    if constraint.score == FINAL_PPL:  # the registered family's own test of the leaders against hetlora, where it has one
        out["registered"] = [{k: c.get(k) for k in ("id", "label", "effect_pct", "ci95_pct", "p_holm", "verdict", "n")}
                             for c in family if c["label"] in ranking[:2] and c["id"] not in NOT_PLAIN]
    return out


def paired_pct(best: list[float], other: list[float]) -> dict[str, Any]:
    """Per seed, 100 · (best − other) / other: its mean and unadjusted 95 % t-interval (exploratory, outside the family)."""
    values = [100.0 * (b - o) / o for b, o in zip(best, other)]
    if not all(map(math.isfinite, values)):
        return {"mean": None, "ci95": None, "n": len(values), "note": "a value that is not finite"}
    mean, ci = t_interval(values)
    return {"mean": mean, "ci95": list(ci) if ci else None, "n": len(values)}
