"""User-level DP-FedAvg on adapter updates (McMahan et al., ICLR 2018), pure tensor math.

Each client's update is its change on the slice of the global adapter it received,
δ_k = pad(client_k − truncate(global, r_k)); it is clipped to L2 norm C, the clipped
updates are summed, Gaussian noise N(0, σ²C²) is added, and the sum is divided by the
expected number of clients. Weights are data-independent (uniform), so sparsity
weighting is off under DP. Accounting lives outside the core (hetlora.server.privacy).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .accumulate import PaddedSum
from .adapter import Adapter, ClientUpdate, adapter_rank, truncate_adapter, zero_pad_adapter


def flat_norm(adapter: Mapping[str, Tensor]) -> float:
    """L2 norm of all of an adapter's scalars taken as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in adapter.values()))


def clip_to_norm(adapter: Mapping[str, Tensor], clip_norm: float) -> Adapter:
    """Scale the whole adapter so that its flat L2 norm is at most ``clip_norm``."""
    norm = flat_norm(adapter)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in adapter.items()}


def own_change(update: ClientUpdate, global_adapter: Mapping[str, Tensor]) -> Adapter:
    """δ_k at the client's own rank: what it returned minus the slice of the global adapter it received."""
    received = truncate_adapter(global_adapter, adapter_rank(update.adapter))
    return {k: update.adapter[k] - received[k] for k in received}


def client_delta(update: ClientUpdate, global_adapter: Mapping[str, Tensor], r_max: int) -> Adapter:
    """δ_k on the client's own slice, zero-padded to r_max (untouched components stay 0)."""
    return zero_pad_adapter(own_change(update, global_adapter), r_max)


def clipped_change(update: ClientUpdate, global_adapter: Mapping[str, Tensor], clip_norm: float) -> Adapter:
    """clip(δ_k, C) at the client's own rank: its change on the slice it received, scaled to norm ≤ C. The padding
    of δ_k is zeros, which add nothing to its norm or to a padded sum, so it is never made."""
    return clip_to_norm(own_change(update, global_adapter), clip_norm)


def check_dp(clip_norm: float, noise_multiplier: float, expected_clients: int) -> None:
    if clip_norm <= 0 or noise_multiplier < 0 or expected_clients < 1:
        raise ValueError("dp needs clip_norm > 0, noise_multiplier ≥ 0 and expected_clients ≥ 1")


def dp_fold(acc: PaddedSum, update: ClientUpdate, global_adapter: Mapping[str, Tensor], clip_norm: float) -> None:
    """Add one client's clipped change into the round's sum: its own alone, so a server folds each reply in as it
    arrives (docs/algorithm.md §7.2) and never holds K of them."""
    acc.add(clipped_change(update, global_adapter, clip_norm))


def dp_finish(acc: PaddedSum, global_adapter: Mapping[str, Tensor], *, clip_norm: float, noise_multiplier: float,
              expected_clients: int, generator: torch.Generator) -> Adapter:
    """global + (Σ_k clip(δ_k, C) + N(0, (σC)²)) / K from the round's sum of clipped changes (spent here)."""
    check_dp(clip_norm, noise_multiplier, expected_clients)
    total = acc.total(spend=True)
    std = noise_multiplier * clip_norm
    out: Adapter = {}
    for k in sorted(total):
        noise = torch.randn(total[k].shape, generator=generator) * std
        out[k] = (global_adapter[k].float() + (total[k] + noise) / expected_clients).to(global_adapter[k].dtype)
    return out


def dp_aggregate(
    global_adapter: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    r_max: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: int,
    generator: torch.Generator,
) -> Adapter:
    """global + (Σ_k clip(δ_k, C) + N(0, (σC)²)) / K, with K the expected clients per round (the list form of
    :func:`dp_fold` then :func:`dp_finish`)."""
    check_dp(clip_norm, noise_multiplier, expected_clients)
    acc = PaddedSum(r_max)
    for u in updates:
        dp_fold(acc, u, global_adapter, clip_norm)
    return dp_finish(acc, global_adapter, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                     expected_clients=expected_clients, generator=generator)
