"""Rank self-pruning (docs/algorithm.md §2.2).

The client adds λ·P_k to its task loss, where P_k = Σ_ℓ ‖B_ℓ[:, c:]‖_F · ‖A_ℓ[c:, :]‖_F
is the norm of its trailing rank components, c = min(floor(γ·r), r − 1). If local
training lowered P (P_after < P_before) the tail no longer matters and is cut:
r ← max(r_min, c). Ranks never grow.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


def tail_start(rank: int, gamma: float) -> int:
    """c_k = min(floor(γ·r_k), r_k − 1): the first trailing component (the tail is never empty)."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return min(math.floor(gamma * rank), rank - 1)


def tail_penalty(pairs: Iterable[tuple[Tensor, Tensor]], start: int) -> Tensor:
    """P = Σ_ℓ ‖B_ℓ[:, c:]‖_F · ‖A_ℓ[c:, :]‖_F over ``(B, A)`` pairs; differentiable.

    Used as the loss term λ·P during local training, and (detached) for the prune decision.
    The Frobenius norm's gradient at zero is defined as zero by torch, so the first
    visit (global B = 0) trains without NaNs.
    """
    total: Tensor | None = None
    for b, a in pairs:
        term = torch.linalg.vector_norm(b[:, start:]) * torch.linalg.vector_norm(a[start:, :])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("tail_penalty needs at least one (B, A) pair")
    return total


def prune_rank(p_before: float, p_after: float, rank: int, gamma: float, r_min: int) -> int:
    """The rank after local training: max(r_min, c) if P_after < P_before, else unchanged.

    Ranks never grow, and a rank already at or below r_min stays where it is.
    """
    if p_after < p_before:
        return min(rank, max(r_min, tail_start(rank, gamma)))
    return rank
