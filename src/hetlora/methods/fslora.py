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

The norm bound (docs/algorithm.md §5) applies to each client's *change* Δ_k on its sketch:
scaling the sketch itself would move an honest client's components towards zero.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ..core.adapter import Adapter, ClientUpdate, adapter_rank
from ..core.accumulate import PaddedSum
from ..core.robust import change_factors, change_norm, require_finite_norms
from ..core.validation import InvalidUpdate
from ..core.sketch import gather, sketch_indices
from .base import AggregationContext, AggregationMethod


class FSLoRA(AggregationMethod):
    name = "fslora"
    needs_round = True
    client_kind = "fslora"
    options = ("server_lr",)
    stream_change = True  # previous + η/K Σ_k Δ_k: each change is its client's alone (streaming.ChangeRound)

    @staticmethod
    def sketch(u: ClientUpdate, ctx: AggregationContext) -> list[int]:
        """I_k of the update's client, re-derived from the rank the server *sent* it (ctx.ranks) when known:
        an update of another size would be read against the wrong components, so it is refused."""
        rank = adapter_rank(u.adapter)
        sent = ctx.ranks.get(str(u.client_id)) if ctx.ranks is not None else None
        if sent is not None and sent != rank:
            raise InvalidUpdate(u.client_id, f"sent a sketch of {rank} components, but was sent {sent}")
        return sketch_indices(ctx.seed, ctx.round_index, str(u.client_id), sent or rank, ctx.r_max)

    def sent_and_change(self, u: ClientUpdate, ctx: AggregationContext) -> tuple[list[int], Adapter, Adapter]:
        """(I_k, what client k was sent, its change Δ_k on the sketch, float64)."""
        if ctx.previous is None:
            raise ValueError("fslora aggregates changes: it needs the previous global adapter")
        indices = self.sketch(u, ctx)
        sent = gather(ctx.previous, indices)
        return indices, sent, {k: u.adapter[k].double() - sent[k].double() for k in sent}

    def change_norm(self, u: ClientUpdate, ctx: AggregationContext) -> float:
        """The bound's norm of client k's change (core.robust.change_norm)."""
        return change_norm(u.adapter, self.sent_and_change(u, ctx)[2])

    def bound_one(self, u: ClientUpdate, factor: float, ctx: AggregationContext) -> ClientUpdate:
        """Client k's update with its change × ``factor``: what it was sent plus the scaled change, in fp32."""
        if factor == 1.0:
            return u
        _, sent, change = self.sent_and_change(u, ctx)
        return replace(u, adapter={k: (sent[k].double() + change[k] * factor).float() for k in sent})

    def bound(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> list[ClientUpdate]:
        """Bound each client's change on its sketch (its pseudo-gradient), not the sketch itself."""
        norms = [self.change_norm(u, ctx) for u in updates]
        require_finite_norms(updates, norms, "‖Δ‖ of the update")
        return [self.bound_one(u, factor, ctx) for u, factor in zip(updates, change_factors(norms, ctx.norm_bound))]

    def fold_change(self, acc: PaddedSum, u: ClientUpdate, ctx: AggregationContext) -> None:
        """Δ_k added onto the components of its sketch."""
        indices, _, change = self.sent_and_change(u, ctx)
        acc.add(change, 1.0, indices=indices)

    def finish_changes(self, acc: PaddedSum, clients: int, ctx: AggregationContext) -> Adapter:
        """The server step: previous + η · (Σ_k Δ_k) / K."""
        lr = float(ctx.options.get("server_lr", 1.0))
        step = acc.total(torch.float64)
        return {key: (ctx.previous[key].double() + lr * step[key] / clients).float() for key in ctx.previous}

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: AggregationContext) -> Adapter:
        acc = PaddedSum(ctx.r_max)
        for u in updates:  # each change lands on the components of its sketch
            self.fold_change(acc, u, ctx)
        return self.finish_changes(acc, len(updates), ctx)
