"""Heterogeneous-rank LoRA under secure aggregation: what a client adds to the masked sum, and how
the server reads the sum (docs/algorithm.md §6.1).

Under SecAgg+ the server learns only Σ_k v_k over vectors of one shape, never a v_k. HetLoRA's rule
is a weighted sum of zero-padded factors, B^g = Σ_k w_k pad(B_k) / Σ_k w_k (and A^g alike), so
client k sends

    v_k = (w_k/s · pad(B_k), w_k/s · pad(A_k), w_k/s)

and the server divides the first sums by the last: Σ_k w_k pad(x_k) / Σ_k w_k, the plain rule.

**Rank cover** (docs/algorithm.md §6.1): SecAgg+ sums arrays of one shape, so every client pads to
one rank — but a rank component held by one client alone would be that client's own value in the
sum. So the round's contributions stop at the *covered rank* r_c, the m-th largest rank sent this
round (:func:`covered_rank`): every component below r_c is held by at least m clients, and the
components from r_c to r_max are not sent; the global keeps its previous values there
(:func:`merge_covered`). ``s`` is a public scale (the same for every client of the round) that only places
the numbers inside the quantiser's range; it cancels. ``w_k`` is computed by the client itself:
‖B_k A_k‖_F for hetlora, n_k for the data-weighted rules; the server never sees one.

Pure functions over tensors: the Flower shells (hetlora.flower) move them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .adapter import (Adapter, adapter_rank, factor_norms, rank_axis, scale_adapter, truncate_adapter, update_norm,
                      zero_pad_adapter)

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


def secagg_threshold(clients: int) -> int:
    """SecAgg+'s reconstruction threshold for a round of ``clients`` that all share with each other and
    need half the shares (``num_shares=1.0, reconstruction_threshold=0.5``, as ``flower.secure_round``
    configures it): Flower's own formula, max(2, round(clients / 2))."""
    return max(round(0.5 * clients), 2)


def min_holders(configured: int | None, clients: int) -> int:
    """m, how many clients must hold every component the server unmasks: ``--secure-min-clients`` if set,
    else SecAgg+'s own threshold for a round of ``clients``."""
    return configured or secagg_threshold(clients)


def covered_rank(ranks: Sequence[int], min_clients: int) -> int:
    """r_c: the ``min_clients``-th largest of the round's ranks, so every component below it is held
    by at least ``min_clients`` clients (docs/algorithm.md §6.1)."""
    if min_clients < 2:
        raise ValueError(f"a secure sum needs every component held by at least 2 clients, got min_clients={min_clients}")
    if len(ranks) < min_clients:
        raise ValueError(f"{len(ranks)} client(s) cannot cover any component {min_clients} times")
    return sorted(ranks, reverse=True)[min_clients - 1]


def cover_problem(ranks: Sequence[int], cover: int, min_clients: int) -> str | None:
    """Why a sum over clients of ``ranks`` must not be unmasked at covered rank ``cover`` (None: it may):
    fewer than ``min_clients`` of them hold every component below it (a dropout took one away)."""
    holders = sum(1 for r in ranks if r >= cover)
    if holders < min_clients:
        return (f"only {holders} of the {len(ranks)} clients left in the sum hold all {cover} covered components, "
                f"fewer than {min_clients}: the sum is not unmasked (a component would be one client's own value)")
    return None


def client_share(adapter: Mapping[str, Tensor], cover: int, clip: float) -> Adapter:
    """What a client puts into the round's sum: its leading min(r_k, r_c) components, then the fixed bound."""
    return clip_to_bound(truncate_adapter(adapter, min(adapter_rank(adapter), cover)), clip)


def merge_covered(aggregate: Mapping[str, Tensor], previous: Mapping[str, Tensor]) -> Adapter:
    """The new global adapter: the covered components from the sum, the rest (not sent) from ``previous``."""
    out: Adapter = {}
    for key, old in previous.items():
        new, axis = old.detach().clone(), rank_axis(key)
        new.narrow(axis, 0, aggregate[key].shape[axis]).copy_(aggregate[key])
        out[key] = new
    return out


def weight_bound(rule: str, clip: float, cover: int, scale: float) -> float | None:
    """The largest w_k/s a clipped client can send (``update_norm``: ‖BA‖ ≤ ‖B‖‖A‖ ≤ C²·r_c);
    None for ``examples``, whose weights the server knows exactly."""
    return clip * clip * cover / scale if rule == "update_norm" else None


