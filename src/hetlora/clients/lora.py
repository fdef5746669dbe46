"""The LoRA client's local round (docs/algorithm.md, "Local training"): ``train_lora``.

(The LoRA bank it trains in is ``hetlora/device/lora.py``; one optimiser step is
``hetlora.device.training.optimise``.)

Each job's start adapter goes into its own slot of the host's LoRA bank; the clients
train together for τ steps on task loss + λ·P_k (when the method prunes); then each
client's prune rule is applied on its own and its adapter is read back at its
(possibly smaller) rank.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from ..core.adapter import ClientUpdate, adapter_rank, truncate_adapter
from ..core.validation import LayerShapes
from ..core.pruning import prune_rank, tail_penalty, tail_start
from ..device.memory import peak_rss_mb
from ..core.seeds import derive_seed
from ..device.lora import lora_init, target_shapes
from ..device.training import client_seed, optimise

from .base import ClientKind, Measure, held_out_loss
from .job import Job, State

if TYPE_CHECKING:
    from ..device.host import ClientHost


def prefix_ranks(seed: int, job: "Job", rank: int, r_min: int, steps: int) -> list[int]:
    """Ordered dropout (FjORD; docs/algorithm.md §3): the prefix r' ∈ [min(r_min, r_k), r_k] each local step
    trains, uniform and seeded by (seed, round, client), so the leading components see every step and
    carry the most signal. r_min = r_k gives r' = r_k: plain training."""
    low = min(r_min, rank)
    g = torch.Generator().manual_seed(derive_seed("ordered-dropout", seed, job.round, job.client_id))
    return [int(x) for x in torch.randint(low, rank + 1, (steps,), generator=g)]


def train_lora(
    host: "ClientHost", jobs: Sequence["Job"], starts: Sequence[Mapping[str, Tensor]], *, prune: bool, freeze_a: bool = False,
    scales: Sequence[float] | None = None, keep_tail: bool = False,
) -> list[ClientUpdate]:
    """Train one LoRA per job from ``starts`` (each exactly at its job's rank), together.

    ``scales``: an extra factor per client on the LoRA scaling s (FSLoRA's r/m). ``keep_tail``: read
    each adapter at the rank it trained, the prune decision only in ``metrics["rank_out"]`` (a secure
    sum carries a pruned tail, docs/algorithm.md §6.1)."""
    t0 = time.perf_counter()
    cfg = host.local
    bank, ranks = load_jobs(host, jobs, starts)
    cuts = [tail_start(r, cfg.gamma) for r in ranks]

    def penalties() -> list[Tensor]:
        return [tail_penalty(bank.pairs(slot), c) for slot, c in enumerate(cuts)]

    with torch.no_grad():
        p_before = [float(p) for p in penalties()]
    losses = local_steps(host, bank, jobs, ranks, penalties if prune else None, freeze_a, scales)
    with torch.no_grad():
        p_after = [float(p) for p in penalties()]
    seconds = (time.perf_counter() - t0) / len(jobs)
    return [read_update(host, bank, slot, job, ranks[slot], p_before[slot], p_after[slot], losses[slot], prune, seconds, len(jobs),
                        keep_tail) for slot, job in enumerate(jobs)]


def load_jobs(host: "ClientHost", jobs: Sequence["Job"], starts: Sequence[Mapping[str, Tensor]]):
    """The bank with one slot per job, each loaded from its start adapter; (bank, ranks). A start that is
    not at the job's rank is refused (the server sent something else than it says)."""
    host.apply_base_delta(jobs[0].base, jobs[0].base_version)
    bank = host.bank(len(jobs), max(adapter_rank(start) for start in starts))
    ranks = [bank.load(slot, start) for slot, start in enumerate(starts)]
    for job, r in zip(jobs, ranks):
        if r != job.rank:
            raise ValueError(f"client {job.client_id}: received an adapter of rank {r}, expected its rank {job.rank}")
    return bank, ranks


