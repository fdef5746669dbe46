"""Local optimisation, the same for every client kind and engine.

τ local AdamW steps on target-token cross-entropy (plus λ·P_k for self-pruning methods,
docs/algorithm.md "Local training"), gradient clipping at ``max_grad_norm``, batches drawn
from a seeded per-(seed, round, client) generator so a client's round depends neither on
visiting order nor on the engine.

K clients can train together on one frozen model (a :class:`hetlora.device.lora.LoRABank` with K
slots): the batch is K groups of rows, the objective is the sum of the K clients'
objectives, so each slot's gradient is its own client's; AdamW is element-wise, and
clipping is done per slot — K clients trained together equal K clients trained in turn
(within float rounding; tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..config import DEFAULT_SCALE, DEFAULT_TARGETS, RunConfig
from ..core.seeds import derive_seed
from ..data.federated import Example, collate
from .evaluate import autocast, target_token_losses
from .memory import lean_memory

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
    bf16: bool = False  # resolved from RunConfig.precision by the host
    grad_checkpointing: bool = False  # recompute activations in backward: far less memory (resolved by from_run)
    ordered_dropout: bool = _D.ordered_dropout  # train a random prefix of the components each step (clients/lora.py)
    scale: float = DEFAULT_SCALE
    targets: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @classmethod
    def from_run(cls, cfg: RunConfig, bf16: bool = False, device_client: bool = False) -> "LocalConfig":
        """``device_client``: a client on its own device (a Flower ClientApp), where gradient checkpointing is
        on unless the config says otherwise (its step cost 13–18 % more for 0.47× the peak memory:
        benchmarks/footprint.py); in-process clients share the server's machine and favour speed."""
        checkpointing = cfg.checkpointing(device_client)
        return cls(
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, gamma=cfg.gamma, lam=cfg.lam,
            r_min=cfg.r_min, bf16=bf16, grad_checkpointing=checkpointing,
            scale=cfg.lora_scale,
            ordered_dropout=cfg.ordered_dropout,
            targets=list(cfg.target_modules),
        )


def client_seed(seed: int, round_index: int, client_id: str) -> int:
    """A seed for one client's round: batches and fresh inits do not depend on visiting order."""
    return derive_seed(seed, round_index, client_id)


def batches(examples: list[Example], batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[Example]]:
    """``steps`` batches drawn by walking seeded permutations of the client's examples."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        yield [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]


def clip_per_slot(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each slot (dim 0) of stacked parameters on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = sum(g.float().pow(2).flatten(1).sum(1) for g in grads)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


def optimise(
    model,
    params: Sequence[torch.Tensor],
    groups: Sequence[tuple[list[Example], torch.Generator]],
    pad_id: int,
    cfg: LocalConfig,
    penalty: Callable[[], torch.Tensor] | None = None,
    slotted: bool = False,
    before_step: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """τ AdamW steps for ``len(groups)`` clients at once; returns each client's task loss per step.

    ``groups``: each client's examples and batch generator. ``slotted``: ``params`` are
    stacked per client on dim 0 (a LoRA bank) and clipped per client; otherwise there is
    one client and clipping is over all ``params``. ``before_step(i)`` runs before step i's forward
    (ordered dropout picks each client's prefix there).
    """
    device = next(model.parameters()).device
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimiser.zero_grad(set_to_none=True)  # a stale gradient from anywhere else must not leak into step 1
    model.train()
    streams = [batches(examples, cfg.batch_size, cfg.local_steps, g) for examples, g in groups]
    losses: list[list[float]] = [[] for _ in groups]
    try:
        with lean_memory(model, checkpointing=cfg.grad_checkpointing):
            for step in range(cfg.local_steps):
                if before_step is not None:
                    before_step(step)
                batch = {key: v.to(device) for key, v in collate([e for stream in streams for e in next(stream)], pad_id).items()}
                per_client = backward_step(model, batch, len(groups), cfg, penalty, device.type)
                clip_gradients(params, cfg.max_grad_norm, slotted)
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                for i, value in enumerate(per_client.tolist()):
                    losses[i].append(value)
    finally:
        optimiser.zero_grad(set_to_none=True)
        model.eval()
    return losses


def backward_step(model, batch, k: int, cfg: LocalConfig, penalty: Callable[[], torch.Tensor] | None, device_type: str) -> torch.Tensor:
    """Forward and backward of one step: Σ_k (client k's mean target-token loss) + λ·penalty; each client's loss."""
    with autocast(device_type, cfg.bf16):
        loss_rows, count_rows = target_token_losses(model, batch)
    per_client = loss_rows.view(k, -1).sum(1) / count_rows.view(k, -1).sum(1).clamp(min=1)
    total = per_client.sum()
    if penalty is not None:
        total = total + cfg.lam * penalty()
    total.backward()
    return per_client.detach()


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float | None, slotted: bool) -> None:
    """Clip to ``max_norm``: per client (a LoRA bank's slot) or over all ``params`` (one client); off if unset."""
    if not max_norm:
        return
    if slotted:
        clip_per_slot(params, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

