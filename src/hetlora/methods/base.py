"""What every aggregation method shares: data-size weights and the zero-padded weighted sum.

A method is one small class with the same shape as its siblings (like Flower's
``Strategy`` subclasses): a ``name``, the kind of client it trains with, and
``aggregate(updates, r_max, **options) -> global adapter``. Updates reaching a
method are already validated (``hetlora.methods.aggregate``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, lora_pairs, module_names


class AggregationMethod:
    """Base class; subclasses set the class attributes and implement :meth:`aggregate`."""

    name: str = ""
    #: which local trainer the clients run: "lora", "ffa" (A frozen), "flora" (fresh LoRA
    #: on merged weights each round) or "fft" (full fine-tuning).
    client_kind: str = "lora"
    #: whether clients apply rank self-pruning (SPEC.md step 2).
    prunes: bool = False
    #: whether all clients must share one rank.
    uniform_rank: bool = False
    #: keyword options :meth:`aggregate` understands, beyond ``previous`` and ``norm_bound``.
    options: tuple[str, ...] = ()

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        r_max: int,
        *,
        previous: Mapping[str, torch.Tensor] | None = None,
        norm_bound: float | None = None,
        **options: Any,
    ) -> Adapter:
        raise NotImplementedError


def data_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """q_k = n_k / Σ_j n_j (SPEC.md, Methods)."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def normalise(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def weighted_padded_sum(
    updates: Sequence[ClientUpdate],
    r_max: int,
    weights: Sequence[float] | Mapping[str, Sequence[float]],
) -> Adapter:
    """B^g = Σ_k p_k pad(B_k), A^g = Σ_k p_k pad(A_k) (SPEC.md step 3).

    ``weights`` is one p_k per client, or a mapping module -> p_k per client for
    per-layer weights. Accumulates each client's slice in place instead of building
    padded copies: the padding is zeros, so it adds nothing.
    """
    out: Adapter = {}
    for module in module_names(updates[0].adapter):
        b0 = updates[0].adapter[module + B_SUFFIX]
        a0 = updates[0].adapter[module + A_SUFFIX]
        dtype = torch.promote_types(b0.dtype, torch.float32)
        acc_b = torch.zeros(b0.shape[0], r_max, dtype=dtype)
        acc_a = torch.zeros(r_max, a0.shape[1], dtype=dtype)
        ws = weights[module] if isinstance(weights, Mapping) else weights
        for u, w in zip(updates, ws):
            b, a = u.adapter[module + B_SUFFIX], u.adapter[module + A_SUFFIX]
            r = a.shape[0]
            acc_b[:, :r].add_(b, alpha=w)
            acc_a[:r].add_(a, alpha=w)
        out[module + A_SUFFIX] = acc_a
        out[module + B_SUFFIX] = acc_b
    return out


def per_module_factors(updates: Sequence[ClientUpdate]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """module -> [(B_k, A_k) for every client], in client order."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for u in updates:
        for module, b, a in lora_pairs(u.adapter):
            out.setdefault(module, []).append((b, a))
    return out
