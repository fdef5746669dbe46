"""Rank assignment (docs/algorithm.md §2.4): uniform from a seed, an explicit list, or device tiers.

Each client's rank (or tier) is derived from a hash of (seed, client id), so it is
fixed per client whatever other clients exist and in whatever order a server meets
them — Flower nodes arrive one at a time.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from typing import Mapping, Sequence

# Rank budget per device tier: what a device of that class can afford to train.
DEVICE_TIERS: dict[str, int] = {
    "low-end-phone": 5,
    "mid-range-phone": 10,
    "high-end-phone": 20,
    "laptop": 50,
}

# Default mix of tiers across clients (fractions sum to 1).
DEFAULT_TIER_MIX: dict[str, float] = {
    "low-end-phone": 0.4,
    "mid-range-phone": 0.3,
    "high-end-phone": 0.2,
    "laptop": 0.1,
}


def _unit_hash(seed: int, client_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{seed}:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_bounds(r_min: int, r_max: int) -> None:
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 ≤ r_min ≤ r_max, got r_min={r_min}, r_max={r_max}")


def uniform_ranks(client_ids: Sequence[str], r_min: int, r_max: int, seed: int) -> dict[str, int]:
    """Integers uniform in [r_min, r_max], fixed per client by the seed."""
    _check_bounds(r_min, r_max)
    span = r_max - r_min + 1
    return {c: r_min + int(_unit_hash(seed, c, "rank") * span) for c in client_ids}


def list_ranks(client_ids: Sequence[str], ranks: Sequence[int], r_min: int, r_max: int) -> dict[str, int]:
    """Client i (in the given order) gets ranks[i mod len(ranks)]; every rank must lie in [r_min, r_max]."""
    _check_bounds(r_min, r_max)
    if not ranks:
        raise ValueError("an explicit rank list must not be empty")
    bad = [r for r in ranks if not r_min <= r <= r_max]
    if bad:
        raise ValueError(f"ranks {bad} lie outside [r_min={r_min}, r_max={r_max}]")
    return {c: int(ranks[i % len(ranks)]) for i, c in enumerate(client_ids)}


def assign_tiers(
    client_ids: Sequence[str], seed: int, mix: Mapping[str, float] = DEFAULT_TIER_MIX
) -> dict[str, str]:
    """Each client's device tier, drawn from ``mix`` by a per-client hash of the seed."""
    total = sum(mix.values())
    if not mix or total <= 0 or any(v < 0 for v in mix.values()):
        raise ValueError(f"tier mix must have non-negative fractions with a positive sum, got {dict(mix)}")
    names = sorted(mix)
    out = {}
    for c in client_ids:
        u, acc = _unit_hash(seed, c, "tier") * total, 0.0
        tier = names[-1]
        for name in names:
            acc += mix[name]
            if u < acc:
                tier = name
                break
        out[c] = tier
    return out


def tier_ranks(
    client_ids: Sequence[str],
    r_min: int,
    r_max: int,
    seed: int,
    mix: Mapping[str, float] = DEFAULT_TIER_MIX,
    tiers: Mapping[str, int] = DEVICE_TIERS,
) -> dict[str, int]:
    """Rank = the client's tier budget, clamped into [r_min, r_max]."""
    _check_bounds(r_min, r_max)
    unknown = sorted(set(mix) - set(tiers))
    if unknown:
        raise ValueError(f"unknown device tier(s) {unknown}; known: {sorted(tiers)}")
    tier_of = assign_tiers(client_ids, seed, mix)
    return {c: min(r_max, max(r_min, tiers[tier_of[c]])) for c in client_ids}


def assign_ranks(
    client_ids: Sequence[str],
    dist: str,
    r_min: int,
    r_max: int,
    seed: int,
    ranks: Sequence[int] | None = None,
) -> dict[str, int]:
    """Dispatch on ``dist`` ∈ {uniform, tiers, list, fixed}; ``fixed`` gives everyone r_max."""
    if dist == "uniform":
        return uniform_ranks(client_ids, r_min, r_max, seed)
    if dist == "tiers":
        return tier_ranks(client_ids, r_min, r_max, seed)
    if dist == "list":
        return list_ranks(client_ids, ranks or [], r_min, r_max)
    if dist == "fixed":
        _check_bounds(r_min, r_max)
        return {c: r_max for c in client_ids}
    raise ValueError(f"unknown rank distribution {dist!r}; use uniform, tiers, list or fixed")


def ranks_from_budgets(budgets: Mapping[str, float], largest_rank, r_min: int, r_max: int) -> tuple[dict[str, int], dict[str, str]]:
    """Each client's rank from its memory budget: ``largest_rank(budget, r_min, r_max)`` (the largest rank
    predicted to fit, or None). A client that fits no rank ≥ r_min is left out, with the reason."""
    _check_bounds(r_min, r_max)
    ranks, left_out = {}, {}
    for client, budget in budgets.items():
        rank = largest_rank(budget, r_min, r_max)
        if rank is None:
            left_out[client] = f"its memory budget of {budget:.0f} MB fits no rank ≥ {r_min}, the smallest this method gives"
        else:
            ranks[client] = rank
    return ranks, left_out


def tier_ranks_for_eval(ranks: Mapping[str, int], r_min: int, r_max: int) -> list[int]:
    """The rank tiers to evaluate truncations at: the distinct ranks if few, else min/median/max."""
    distinct = sorted(set(ranks.values()))
    if len(distinct) <= 4:
        return distinct
    return sorted({r_min, int(statistics.median(distinct)), r_max})


#: the largest budget anyone can mean (1 PB in MB): beyond it a number is a typo or an attack, not a device.
MAX_BUDGET_MB = 1e9


def budget_problem(value: object) -> str | None:
    """Why ``value`` is not a memory budget in MB (None: it is): a positive finite number of at most
    :data:`MAX_BUDGET_MB`, never a boolean (JSON ``true`` is not 1 MB) nor NaN/Infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number of MB"
    if not (math.isfinite(value) and 0 < value <= MAX_BUDGET_MB):
        return f"{value!r} MB is not a positive finite budget of at most {MAX_BUDGET_MB:g} MB"
    return None
