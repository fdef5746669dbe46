"""``fslora``: FSLoRA, federated sketching LoRA (Fang et al., arXiv 2501.19389; docs/algorithm.md, "fslora").

The server keeps one rank-r LoRA (r = r_max). Each round, client k gets a sketch: m_k of the
r components (m_k = its rank budget), drawn uniformly without replacement from
(seed, round, client) — :func:`sketch_indices`. It receives B[:, I_k] and A[I_k, :], trains
them with the forward W0 x + s·(r/m_k)·B_I A_I x (the sketching matrix S_k = (r/m_k)·1_I,
E[S_k] = I), and sends them back. The server re-derives I_k, forms each client's change on
its sketch, zero-filled to rank r, and takes a server-optimiser step on the pseudo-gradient
g = −(1/K) Σ_k Δ_k over the K clients of the round:

    B ← B − η g_B,  A ← A − η g_A    (server SGD; η = ``server_lr``, 1 by default).

**Where we differ from the authors' code** (wenzhifang/Federated-Sketching-LoRA-Implementation,
``src/LoRA_Sketching.py``, read 2026-11-27): there, the sketch branches test parameter names
by equality with ``'lora_B'``, never true for PEFT's dotted names, so as published it runs
full-rank FedAvg; the index sets for a module's B and A are drawn separately; a sketch is
drawn per tensor. We draw one index set per client and round, shared by its B columns and A
rows and by every module (so a client's payload is an ordinary rank-m_k adapter), apply r/m
in the forward as the paper's S_k, and step the server with SGD η = 1 (their default is AdamW,
lr 3e-4, over 600 rounds; a handful of rounds here would barely move it). Like the authors we
divide by K, not by the number of clients that drew a component, and weigh clients uniformly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, adapter_rank, lora_pairs
from ..core.seeds import derive_seed
from .base import AggregationContext, AggregationMethod


def sketch_indices(seed: int, round_index: int, client_id: str, m: int, r: int) -> list[int]:
    """I_k: m of the r components, uniform without replacement, a pure function of (seed, round, client)."""
    if not 1 <= m <= r:
        raise ValueError(f"a sketch of {m} components does not fit rank {r}")
    g = torch.Generator().manual_seed(derive_seed("fslora", seed, round_index, client_id))
    return sorted(torch.randperm(r, generator=g)[:m].tolist())


def gather(adapter: Adapter, indices: Sequence[int]) -> Adapter:
    """B[:, I], A[I, :] for every module."""
    idx = torch.tensor(list(indices))
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        out[module + B_SUFFIX] = b[:, idx].clone()
        out[module + A_SUFFIX] = a[idx].clone()
    return out


class FSLoRA(AggregationMethod):
    name = "fslora"
    client_kind = "fslora"
    bounded = False
    options = ("server_lr",)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        if ctx.previous is None:
            raise ValueError("fslora aggregates changes: it needs the previous global adapter")
        lr = float(ctx.options.get("server_lr", 1.0))
        step = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ctx.previous.items()}
        for u in updates:
            indices = sketch_indices(ctx.seed, ctx.round_index, str(u.client_id), adapter_rank(u.adapter), ctx.r_max)
            sent = gather(ctx.previous, indices)
            for module, b, a in lora_pairs(u.adapter):
                step[module + B_SUFFIX][:, indices] += b.double() - sent[module + B_SUFFIX].double()
                step[module + A_SUFFIX][indices] += a.double() - sent[module + A_SUFFIX].double()
        k = len(updates)
        return {key: (ctx.previous[key].double() + lr * step[key] / k).float() for key in ctx.previous}
