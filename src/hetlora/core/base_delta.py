"""Updates folded into the frozen base weights: FLoRA's stacked update, FedEx-LoRA's residual.

Some methods move part of each round's aggregate out of the adapter and into the frozen
weights, W0 ← W0 + s·ΔW (docs/algorithm.md, "flora", "fedex-lora"). The server keeps the
cumulative ΔW of every round per module, in the cheaper of two exact forms:

* factors ``<module>.lora_B.weight`` [out, R] and ``<module>.lora_A.weight`` [R, in]
  (ΔW = B A; each round appends its factors, so R grows), while R·(out + in) < out·in;
* the dense matrix ``<module>.base_delta.weight`` [out, in] from then on.

A client is a fresh process that holds only the pristine base weights, so it is sent the
whole cumulative ΔW every round: min(R(out + in), out·in) numbers per module, counted as
download. ΔW is in B·A units; the scaling s is applied when it is added to W0.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .adapter import A_SUFFIX, B_SUFFIX, lora_pairs

DENSE_SUFFIX = ".base_delta.weight"

BaseDelta = dict[str, Tensor]


def delta_modules(delta: Mapping[str, Tensor]) -> list[str]:
    """Sorted modules a base delta touches (either form)."""
    names = {k[: -len(DENSE_SUFFIX)] for k in delta if k.endswith(DENSE_SUFFIX)}
    names |= {m for m, _, _ in lora_pairs(delta)}
    return sorted(names)


def dense_delta(delta: Mapping[str, Tensor], module: str) -> Tensor:
    """ΔW of one module as an out × in fp32 matrix."""
    if module + DENSE_SUFFIX in delta:
        return delta[module + DENSE_SUFFIX].float()
    return delta[module + B_SUFFIX].double().matmul(delta[module + A_SUFFIX].double()).float()


def fold(delta: Mapping[str, Tensor] | None, update: Mapping[str, Tensor]) -> BaseDelta:
    """The cumulative ΔW after adding ``update`` (PEFT-format factors of any rank per module, or a dense
    ``<module>.base_delta.weight``, which makes that module dense).

    Factor form appends the new factors, ΔW' = [B, B_u] [A; A_u]; a module switches to the
    dense form for good once its factors would hold as many numbers as the matrix.
    """
    out: BaseDelta = dict(delta or {})
    for key in [k for k in update if k.endswith(DENSE_SUFFIX)]:  # a dense update (a streamed FedEx residual): added as is
        module = key[: -len(DENSE_SUFFIX)]
        current = dense_delta(out, module) if module in delta_modules(out) else 0.0
        out.pop(module + B_SUFFIX, None)
        out.pop(module + A_SUFFIX, None)
        out[key] = current + update[key].detach().float()
    for module, b_u, a_u in lora_pairs(update):
        b_u, a_u = b_u.detach().float(), a_u.detach().float()
        out_f, in_f = b_u.shape[0], a_u.shape[1]
        if module + DENSE_SUFFIX in out:
            out[module + DENSE_SUFFIX] = out[module + DENSE_SUFFIX] + (b_u.double() @ a_u.double()).float()
            continue
        if module + B_SUFFIX in out:
            b, a = torch.cat([out[module + B_SUFFIX], b_u], dim=1), torch.cat([out[module + A_SUFFIX], a_u], dim=0)
        else:
            b, a = b_u.clone(), a_u.clone()
        if b.shape[1] * (out_f + in_f) >= out_f * in_f:
            out.pop(module + B_SUFFIX, None)
            out.pop(module + A_SUFFIX, None)
            out[module + DENSE_SUFFIX] = (b.double() @ a.double()).float()
        else:
            out[module + B_SUFFIX], out[module + A_SUFFIX] = b, a
    return out
