"""Validation of client updates before any arithmetic (docs/algorithm.md §5).

A federated server takes tensors from devices it does not control. Every check
here runs before aggregation and names the client and the problem, so a runner
can drop one bad client and keep the round.
"""

from __future__ import annotations

import math

import numbers
from collections import Counter
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .adapter import A_SUFFIX, B_SUFFIX, ClientUpdate, adapter_rank, module_of

# module -> (out_features, in_features)
LayerShapes = dict[str, tuple[int, int]]


class InvalidUpdate(ValueError):
    """A client update that must not be aggregated. ``client`` names who sent it."""

    def __init__(self, client: str | None, problem: str):
        self.client = client
        self.problem = problem
        super().__init__(f"client {client if client is not None else '?'}: {problem}")


def layer_shapes(adapter: Mapping[str, Tensor]) -> LayerShapes:
    """The (out, in) shape of every module an adapter adapts; rank-free, so comparable."""
    shapes: LayerShapes = {}
    if not isinstance(adapter, Mapping):
        return shapes
    for key, t in adapter.items():
        if isinstance(key, str) and key.endswith(A_SUFFIX) and isinstance(t, Tensor) and t.dim() == 2:
            module = module_of(key)
            b = adapter.get(module + B_SUFFIX)
            if isinstance(b, Tensor) and b.dim() == 2:
                shapes[module] = (b.shape[0], t.shape[1])
    return shapes


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def example_count(value) -> int | None:
    """A client's example count as an int (Python, numpy or 0-d torch integers), or None if it is
    not a positive integer (booleans and floats, even 3.0, are refused)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value) if value > 0 else None


def tensor_problem(t) -> str | None:
    """Why ``t`` cannot be a LoRA factor (None if it can): a dense, real 2-D fp16/bf16/fp32/fp64 tensor with data."""
    if not isinstance(t, Tensor):
        return f"must be a torch tensor, got {type(t).__module__}.{type(t).__name__}"
    if t.is_meta:
        return "is a meta tensor (it holds no data)"
    if t.layout != torch.strided:
        return f"must be a dense tensor, got layout {t.layout}"
    if t.dtype not in FLOAT_DTYPES:
        return f"must be float16, bfloat16, float32 or float64, got {t.dtype}"
    if t.dim() != 2:
        return f"must be a 2-D floating-point tensor, got {t.dim()}-D"
    return None


def _all_finite(t: Tensor) -> bool:
    # One reduction, no boolean temporary: a sum is finite only if every term is
    # (NaN and ±Inf propagate). Only on failure do the exact element-wise check, so a
    # huge-but-finite tensor whose sum overflows is still reported precisely.
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def validate_update(
    update: ClientUpdate,
    shapes: LayerShapes,
    r_max: int,
    *,
    max_rank: int | None = None,
    exact_rank: bool = False,
) -> int:
    """Check one update against the expected layer shapes; return its rank.

    Raises :class:`InvalidUpdate` for: num_examples ≤ 0, keys that are not LoRA
    factors, missing or extra modules, tensors that are not 2-D floating point,
    shapes that disagree with ``shapes``, an A/B rank mismatch inside one module,
    different ranks across modules, rank < 1, rank > r_max (or > ``max_rank``,
    the client's assigned rank), a rank other than the assigned one when ``exact_rank``
    (a run without pruning: a short update would be read against the wrong components),
    and NaN/Inf values.
    """
    cid = update.client_id
    if example_count(update.num_examples) is None:
        raise InvalidUpdate(cid, f"num_examples must be a positive integer, got {update.num_examples!r}")
    problem = (_key_problem(update.adapter, shapes) or _shape_problem(update.adapter, shapes))
    if problem:
        raise InvalidUpdate(cid, problem)
    rank = update.adapter[next(iter(shapes)) + A_SUFFIX].shape[0]
    problem = _rank_problem(rank, r_max, max_rank, exact_rank, update.rank) or _value_problem(update.adapter)
    if problem:
        raise InvalidUpdate(cid, problem)
    return rank


def _key_problem(adapter, shapes: LayerShapes) -> str | None:
    """A mapping of exactly the expected LoRA keys, each a tensor that can be a factor (None: it is)."""
    if not isinstance(adapter, Mapping) or not adapter:
        return "adapter is empty or not a mapping of tensors"
    stray = sorted(str(k) for k in adapter if not (isinstance(k, str) and (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))))
    if stray:
        return f"keys that are not LoRA factors: {stray[:3]}"
    for key, t in adapter.items():
        problem = tensor_problem(t)
        if problem:
            return f"{key} {problem}"
    expected = {m + s for m in shapes for s in (A_SUFFIX, B_SUFFIX)}
    missing = sorted(expected - adapter.keys())
    extra = sorted(adapter.keys() - expected)
    if missing:
        return f"missing {len(missing)} key(s), e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    return None


def _shape_problem(adapter, shapes: LayerShapes) -> str | None:
    """Every module fits its layer, with one rank for A and B and across modules (None: it does)."""
    rank = None
    for module, (out_f, in_f) in shapes.items():
        a, b = adapter[module + A_SUFFIX], adapter[module + B_SUFFIX]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            return f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a {out_f}x{in_f} layer"
        if a.shape[0] != b.shape[1]:
            return f"{module}: A has rank {a.shape[0]} but B has rank {b.shape[1]}"
        if rank is None:
            rank = a.shape[0]
        elif a.shape[0] != rank:
            return f"{module}: rank {a.shape[0]} differs from rank {rank} of its other modules"
    return None


def _rank_problem(rank: int, r_max: int, max_rank: int | None, exact_rank: bool, declared: int | None) -> str | None:
    """The rank within [1, r_max] and the client's assigned rank, as declared (None: it is)."""
    if rank < 1:
        return "rank 0 adapter"
    if rank > r_max:
        return f"rank {rank} exceeds r_max {r_max}"
    if max_rank is not None and rank > max_rank:
        return f"rank {rank} exceeds the client's assigned rank {max_rank}"
    if exact_rank and max_rank is not None and rank != max_rank:
        return f"rank {rank} is not the rank {max_rank} it was sent (this run does not prune)"
    if declared is not None and declared != rank:
        return f"declares rank {declared} but its tensors have rank {rank}"
    return None


def _value_problem(adapter) -> str | None:
    for key, t in adapter.items():
        if not _all_finite(t):
            return f"{key} contains NaN or Inf"
    return None


def reference_shapes(updates: Sequence[ClientUpdate]) -> LayerShapes:
    """Layer shapes agreed by the most clients: a majority vote, so one bad first client
    cannot make every honest one look wrong."""
    votes = Counter(tuple(sorted(layer_shapes(u.adapter).items())) for u in updates)
    if not votes:
        raise ValueError("no updates to aggregate")
    return dict(votes.most_common(1)[0][0])


def validate_updates(
    updates: Sequence[ClientUpdate],
    r_max: int,
    shapes: LayerShapes | None = None,
) -> list[int]:
    """Validate a whole round; raise on the first bad update (:func:`split_valid`'s checks). Returns the ranks."""
    if not updates:
        raise ValueError("no updates to aggregate")
    kept, dropped = split_valid(updates, r_max, shapes if shapes is not None else reference_shapes(updates))
    if dropped:
        raise InvalidUpdate(*dropped[0])
    return [adapter_rank(u.adapter) for u in kept]


def split_valid(
    updates: Sequence[ClientUpdate],
    r_max: int,
    shapes: LayerShapes,
    *,
    assigned_ranks: Mapping[str, int] | None = None,
    round_index: int | None = None,
    exact_rank: bool = False,
) -> tuple[list[ClientUpdate], list[tuple[str | None, str]]]:
    """Keep the valid LoRA updates and list ``(client, reason)`` for every dropped one (:func:`split_by`
    with :func:`validate_update`'s checks: keys, shapes, ranks, dtypes, finite values, data size)."""
    def check(u: ClientUpdate) -> None:
        max_rank = assigned_ranks.get(u.client_id) if assigned_ranks and u.client_id is not None else None
        validate_update(u, shapes, r_max, max_rank=max_rank, exact_rank=exact_rank)

    return split_by(updates, check, round_index)


DUPLICATE = "sent more than one update in this round"


def split_by(
    updates: Sequence[ClientUpdate], check: Callable[[ClientUpdate], None], round_index: int | None = None
) -> tuple[list[ClientUpdate], list[tuple[str | None, str]]]:
    """The one validation loop every method uses: ``check`` (raising :class:`InvalidUpdate`) on each update,
    and besides it a second update from the same client in one round and an update stamped with another
    round are dropped. Kept updates carry their example count as an int."""
    kept: list[ClientUpdate] = []
    dropped: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    for u in updates:
        try:
            if u.client_id is not None and u.client_id in seen:
                raise InvalidUpdate(u.client_id, DUPLICATE)
            if round_index is not None and u.round is not None and u.round != round_index:
                raise InvalidUpdate(u.client_id, f"update is for round {u.round}, not the current round {round_index}")
            check(u)
        except InvalidUpdate as err:
            dropped.append((u.client_id, err.problem))
            continue
        if u.client_id is not None:
            seen.add(u.client_id)
        kept.append(replace(u, num_examples=example_count(u.num_examples)))
    return kept, dropped


def non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor holding NaN or ±Inf, named (None if all are finite)."""
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return f"{key} holds NaN or Inf"
    return None