def sum_problem(aggregate: Mapping[str, Tensor], weight_sum: float, *, clients: int, clip: float, cover: int,
                scale: float, rule: str, examples: float, entries: int) -> str | None:
    """Why an unmasked sum cannot come from ``clients`` clients that applied the fixed bound ``clip``
    (None: it can). A client that skips its own clip is cut to ±8 per entry by SecAgg+'s quantiser,
    far beyond what clipped clients can sum to: the round is refused, the previous global stays.

    * each factor of the aggregate (the sum over Σ w_k/s) is a convex combination of clipped factors,
      so ‖B̄‖, ‖Ā‖ ≤ C·√r_c;
    * Σ w_k/s ≤ clients · C²·r_c/s (``update_norm``), or = Σ n_k/s, the examples the clients joined with.
    ``entries``: the quantiser's slack, one grid step per entry and client, added to each test."""
    step = 2 * 8.0 / 2**30 * clients
    slack_norm = step * math.sqrt(entries) / max(weight_sum, 1e-300)
    limit = clip * math.sqrt(cover) * (1 + 1e-5) + slack_norm
    norm_b, norm_a = factor_norms(aggregate)
    if not norm_b <= limit or not norm_a <= limit:
        return (f"the unmasked sum's factors (‖B‖ {norm_b:.4g}, ‖A‖ {norm_a:.4g}) exceed what clients clipped to "
                f"{clip:g} can sum to ({limit:.4g}): a client skipped its clip; the round is refused")
    top = weight_bound(rule, clip, cover, scale)
    if top is not None and not weight_sum <= clients * top * (1 + 1e-5) + step:
        return (f"the unmasked weights sum to {weight_sum:.4g}, beyond what {clients} clipped clients can send "
                f"({clients * top:.4g}): a client inflated its weight; the round is refused")
    if top is None and not abs(weight_sum - examples / scale) <= 1e-5 * examples / scale + step:
        return (f"the unmasked weights sum to {weight_sum:.6g}, not the {examples / scale:.6g} the clients' example "
                "counts give: a client changed its weight; the round is refused")
    return None


def contribution(adapter: Mapping[str, Tensor], weight: float, r_max: int, scale: float) -> dict[str, Tensor]:
    """v_k: every factor zero-padded to ``r_max`` (the round's covered rank) and multiplied by w_k/s, keys
    sorted, then w_k/s (float64)."""
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


def layout(global_adapter: Mapping[str, Tensor], cover: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a contribution in order: the adapter's keys sorted (at rank ``cover``, default its
    own), then the weight."""
    adapter = truncate_adapter(global_adapter, cover) if cover is not None else global_adapter
    return [(key, tuple(adapter[key].shape)) for key in sorted(adapter)] + [(WEIGHT_KEY, (1,))]


def weight_sum(sums: Mapping[str, Tensor]) -> float:
    """Σ_k w_k/s, the last entry of the sum."""
    if WEIGHT_KEY not in sums:
        raise ValueError(f"the secure sum has no {WEIGHT_KEY}")
    return float(sums[WEIGHT_KEY].double().sum())


def read_sum(sums: Mapping[str, Tensor]) -> Adapter:
    """The aggregate from Σ_k v_k (or any common multiple of it, e.g. the mean): Σ w_k x_k / Σ w_k, float32."""
    total = weight_sum(sums)
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the clients' weights sum to {total}: nothing to average (every update zero?)")
    return {key: (value.double() / total).float() for key, value in sums.items() if key != WEIGHT_KEY}


def auto_clip(initial_global: Mapping[str, Tensor]) -> float:
    """The default fixed bound C: twice ‖A₀‖_F/√r of the run's initial global adapter (public, the same
    for every round). LoRA's A moves little from its initialisation and B starts at zero, so honest
    factors stay below it; an inflated one does not."""
    _, norm_a = factor_norms(initial_global)
    root = math.sqrt(max(1, adapter_rank(initial_global)))
    return 2.0 * norm_a / root if norm_a > 0 else 1.0


def round_scale(rule: str, global_adapter: Mapping[str, Tensor], examples: list[int]) -> float:
    """A public s for the round, near the clients' typical w_k (it cancels; it only sets the range).

    ``examples``: the n_k the sampled clients reported when they joined (the server holds them).
    ``update_norm``: ‖ΔW‖ of the global adapter the clients start from (1 while it is zero).
    """
    if rule == "examples":
        return float(sum(examples)) / len(examples) if examples else 1.0
    norm = update_norm(global_adapter)
    return norm if math.isfinite(norm) and norm > 0 else 1.0
