"""PEFT-format adapter algebra: pairing, truncation, zero-padding and norms.

An *adapter* is a dict mapping ``<module>.lora_A.weight`` -> A [r, in] and
``<module>.lora_B.weight`` -> B [out, r], exactly what
``peft.get_peft_model_state_dict`` returns. The update of one module is
ΔW = s · B A with the same scaling s at every rank (docs/algorithm.md §1), so a
truncation and a zero-padding are consistent views of one global ΔW.
"""

from __future__ import annotations

import math

from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

Adapter = dict[str, Tensor]


@dataclass
class ClientUpdate:
    """What one client returns after a round of local training.

    ``adapter`` is in PEFT format at the client's (possibly pruned) rank;
    ``num_examples`` is n_k, the data-size weight used by q_k = n_k / Σ n_j.
    """

    adapter: Adapter
    num_examples: int
    client_id: str | None = None
    rank: int | None = None
    round: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=8192)  # a server asks for the same few hundred keys of every update; bounded against stray ones
def rank_axis(key: str) -> int:
    """The axis of a factor that indexes rank components: columns of B, rows of A."""
    if key.endswith(B_SUFFIX):
        return 1
    if key.endswith(A_SUFFIX):
        return 0
    raise ValueError(f"{key} is not a LoRA factor (…{A_SUFFIX} or …{B_SUFFIX})")


@lru_cache(maxsize=8192)
def module_of(key: str) -> str:
    """The module a factor belongs to: its key without the A/B suffix."""
    return key[: -len(B_SUFFIX)] if key.endswith(B_SUFFIX) else key[: -len(A_SUFFIX)]


def module_names(adapter: Mapping[str, Tensor]) -> list[str]:
    """Sorted module prefixes that own a LoRA pair (keys without the A/B suffix)."""
    return sorted({module_of(key) for key in adapter if key.endswith(A_SUFFIX) or key.endswith(B_SUFFIX)})


