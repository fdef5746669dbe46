"""Heterogeneous-rank LoRA under secure aggregation: what a client adds to the masked sum, and how
the server reads the sum (docs/algorithm.md §6.1).

Under SecAgg+ the server learns only Σ_k v_k over vectors of one shape, never a v_k. HetLoRA's rule
is a weighted sum of zero-padded factors, B^g = Σ_k w_k pad(B_k) / Σ_k w_k (and A^g alike), so
client k sends

    v_k = (w_k/s · pad(B_k), w_k/s · pad(A_k), w_k/s)

and the server divides the first sums by the last: Σ_k w_k pad(x_k) / Σ_k w_k, the plain rule.
Every client pads to r_max (SecAgg+ sums arrays of one shape), so heterogeneous ranks save no
upload here. ``s`` is a public scale (the same for every client of the round) that only places
the numbers inside the quantiser's range; it cancels. ``w_k`` is computed by the client itself:
‖B_k A_k‖_F for hetlora, n_k for the data-weighted rules; the server never sees one.

Pure functions over tensors: the Flower shells (hetlora.flower) move them.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from .adapter import Adapter, adapter_rank, factor_norms, scale_adapter, update_norm, zero_pad_adapter

#: the key of the weight's share w_k/s in a contribution (after every factor key).
WEIGHT_KEY = "secure.weight"
#: the weight rules a secure sum can carry: one scalar per client, the same for every module.
WEIGHT_RULES = ("update_norm", "examples")


def client_weight(adapter: Mapping[str, Tensor], num_examples: int, rule: str) -> float:
    """w_k as the method defines it, computed on the client: ‖ΔW_k‖_F (``update_norm``) or n_k (``examples``)."""
    if rule == "update_norm":
        return update_norm(adapter)
    if rule == "examples":
        return float(num_examples)
    raise ValueError(f"unknown secure weight rule {rule!r} (known: {', '.join(WEIGHT_RULES)})")


def clip_to_bound(adapter: Mapping[str, Tensor], bound: float) -> Adapter:
    """The client's fixed bound: ‖B‖/√r and ‖A‖/√r each scaled down to ``bound`` if above it.

    The server's median bound (hetlora.core.robust) needs every client's norms, which a secure
    sum hides; a fixed bound needs none. With ‖B‖, ‖A‖ ≤ bound·√r, the weight ‖BA‖_F ≤ bound²·r
    is bounded too, so no client can inflate its share of the average past it.
    """
    if not bound > 0:
        raise ValueError(f"secure_clip must be positive, got {bound}")
    root = math.sqrt(max(1, adapter_rank(adapter)))
    norm_b, norm_a = factor_norms(adapter)
    b_scale = min(1.0, bound * root / norm_b) if norm_b > 0 else 1.0
    a_scale = min(1.0, bound * root / norm_a) if norm_a > 0 else 1.0
    return dict(adapter) if b_scale == a_scale == 1.0 else scale_adapter(adapter, b_scale=b_scale, a_scale=a_scale)


def contribution(adapter: Mapping[str, Tensor], weight: float, r_max: int, scale: float) -> dict[str, Tensor]:
    """v_k: every factor zero-padded to ``r_max`` and multiplied by w_k/s, keys sorted, then w_k/s (float64)."""
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"the client's weight must be finite and ≥ 0, got {weight}")
    if not scale > 0:
        raise ValueError(f"the secure scale must be positive, got {scale}")
    share = weight / scale
    padded = zero_pad_adapter(adapter, r_max)
    out = {key: padded[key].double() * share for key in sorted(padded)}
    out[WEIGHT_KEY] = torch.tensor([share], dtype=torch.float64)
    return out


def range_problem(values: Mapping[str, Tensor], bound: float) -> str | None:
    """Why ``values`` cannot go through a quantiser that clips at ±``bound`` unchanged (None: they can).

    SecAgg+ clips every entry silently; a client refuses instead, so an honest update is never
    distorted without a word."""
    for key, value in values.items():
        if not bool(torch.isfinite(value).all()):
            return f"{key} is not finite"
        peak = float(value.abs().max()) if value.numel() else 0.0
        if peak > bound:
            return (f"{key} reaches {peak:.4g}, beyond the secure-aggregation range ±{bound:g} "
                    f"(scale the update down, e.g. with --secure-clip)")
    return None


def layout(global_adapter: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a contribution in order: the r_max adapter's keys sorted, then the weight."""
    return [(key, tuple(global_adapter[key].shape)) for key in sorted(global_adapter)] + [(WEIGHT_KEY, (1,))]


def read_sum(sums: Mapping[str, Tensor]) -> Adapter:
    """The aggregate from Σ_k v_k (or any common multiple of it, e.g. the mean): Σ w_k x_k / Σ w_k, float32."""
    if WEIGHT_KEY not in sums:
        raise ValueError(f"the secure sum has no {WEIGHT_KEY}")
    total = float(sums[WEIGHT_KEY].double().sum())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the clients' weights sum to {total}: nothing to average (every update zero?)")
    return {key: (value.double() / total).float() for key, value in sums.items() if key != WEIGHT_KEY}


def round_scale(rule: str, global_adapter: Mapping[str, Tensor], examples: list[int]) -> float:
    """A public s for the round, near the clients' typical w_k (it cancels; it only sets the range).

    ``examples``: the n_k the sampled clients reported when they joined (the server holds them).
    ``update_norm``: ‖ΔW‖ of the global adapter the clients start from (1 while it is zero).
    """
    if rule == "examples":
        return float(sum(examples)) / len(examples) if examples else 1.0
    norm = update_norm(global_adapter)
    return norm if math.isfinite(norm) and norm > 0 else 1.0
