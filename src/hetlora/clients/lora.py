"""The LoRA client's local round (docs/algorithm.md, "Local training").

Receives the leading r_k components of the global adapter, runs τ local steps on
task loss + λ·P_k (when the method prunes), applies the prune rule and returns the
trained adapter at the possibly smaller rank.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..core.adapter import ClientUpdate, truncate_adapter
from ..core.pruning import prune_rank, tail_penalty, tail_start
from ..memory import peak_rss_mb
from ..training import client_seed, optimise

if TYPE_CHECKING:
    from ..host import ClientHost
    from .base import Job


def _lora_pairs_live(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) weight tensors of every LoRA layer, live (differentiable)."""
    pairs = []
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {}):
            pairs.append((module.lora_B["default"].weight, module.lora_A["default"].weight))
    return pairs


def train_lora(host: "ClientHost", job: "Job", *, prune: bool, freeze_a: bool = False) -> ClientUpdate:
    """Train a rank-``job.rank`` LoRA from ``job.payload`` (which must be exactly that rank)."""
    from ..lora import adapter_state, attach_lora, detach_lora, load_adapter_strict

    cfg, rank = host.local, job.rank
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(client_seed(host.seed, job.round, job.client_id))
    examples = host.data.train_examples(job.client_id)
    peft_model = attach_lora(host.model, rank, cfg.scale, cfg.targets)
    try:
        load_adapter_strict(peft_model, job.payload)
        live = _lora_pairs_live(peft_model)
        params = [b for b, _ in live] if freeze_a else [p for pair in live for p in pair]
        if freeze_a:
            for _, a in live:
                a.requires_grad_(False)
        c = tail_start(rank, cfg.gamma)
        p_before = float(tail_penalty([(b.detach(), a.detach()) for b, a in live], c))
        penalty = (lambda: tail_penalty(live, c)) if prune else None
        losses = optimise(peft_model, params, examples, host.tokenizer.pad_token_id, cfg, generator, penalty)
        p_after = float(tail_penalty([(b.detach(), a.detach()) for b, a in live], c))
        adapter = adapter_state(peft_model)
    finally:
        detach_lora(peft_model)
    new_rank = prune_rank(p_before, p_after, rank, cfg.gamma, cfg.r_min) if prune else rank
    if new_rank < rank:
        adapter = truncate_adapter(adapter, new_rank)
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "p_before": p_before,
        "p_after": p_after,
        "rank_in": rank,
        "rank_out": new_rank,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    return ClientUpdate(adapter, host.data.num_examples(job.client_id), client_id=job.client_id, rank=new_rank,
                        round=job.round, metrics=metrics)
