"""Study v4's learning rates: every label its own, from a grid that brackets its optimum (docs/algorithm.md §10).

Pure arithmetic over the tuning runs' validation perplexities; the runs themselves are made by
``Study.tune`` (study/runs.py). The rule, registered in the plan before any run:

* a label starts from its first grid (three neighbouring rates of :data:`LADDER`) and runs every rate on
  every tuning seed;
* a rate's score is the geometric mean of its seeds' validation perplexities (a diverged run, one with a round
  rolled back for a non-finite aggregate, scores +inf: :func:`validation_score`);
* the chosen rate is the lowest score (a tie goes to the smaller rate);
* while the chosen rate is the grid's smallest or largest and the ladder goes further on that side, the
  next rate of the ladder on that side is added and run. So the chosen rate is never the grid's edge
  unless the ladder ends there, and then the label is marked ``bracketed: False``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# Half-decade steps (1, 3 per decade): the rates a grid can hold.
LADDER: tuple[float, ...] = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def rate_key(lr: float) -> str:
    """How a rate is written in tuning.json and in a tuning run's directory name."""
    return f"{lr:g}"


def score(perplexities: Sequence[float]) -> float:
    """A rate's score: the geometric mean of its seeds' validation perplexities (+inf if any is not finite)."""
    if not perplexities:
        raise ValueError("a rate's score needs at least one finished tuning run")
    if any(not math.isfinite(p) or p <= 0 for p in perplexities):
        return math.inf
    return math.exp(math.fsum(math.log(p) for p in perplexities) / len(perplexities))


def validation_score(summary: Mapping) -> float:
    """What one tuning run counts for: its final validation perplexity, or +inf when it diverged. A run whose aggregate
    was not finite in some round had that round rolled back (server.runner) and ends with a finite perplexity of an
    earlier model; it diverged all the same (``rejected_rounds``)."""
    ppl = summary.get("full_eval_ppl")
    if summary.get("rejected_rounds") or ppl is None or not math.isfinite(ppl):
        return math.inf
    return float(ppl)


def chosen(scores: Mapping[float, float]) -> float:
    """The rate with the lowest score; a tie goes to the smaller rate."""
    return min(sorted(scores), key=lambda lr: scores[lr])


def next_rate(scores: Mapping[float, float], ladder: Sequence[float] = LADDER) -> float | None:
    """The ladder's next rate past the grid's edge when the chosen rate sits on that edge (None: bracketed or
    the ladder ends there)."""
    grid = sorted(scores)
    best = chosen(scores)
    for lr in grid:
        if lr not in ladder:
            raise ValueError(f"rate {lr:g} is not on the tuning ladder {list(ladder)}")
    i = ladder.index(best)
    if best == grid[0] and i > 0:
        return ladder[i - 1]
    if best == grid[-1] and i + 1 < len(ladder):
        return ladder[i + 1]
    return None


def label_table(first_grid: Sequence[float], per_rate: Mapping[float, Sequence[float]], seeds: int) -> dict:
    """One label's tuning record from the validation perplexities of its finished runs, rate → [ppl per seed].

    ``complete`` when every rate of the grid has all ``seeds`` and no further rate is owed; ``owed`` lists
    the rates still to run (the first grid's missing ones, or the next ladder rate).
    """
    grid = sorted(set(first_grid) | set(per_rate))
    owed = [lr for lr in grid if len(per_rate.get(lr, ())) < seeds]
    table: dict = {"grid": [float(lr) for lr in grid], "seeds_per_rate": seeds,
                   "perplexities": {rate_key(lr): list(per_rate.get(lr, ())) for lr in grid}}
    if owed:
        return table | {"complete": False, "owed": owed, "chosen": None, "scores": {}}
    scores = {lr: score(per_rate[lr]) for lr in grid}
    extra = next_rate(scores, LADDER)  # read at call time (a test narrows the ladder)
    best = chosen(scores)
    edge = best in (grid[0], grid[-1])
    return table | {"complete": extra is None, "owed": [] if extra is None else [extra],
                    "scores": {rate_key(lr): s for lr, s in scores.items()},
                    "chosen": None if extra is not None else float(best), "bracketed": not edge}