def local_steps(host: "ClientHost", bank, jobs: Sequence["Job"], ranks: list[int], penalties, freeze_a: bool,
                scales: Sequence[float] | None) -> list[list[float]]:
    """τ optimiser steps on every slot together (task loss, + λ·P_k when ``penalties`` is given); each
    client's batches from its own seeded generator. Returns each slot's losses."""
    cfg, k = host.local, len(jobs)
    groups = [
        (host.data.train_examples(job.client_id), torch.Generator().manual_seed(client_seed(host.seed, job.round, job.client_id)))
        for job in jobs
    ]
    params = bank.factors(freeze_a)
    for p in params:
        p.requires_grad_(True)
    prefixes = [prefix_ranks(host.seed, job, r, cfg.r_min, cfg.local_steps) for job, r in zip(jobs, ranks)] if cfg.ordered_dropout else None
    try:
        with bank.use(k, max(ranks), scales):
            penalty = (lambda: torch.stack(penalties()).sum()) if penalties is not None else None
            before_step = (lambda step: bank.use_prefixes([p[step] for p in prefixes])) if prefixes else None
            return optimise(host.model, params, groups, host.tokenizer.pad_token_id, cfg, penalty, slotted=True,
                            before_step=before_step)
    finally:
        for p in bank.parameters():
            p.requires_grad_(False)


def read_update(host: "ClientHost", bank, slot: int, job: "Job", rank: int, p_before: float, p_after: float,
                losses: list[float], prune: bool, seconds: float, parallel: int, keep_tail: bool = False) -> ClientUpdate:
    """Slot ``slot``'s update: its rank after the prune rule (docs/algorithm.md §2.2), its adapter read at it
    (``keep_tail``: at the rank it trained)."""
    cfg = host.local
    new_rank = prune_rank(p_before, p_after, rank, cfg.gamma, cfg.r_min) if prune else rank
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "p_before": p_before,
        "p_after": p_after,
        "rank_in": rank,
        "rank_out": new_rank,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "parallel": parallel,
    }
    read_rank = rank if keep_tail else new_rank
    return ClientUpdate(bank.read(slot, read_rank), host.data.num_examples(job.client_id), client_id=job.client_id,
                        rank=read_rank, round=job.round, metrics=metrics)


class LoRAClient(ClientKind):
    """The LoRA client (A and B trained, optional rank self-pruning); ffa, flora and fslora extend it."""

    name = "lora"

    # ------------------------------------------------------------------ server side
    def initial_state(self, host: "ClientHost", rank: int, seed: int) -> State:
        """Global A from PEFT's default init at the global rank (seeded), B = 0."""
        return {"global": lora_init(target_shapes(host.model, host.local.targets), rank, seed)}

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        """What client ``client_id`` receives: the leading ``rank`` components of the global adapter."""
        return truncate_adapter(state["global"], rank)

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        """(out + in)·r per adapted module."""
        return sum((o + i) * rank for o, i in shapes.values())

    def evaluate(self, state: State, host: "ClientHost", ranks: Sequence[int], base_version: int, examples=None,
                 measure: Measure | None = None) -> dict[int, Any]:
        """Held-out loss (or ``measure``) of the global model truncated to each rank."""
        measure = measure or held_out_loss
        host.apply_base_delta(state.get("base_delta"), base_version)
        bank = host.bank(1, max(ranks))
        out = {}
        for r in ranks:
            bank.load(0, truncate_adapter(state["global"], r))
            with bank.use(1, r):
                out[r] = measure(host, examples)
        return out

    # ------------------------------------------------------------------ client side
    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool, keep_tail: bool = False) -> list[ClientUpdate]:
        """Train ``jobs`` together (one slot each) from their payloads (``keep_tail``: see :func:`train_lora`)."""
        return train_lora(host, jobs, [job.payload for job in jobs], prune=prune, freeze_a=self.freeze_a, keep_tail=keep_tail)
