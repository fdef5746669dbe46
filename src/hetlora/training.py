"""Local optimisation, the same for every client kind and engine.

τ local AdamW steps on target-token cross-entropy (plus a penalty term for self-pruning
methods, docs/algorithm.md "Local training"), gradient clipping at ``max_grad_norm``,
batches drawn from a seeded per-(seed, round, client) generator so that a client's round
does not depend on visiting order or on the engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import DEFAULT_SCALE, DEFAULT_TARGETS, RunConfig
from .data.federated import Example, collate
from .evaluate import autocast, target_token_loss
from .memory import RELEASE_EVERY_LAYERS, lean_memory

_D = RunConfig  # the one place the defaults live


@dataclass
class LocalConfig:
    """Local training settings, the same for every method (defaults: :class:`RunConfig`)."""

    local_steps: int = _D.local_steps
    batch_size: int = _D.batch_size
    lr: float = _D.lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = _D.gamma
    lam: float = _D.lam
    r_min: int = _D.r_min
    bf16: bool = _D.bf16
    grad_checkpointing: bool = _D.grad_checkpointing  # recompute activations in backward: far less memory
    release_memory_every: int | None = None  # k: hand freed heap back to the OS every k decoder layers (memory.py)
    scale: float = DEFAULT_SCALE
    targets: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @classmethod
    def from_run(cls, cfg: RunConfig) -> "LocalConfig":
        return cls(
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, gamma=cfg.gamma, lam=cfg.lam,
            r_min=cfg.r_min, bf16=cfg.bf16, grad_checkpointing=cfg.grad_checkpointing,
            release_memory_every=RELEASE_EVERY_LAYERS if cfg.release_memory else None, scale=cfg.lora_scale,
            targets=list(cfg.target_modules),
        )


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


def optimise(model, params, examples, pad_id, cfg: LocalConfig, generator, penalty: Callable[[], torch.Tensor] | None = None) -> list[float]:
    """τ AdamW steps on ``params``; returns the task loss of every step."""
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