def lora_pairs(adapter: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(module, B, A)`` for every module, in sorted module order."""
    return [(m, adapter[m + B_SUFFIX], adapter[m + A_SUFFIX]) for m in module_names(adapter)]


def adapter_rank(adapter: Mapping[str, Tensor]) -> int:
    """The rank r of an adapter (one rank per client: docs/algorithm.md §1)."""
    ranks = {a.shape[0] for _, _, a in lora_pairs(adapter)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has no single rank: ranks {sorted(ranks)}")
    return ranks.pop()


def truncate_adapter(adapter: Mapping[str, Tensor], rank: int) -> Adapter:
    """Keep the leading ``rank`` components: B[:, :r], A[:r, :] (docs/algorithm.md §2.1).

    Plain slicing, no SVD. Asking for more components than the adapter has is an error.
    """
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        if rank < 1 or rank > a.shape[0]:
            raise ValueError(f"cannot truncate {module} of rank {a.shape[0]} to rank {rank}")
        out[module + A_SUFFIX] = a[:rank, :].clone()
        out[module + B_SUFFIX] = b[:, :rank].clone()
    return out


def zero_pad_adapter(adapter: Mapping[str, Tensor], rank: int) -> Adapter:
    """Zero-pad every module to ``rank`` components (docs/algorithm.md §2.3).

    The padded rows of A and columns of B are zero, so ΔW = B A is unchanged.
    """
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        r = a.shape[0]
        if rank < r:
            raise ValueError(f"cannot zero-pad {module} of rank {r} down to rank {rank}")
        a_pad = a.new_zeros(rank, a.shape[1])
        b_pad = b.new_zeros(b.shape[0], rank)
        a_pad[:r] = a
        b_pad[:, :r] = b
        out[module + A_SUFFIX] = a_pad
        out[module + B_SUFFIX] = b_pad
    return out


def product_norm_sq(b: Tensor, a: Tensor) -> Tensor:
    """‖B A‖_F² without forming the out × in matrix (a float64 scalar).

    ‖BA‖_F² = trace((BA)ᵀ BA) = trace((BᵀB)(AAᵀ)) (docs/algorithm.md §2.3). Both Gram
    matrices are symmetric r × r, so the trace of their product is the sum of
    their element-wise product: O(r²(out + in)) work instead of O(r·out·in).
    The Gram matrices are fp32 (half-precision factors are widened first; float64 ones stay
    float64) and their product is reduced in float64: ~1e-7 relative, at the speed of fp32
    matmuls. fp32 Grams overflow for |B| ~ 1e19: a result that is not finite is formed again in
    float64, so a huge but finite update still has its finite norm (docs/algorithm.md §5).
    """
    with torch.no_grad():
        value = _product_norm_sq(b, a, exact=_is_float64(b, a))
        return value if bool(torch.isfinite(value)) else _product_norm_sq(b, a, exact=True)


def _is_float64(*factors: Tensor) -> bool:
    """Float64 factors keep float64 Grams (nothing to gain, precision to lose)."""
    return any(t.dtype == torch.float64 for t in factors)


def _product_norm_sq(b: Tensor, a: Tensor, exact: bool) -> Tensor:
    """(callers hold torch.no_grad: a context per module was a tenth of a server's time per update)"""
    dtype = torch.float64 if exact else torch.float32
    if b.dtype != dtype or a.dtype != dtype:  # (a conversion that changes nothing still costs a call per factor)
        b, a = b.to(dtype), a.to(dtype)
    return torch.mul(b.T @ b, a @ a.T).sum(dtype=torch.float64)


def update_norm(adapter: Mapping[str, Tensor]) -> float:
    """‖ΔW_k‖_F with ‖ΔW_k‖_F² = Σ_ℓ ‖B_ℓ A_ℓ‖_F² (docs/algorithm.md §2.3, one weight per client).

    fp32 Grams for every module, one finiteness check for the whole sum (then float64 if it failed)."""
    pairs = [(b, a) for _, b, a in lora_pairs(adapter)]
    exact = any(_is_float64(b, a) for b, a in pairs)
    total = _sum_of_product_norms(pairs, exact)
    if not math.isfinite(total) and not exact:
        total = _sum_of_product_norms(pairs, True)
    return math.sqrt(total)


def _sum_of_product_norms(pairs: list[tuple[Tensor, Tensor]], exact: bool) -> float:
    """Σ_ℓ ‖B_ℓ A_ℓ‖_F², each module's term in float64, their sum exactly rounded (math.fsum)."""
    if not pairs:
        return 0.0
    with torch.no_grad():  # one read of the module terms back (the same float64 values as one float() each)
        return math.fsum(torch.stack([_product_norm_sq(b, a, exact) for b, a in pairs]).tolist())


def gram_norms(adapter: Mapping[str, Tensor]) -> tuple[float, float, float]:
    """(‖B‖_F, ‖A‖_F, ‖BA‖_F) over all modules from the same r × r Grams: ‖B‖² = trace(BᵀB), ‖A‖² = trace(AAᵀ)
    and ‖BA‖² as :func:`update_norm` forms it (the very same number), in one pass over the factors — what the
    norm bound needs of an update (hetlora.core.robust). fp32 Grams, float64 again if any sum is not finite."""
    pairs = [(b, a) for _, b, a in lora_pairs(adapter)]
    exact = any(_is_float64(b, a) for b, a in pairs)
    sums = _sum_of_gram_norms(pairs, exact)
    if not all(math.isfinite(v) for v in sums) and not exact:
        sums = _sum_of_gram_norms(pairs, True)
    return math.sqrt(sums[0]), math.sqrt(sums[1]), math.sqrt(sums[2])


def _sum_of_gram_norms(pairs: list[tuple[Tensor, Tensor]], exact: bool) -> tuple[float, float, float]:
    dtype = torch.float64 if exact else torch.float32
    if not pairs:
        return 0.0, 0.0, 0.0
    terms = []  # per module: ‖B‖², ‖A‖², ‖BA‖² as float64 scalars, read back once (not three float() per module)
    with torch.no_grad():
        for b, a in pairs:
            if b.dtype != dtype or a.dtype != dtype:
                b, a = b.to(dtype), a.to(dtype)
            gb, ga = b.T @ b, a @ a.T
            terms += [gb.diagonal().sum(dtype=torch.float64), ga.diagonal().sum(dtype=torch.float64),
                      torch.mul(gb, ga).sum(dtype=torch.float64)]
        values = torch.stack(terms).tolist()
    return math.fsum(values[0::3]), math.fsum(values[1::3]), math.fsum(values[2::3])


def factor_norms(adapter: Mapping[str, Tensor]) -> tuple[float, float]:
    """(‖B‖_F, ‖A‖_F) over all modules of one adapter."""
    b_sq = sum(float(b.double().pow(2).sum()) for _, b, _ in lora_pairs(adapter))
    a_sq = sum(float(a.double().pow(2).sum()) for _, _, a in lora_pairs(adapter))
    return b_sq**0.5, a_sq**0.5


def num_parameters(adapter: Mapping[str, Tensor]) -> int:
    """Number of scalars in an adapter (what a client trains and sends)."""
    return sum(t.numel() for t in adapter.values())


def num_bytes(adapter: Mapping[str, Tensor]) -> int:
    """Payload bytes of an adapter's tensors."""
    return sum(t.numel() * t.element_size() for t in adapter.values())


def scale_adapter(adapter: Mapping[str, Tensor], b_scale: float = 1.0, a_scale: float = 1.0) -> Adapter:
    """Multiply every B by ``b_scale`` and every A by ``a_scale`` (clipping, attacks in tests)."""
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        out[module + B_SUFFIX] = b * b_scale
        out[module + A_SUFFIX] = a * a_scale
    return out
