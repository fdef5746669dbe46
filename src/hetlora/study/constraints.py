"""Which method for which constraint, from a study's own runs (docs/algorithm.md §10, "Which method for which constraint").

A user rarely asks "which method has the lowest perplexity"; they ask it under a constraint their deployment sets:
devices of mixed memory, a device that holds only the smallest tier, secure aggregation, differential privacy, a 4-bit
GGUF base on the device, a thin uplink. Each constraint here is a question put to the code, not a list kept by hand: a
label is allowed when its own study config, changed the way the constraint changes it, passes :meth:`RunConfig.validate`
(the one validation path every run goes through), so the table never promises what a run would refuse.

Two kinds of constraint. One that leaves a label's algorithm as the study ran it (its own rank per device, the r_min
device, the uplink; a GGUF base, trained against the same 4-bit weights by every label it allows) is *ranked* on the
study's runs: the allowed labels by their mean over the seeds all of them finished (paired: the same seeds for every
label), the best label's paired difference to the runner-up (unadjusted 95 % t-interval, exploratory: the best was
picked on the same runs, so it flatters it) and the registered family's own rows that bear on it. One that changes the
algorithm (DP-FedAvg replaces the weighting and turns pruning off; SecAgg+ sums only the components enough clients hold,
under a client-side clip) is *not* ranked: the study ran nothing under it, so the row lists what each allowed label
becomes there, labels that become the same algorithm together.

Descriptive, added after v4's registration: nothing here enters the Holm family.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..config import RunConfig
from ..methods import METHODS
from ..methods.base import AggregationMethod
from .stats import t_interval

FINAL_PPL = "final test perplexity"
Runs = Mapping[str, Mapping[int, Mapping[str, Any]]]  # label → seed → a loaded run (claims.load_runs)
Family = Sequence[Mapping[str, Any]]  # the registered comparisons with hetlora (family.comparisons)
PROBE_BUDGET_MB = 4096.0  # any valid budget: the constraint asks whether budgets are taken at all
NOT_PLAIN = ("C4", "C6", "C7")  # family rows that are not ppl(label) vs ppl(hetlora): the trade, the gap, the tier


def final_ppl(run: Mapping[str, Any], cfg: RunConfig) -> float:
    return run["final_eval_ppl"]


def leaders_rows(family: Family, leaders: Sequence[str]) -> list[Mapping[str, Any]]:
    """The family's plain rows (ppl(label) vs ppl(hetlora)) of the two leaders, where they have one."""
    return [c for c in family if c["label"] in leaders[:2] and c["id"] not in NOT_PLAIN]


def c7_row(family: Family, leaders: Sequence[str]) -> list[Mapping[str, Any]]:
    """C7 is the r_min device's registered question: hetlora truncated to r_min against HomLoRA trained at r_min."""
    return [c for c in family if c["id"] == "C7"]


@dataclass(frozen=True)
class Constraint:
    """One deployment constraint: which labels it allows (``allows(config)`` → None, or why not); for a ranked one, what
    it ranks them by (``measure(run, config)``, lower is better, None where a run did not measure it) and the family's
    rows that bear on it; for one that changes the algorithm, ``becomes(config)``: what a label runs as under it."""

    key: str
    need: str
    allows: Callable[[RunConfig], str | None]
    score: str = FINAL_PPL
    measure: Callable[[Mapping[str, Any], RunConfig], float | None] = final_ppl
    registered: Callable[[Family, Sequence[str]], list[Mapping[str, Any]]] = leaders_rows
    becomes: Callable[[RunConfig], str] | None = None  # set: the study's numbers do not speak to it (not ranked)
    caveat: str = ""
    digits: int = 2  # how the score is printed


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
    """Each client trains a rank of its own: not one rank for all (HomLoRA), not the whole model (FFT)."""
    method = METHODS[cfg.method]
    if method.client_kind == "fft":
        return "every client trains the whole model"
    if method.uniform_rank:
        return f"every client trains rank {cfg.global_rank}"
    return None


