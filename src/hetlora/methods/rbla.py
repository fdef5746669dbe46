"""``rbla``: rank-based LoRA aggregation — each rank slice averaged over its owners only.

Slice i (column i of B, row i of A) is averaged with weights q_k renormalised over
the clients with r_k > i, so high-rank slices are not diluted by the zeros that
zero-padding gives low-rank clients. A slice no client trained keeps its previous
global value (zero without one).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate
from .base import AggregationContext, AggregationMethod, data_weights, per_module_factors


class RBLA(AggregationMethod):
    name = "rbla"

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        q = data_weights(updates)
        out: Adapter = {}
        for module, factors in per_module_factors(updates).items():
            b0, a0 = factors[0]
            dtype = torch.promote_types(b0.dtype, torch.float32)
            acc_b = torch.zeros(b0.shape[0], ctx.r_max, dtype=dtype)
            acc_a = torch.zeros(ctx.r_max, a0.shape[1], dtype=dtype)
            mass = torch.zeros(ctx.r_max, dtype=torch.float64)
            for w, (b, a) in zip(q, factors):
                r = a.shape[0]
                acc_b[:, :r].add_(b, alpha=w)
                acc_a[:r].add_(a, alpha=w)
                mass[:r] += w
            covered = mass > 0
            scale = torch.where(covered, 1.0 / mass.clamp_min(1e-300), torch.zeros_like(mass)).to(dtype)
            acc_b *= scale[None, :]
            acc_a *= scale[:, None]
            if ctx.previous is not None:
                empty = ~covered
                acc_b[:, empty] = ctx.previous[module + B_SUFFIX][:, empty].to(dtype)
                acc_a[empty] = ctx.previous[module + A_SUFFIX][empty].to(dtype)
            out[module + B_SUFFIX] = acc_b
            out[module + A_SUFFIX] = acc_a
        return out
