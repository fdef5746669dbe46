"""One client, one round of local training: the same code for every engine.

``train_client`` receives the (truncated) global adapter and the client's rank, runs τ
local AdamW steps on target-token cross-entropy (+ λ·P_k for self-pruning methods,
SPEC.md step 2), applies the prune rule, and returns a :class:`ClientUpdate` at the
possibly smaller rank with metrics. The client kinds follow the method:
``lora`` (A and B trained), ``ffa`` (A frozen), ``flora`` (fresh LoRA on merged
weights, so the received adapter is a fresh init) and ``fft`` (all weights).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .config import DEFAULT_SCALE, DEFAULT_TARGETS
from .core.adapter import ClientUpdate, lora_pairs, truncate_adapter
from .core.pruning import prune_rank, tail_penalty, tail_start
from .data.federated import Example, collate
from .evaluate import autocast, target_token_loss
from .lora import adapter_state, attach_lora, detach_lora, load_adapter_strict
from .memory import lean_memory, peak_rss_mb


@dataclass
class LocalConfig:
    """Local training settings, the same for every method (SPEC.md, What to measure)."""

    local_steps: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = 0.99
    lam: float = 0.01
    r_min: int = 5
    bf16: bool = False
    grad_checkpointing: bool = False  # recompute activations in backward: far less memory, ~1 extra forward
    release_memory_every: int | None = None  # k: hand freed heap back to the OS every k decoder layers (memory.py)
    scale: float = DEFAULT_SCALE
    targets: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def client_seed(seed: int, round_index: int, client_id: str) -> int:
    """A seed for one client's round: batches and fresh inits do not depend on visiting order."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def batches(examples: list[Example], batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` batches drawn by walking seeded permutations of the client's examples."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        yield [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]


def _lora_pairs_live(peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) weight tensors of every LoRA layer, live (differentiable)."""
    pairs = []
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {}):
            pairs.append((module.lora_B["default"].weight, module.lora_A["default"].weight))
    return pairs


def _optimise(model, params, examples, pad_id, cfg: LocalConfig, generator, penalty=None) -> list[float]:
    device = next(model.parameters()).device
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    release_every = cfg.release_memory_every if device.type == "cpu" else None
    with lean_memory(model, release_every=release_every, checkpointing=cfg.grad_checkpointing):
        for batch_examples in batches(examples, cfg.batch_size, cfg.local_steps, generator):
            batch = {k: v.to(device) for k, v in collate(batch_examples, pad_id).items()}
            with autocast(device.type, cfg.bf16):
                loss_sum, n = target_token_loss(model, batch)
            loss = loss_sum / max(n, 1)
            total = loss + cfg.lam * penalty() if penalty is not None else loss
            total.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


def train_lora_client(
    model,
    tokenizer,
    client_id: str,
    examples: list[Example],
    num_examples: int,
    start: Mapping[str, torch.Tensor],
    rank: int,
    cfg: LocalConfig,
    *,
    prune: bool,
    freeze_a: bool = False,
    seed: int = 0,
    round_index: int = 0,
) -> ClientUpdate:
    """Train a rank-``rank`` LoRA from ``start`` (which must be exactly rank ``rank``)."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(client_seed(seed, round_index, client_id))
    peft_model = attach_lora(model, rank, cfg.scale, cfg.targets)
    try:
        load_adapter_strict(peft_model, start)
        live = _lora_pairs_live(peft_model)
        params = [b for b, _ in live] if freeze_a else [p for pair in live for p in pair]
        if freeze_a:
            for _, a in live:
                a.requires_grad_(False)
        c = tail_start(rank, cfg.gamma)
        p_before = float(tail_penalty([(b.detach(), a.detach()) for b, a in live], c))
        penalty = (lambda: tail_penalty(live, c)) if prune else None
        losses = _optimise(peft_model, params, examples, tokenizer.pad_token_id, cfg, generator, penalty)
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
    return ClientUpdate(adapter, num_examples, client_id=client_id, rank=new_rank, round=round_index, metrics=metrics)


def fresh_adapter(model, rank: int, cfg: LocalConfig, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default init at ``rank`` from ``seed`` (FLoRA clients start a fresh LoRA each round)."""
    from .lora import init_global_adapter

    return init_global_adapter(model, rank, seed, cfg.scale, cfg.targets)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """All weights of a model as detached fp32 copies (tied weights appear once)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.named_parameters()}


def train_fft_client(
    model,
    tokenizer,
    client_id: str,
    examples: list[Example],
    num_examples: int,
    start: Mapping[str, torch.Tensor],
    cfg: LocalConfig,
    *,
    seed: int = 0,
    round_index: int = 0,
) -> ClientUpdate:
    """Full fine-tuning of every weight from the global weights ``start``."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(client_seed(seed, round_index, client_id))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in start.items():
            params[k].copy_(v)
    for p in params.values():
        p.requires_grad_(True)
    losses = _optimise(model, list(params.values()), examples, tokenizer.pad_token_id, cfg, generator)
    for p in params.values():
        p.requires_grad_(False)
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    return ClientUpdate(trainable_state(model), num_examples, client_id=client_id, round=round_index, metrics=metrics)


def merge_into_base(model, adapter: Mapping[str, torch.Tensor], scale: float) -> None:
    """W0 ← W0 + s · B A for every module of ``adapter`` (FLoRA folds the stacked update in)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, b, a in lora_pairs(adapter):
            path = name.removeprefix("base_model.model.")
            layer = modules[path]
            delta = scale * (b.to(layer.weight.device, torch.float32) @ a.to(layer.weight.device, torch.float32))
            layer.weight += delta.to(layer.weight.dtype)