def rank_from_memory(cfg: RunConfig) -> str | None:
    """Each device at the rank its memory affords: its own rank (:func:`own_rank`), fitted from a memory budget, which
    the config refuses where no rank sets a client's memory (fft)."""
    return own_rank(cfg) or refused_by(memory_budget_mb=PROBE_BUDGET_MB)(cfg)


def smallest_tier(cfg: RunConfig) -> str | None:
    """A model an r_min device can hold: a heterogeneous global adapter truncated to r_min, or a HomLoRA at ≤ r_min."""
    method = METHODS[cfg.method]
    if method.uniform_rank and cfg.global_rank <= cfg.r_min:
        return None
    return own_rank(cfg)


def any_label(cfg: RunConfig) -> str | None:
    """Every label can be asked how much it uploads."""
    return None


def smallest_tier_ppl(run: Mapping[str, Any], cfg: RunConfig) -> float | None:
    """The r_min device's model: a HomLoRA at r_min is its own; a heterogeneous global adapter is truncated to r_min."""
    if METHODS[cfg.method].uniform_rank:
        return run["final_eval_ppl"]
    return (run.get("tier_ppl") or {}).get(str(cfg.r_min))


def upload_mb(run: Mapping[str, Any], cfg: RunConfig) -> float:
    """What the clients sent in the whole run, MB."""
    return run["bytes_up_total"] / 1e6


def ranks_of(cfg: RunConfig) -> str:
    return f"rank {cfg.global_rank} on every client" if METHODS[cfg.method].uniform_rank else "each client's own rank"


def own_step(cfg: RunConfig) -> str:
    """The method's step on the aggregate alone (hetlora-svd's re-factoring), which both constrained rounds keep."""
    method = METHODS[cfg.method]
    return f", then {cfg.method}'s step on the sum" if type(method).finish is not AggregationMethod.finish else ""


def under_dp(cfg: RunConfig) -> str:
    """DP-FedAvg (docs/algorithm.md §6): clipped changes, equally weighted, noised; no pruning; the method's own step."""
    return f"DP-FedAvg at {ranks_of(cfg)}{own_step(cfg)}"


def under_secagg(cfg: RunConfig) -> str:
    """SecAgg+ (docs/algorithm.md §6.1): the method's client-side weight; only components enough clients hold are summed."""
    method = METHODS[cfg.method]
    prunes = ", pruning" if cfg.prunes else ""
    covered = "" if method.uniform_rank else " (only the components enough clients hold)"
    return f"{method.secure_weight}-weighted secure sum at {ranks_of(cfg)}{covered}{prunes}{own_step(cfg)}"


CONSTRAINTS = (
    Constraint("own-rank", "devices of mixed memory, each training the rank it affords", rank_from_memory,
               caveat="at the study's ranks; at one budget, clients that fold into dense weights fit lower ranks "
                      "(footprint per client kind: README, Client memory)"),
    Constraint("smallest-tier", "a device that holds only the smallest tier's rank (r_min)", smallest_tier,
               score="the r_min model's test perplexity (the global adapter truncated to r_min; a HomLoRA at r_min its own)",
               measure=smallest_tier_ppl, registered=c7_row),
    Constraint("gguf", "a 4-bit GGUF base on the device (frozen, never dense)", refused_by(base_weights="gguf"),
               caveat="measured on the study's dense base"),
    Constraint("upload", "the thinnest uplink", any_label, score="upload per run (MB)", measure=upload_mb,
               registered=lambda family, leaders: [], digits=0),
    Constraint("secagg", "secure aggregation (SecAgg+: the server sees only the sum)",
               refused_by(secure_aggregation=True, norm_bound=None), becomes=under_secagg),
    Constraint("dp", "differential privacy (DP-FedAvg, client-level)",
               refused_by(dp_clip=1.0, dp_noise=1.0, prune=False, sampling="uniform"), becomes=under_dp),
)


def constraint_rows(runs: Runs, configs: Mapping[str, RunConfig], family: Family | None = None) -> list[dict[str, Any]]:
    """One row per constraint: the labels it allows (ranked, or grouped by what they become), those it refuses and why."""
    return [constraint_row(c, runs, configs, family or []) for c in CONSTRAINTS]


