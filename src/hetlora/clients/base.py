"""A client kind: everything that differs between the ways a client can train.

The server keeps a *global state* (named groups of tensors: ``{"global": adapter}``,
plus what a kind needs, e.g. FLoRA's merged weights) and sends each sampled client a
:class:`Job`. A kind owns, in one class: the payload it receives, local training,
evaluation of the global model, byte accounting, the trainable-parameter count, what it
keeps in a checkpoint and what the server does with an aggregate. ``Federation``
(hetlora.federation) orchestrates and never asks which kind it runs.

Adding a kind: subclass :class:`ClientKind` in one module here, add it to
``hetlora.clients.CLIENT_KINDS``, and name it as ``client_kind`` of a method
(docs/algorithm.md, "Adding a client kind").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from torch import Tensor

from ..core.adapter import Adapter, ClientUpdate, num_bytes, truncate_adapter
from ..core.validation import LayerShapes

if TYPE_CHECKING:
    from ..host import ClientHost

State = dict[str, dict[str, Tensor]]


@dataclass
class Job:
    """One client's task for one round, as the server sends it: who, at which rank, and the tensors."""

    client_id: str
    rank: int
    round: int
    payload: dict[str, Tensor]


class ClientKind:
    """The LoRA client (A and B trained); other kinds override what differs."""

    name = "lora"
    #: the global model can be truncated to each client rank tier and evaluated there
    rank_tiers = True
    #: train only B (A frozen)
    freeze_a = False
    #: the run ends with a global LoRA adapter to save (``OUT/adapter``) and export
    has_adapter = True

    # ------------------------------------------------------------------ server side
    def initial_state(self, host: "ClientHost", rank: int, seed: int) -> State:
        """Global A from PEFT's default init at the global rank (seeded), B = 0."""
        from ..lora import init_global_adapter

        return {"global": init_global_adapter(host.model, rank, seed, host.local.scale, host.local.targets)}

    def payload(self, state: State, client_id: str, rank: int, round_index: int) -> dict[str, Tensor]:
        """What client ``client_id`` receives: the leading ``rank`` components of the global adapter."""
        return truncate_adapter(state["global"], rank)

    def download_bytes(self, payload: Mapping[str, Tensor], state: State) -> int:
        return num_bytes(payload)

    def upload_bytes(self, update: ClientUpdate) -> int:
        return num_bytes(update.adapter)

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        """(out + in)·r per adapted module."""
        return sum((o + i) * rank for o, i in shapes.values())

    def after_aggregate(self, state: State, aggregated: Adapter, host: "ClientHost") -> State:
        """The server's state after a round: the aggregate becomes the global adapter."""
        return {**state, "global": aggregated}

    def restore(self, state: State, host: "ClientHost") -> None:
        """Re-apply to the server's model what a checkpointed state implies (nothing for LoRA)."""

    def evaluate(self, state: State, host: "ClientHost", ranks: list[int]) -> dict[int, float]:
        """Held-out loss of the global model truncated to each rank."""
        from ..lora import attach_lora, detach_lora, load_adapter_strict

        out = {}
        for r in ranks:
            peft_model = attach_lora(host.model, r, host.local.scale, host.local.targets)
            try:
                load_adapter_strict(peft_model, truncate_adapter(state["global"], r))
                out[r] = host.evaluate_loss(peft_model)
            finally:
                detach_lora(peft_model)
        return out

    # ------------------------------------------------------------------ client side
    def train(self, host: "ClientHost", job: Job, *, prune: bool) -> ClientUpdate:
        from .lora import train_lora

        return train_lora(host, job, prune=prune, freeze_a=self.freeze_a)