def constraint_row(constraint: Constraint, runs: Runs, configs: Mapping[str, RunConfig], family: Family) -> dict[str, Any]:
    reasons = {label: constraint.allows(cfg) for label, cfg in configs.items()}
    allowed = [label for label, why in reasons.items() if why is None]
    row = {"key": constraint.key, "need": constraint.need, "score": constraint.score, "caveat": constraint.caveat,
           "digits": constraint.digits, "by_final_ppl": constraint.score == FINAL_PPL,
           "allowed": allowed, "ranked": constraint.becomes is None,
           "refused": [{"label": label, "method": configs[label].method, "why": why} for label, why in reasons.items() if why is not None]}
    if constraint.becomes is not None:
        return row | {"becomes": grouped_by(allowed, lambda label: constraint.becomes(configs[label]))}
    return row | ranking(constraint, runs, configs, allowed, family)


def grouped_by(labels: Sequence[str], key: Callable[[str], str]) -> list[dict[str, Any]]:
    """Labels that run as the same algorithm under a constraint, together, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(key(label), []).append(label)
    return [{"runs_as": runs_as, "labels": members} for runs_as, members in groups.items()]


def scores_of(constraint: Constraint, runs: Runs, configs: Mapping[str, RunConfig], labels: Sequence[str]) -> dict[str, dict[int, float]]:
    """Each label's score per finished seed (a run that did not measure it is left out)."""
    return {label: {s: v for s, r in runs.get(label, {}).items() if (v := constraint.measure(r, configs[label])) is not None}
            for label in labels}


def ranking(constraint: Constraint, runs: Runs, configs: Mapping[str, RunConfig], allowed: Sequence[str], family: Family) -> dict[str, Any]:
    """The allowed labels by their mean on the seeds all of them have a score for; best vs runner-up; the family's rows."""
    scores = scores_of(constraint, runs, configs, allowed)
    unscored = [{"label": label, "why": "its runs do not measure it" if runs.get(label) else "no finished run yet"}
                for label in allowed if not scores[label]]
    scored = [label for label in allowed if scores[label]]
    seeds = sorted(set.intersection(*(set(scores[label]) for label in scored))) if scored else []
    out: dict[str, Any] = {"unscored": unscored, "seeds": seeds, "n": len(seeds), "ranking": [], "best": None}
    if not seeds:
        return out | {"note": "no seed on which every allowed label finished yet"}
    means = {label: statistics.fmean(scores[label][s] for s in seeds) for label in scored}
    order = sorted(scored, key=lambda label: (not math.isfinite(means[label]), means[label]))
    ppl = {label: statistics.fmean(runs[label][s]["final_eval_ppl"] for s in seeds) for label in scored}
    out |= {"ranking": [{"label": label, "mean": means[label], "final_ppl": ppl[label]} for label in order], "best": order[0],
            "tied_with_best": [label for label in order[1:] if all(scores[label][s] == scores[order[0]][s] for s in seeds)],
            "registered": [{k: c.get(k) for k in ("id", "label", "effect_pct", "ci95_pct", "p_holm", "verdict", "n")}
                           for c in constraint.registered(family, order)]}
    if len(order) > 1:
        out |= {"runner_up": order[1],
                "best_vs_runner_up_pct": paired_pct([scores[order[0]][s] for s in seeds], [scores[order[1]][s] for s in seeds])}
    return out


def paired_pct(best: list[float], other: list[float]) -> dict[str, Any]:
    """Per seed, 100 · (best − other) / other: its mean and unadjusted 95 % t-interval (exploratory, outside the family)."""
    values = [100.0 * (b - o) / o for b, o in zip(best, other)]
    if not all(map(math.isfinite, values)):
        return {"mean": None, "ci95": None, "n": len(values), "note": "a value that is not finite"}
    mean, ci = t_interval(values)
    return {"mean": mean, "ci95": list(ci) if ci else None, "n": len(values)}
