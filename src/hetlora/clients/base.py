"""A client kind: everything that differs between the ways a client can train.

The server keeps a *global state*: named groups of tensors, ``{"global": adapter}`` plus
what a kind needs (``"base_delta"``: updates folded into the frozen weights). It sends
each sampled client a :class:`Job`. A kind owns, in one class: the payload a client
receives, local training, evaluation of the global model, byte accounting, the
trainable-parameter count, and what the server's state becomes after an aggregate.
``Federation`` (hetlora.federation) orchestrates and never asks which kind it runs.

Adding a kind: subclass :class:`ClientKind` in one module here, add it to
``hetlora.clients.CLIENT_KINDS``, and name it as ``client_kind`` of a method
(docs/algorithm.md, "Adding a client kind").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from ..core.adapter import Adapter, ClientUpdate, num_bytes, truncate_adapter
from ..core.base_delta import fold
from ..core.validation import LayerShapes

if TYPE_CHECKING:
    from ..host import ClientHost

State = dict[str, dict[str, Tensor]]


@dataclass
class Job:
    """One client's task for one round, as the server sends it.

    ``payload``: the tensors of its kind (LoRA: the truncated global adapter);
    ``base``: the cumulative update folded into the frozen weights (empty for most
    methods) and ``base_version``, the round that last changed it.
    """

    client_id: str
    rank: int
    round: int
    payload: dict[str, Tensor]
    base: dict[str, Tensor] = field(default_factory=dict)
    base_version: int = 0


class ClientKind:
    """The LoRA client (A and B trained, optional rank self-pruning); other kinds override what differs."""

    name = "lora"
    #: the global model can be truncated to each client rank tier and evaluated there
    rank_tiers = True
    #: train only B (A frozen)
    freeze_a = False
    #: the run ends with a global LoRA adapter to save (``OUT/adapter``) and export
    has_adapter = True
    #: how many clients may train together in one process (one shared frozen model)
    parallel = True

    # ------------------------------------------------------------------ server side
    def initial_state(self, host: "ClientHost", rank: int, seed: int) -> State:
        """Global A from PEFT's default init at the global rank (seeded), B = 0."""
        from ..lora import lora_init, target_shapes

        return {"global": lora_init(target_shapes(host.model, host.local.targets), rank, seed)}

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        """What client ``client_id`` receives: the leading ``rank`` components of the global adapter."""
        return truncate_adapter(state["global"], rank)

    def download_bytes(self, job: Job) -> int:
        return num_bytes(job.payload) + num_bytes(job.base)

    def upload_bytes(self, update: ClientUpdate) -> int:
        return num_bytes(update.adapter)

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        """(out + in)·r per adapted module."""
        return sum((o + i) * rank for o, i in shapes.values())

    def after_aggregate(self, state: State, aggregated: Adapter, base_update: Adapter | None) -> State:
        """The server's state after a round: the aggregate becomes the global adapter; a
        method's base update is folded into the cumulative base delta."""
        new = {**state, "global": aggregated}
        if base_update:
            new["base_delta"] = fold(state.get("base_delta"), base_update)
        return new

    def evaluate(self, state: State, host: "ClientHost", ranks: Sequence[int], base_version: int, examples=None) -> dict[int, float]:
        """Held-out loss of the global model truncated to each rank."""
        host.apply_base_delta(state.get("base_delta"), base_version)
        bank = host.bank(1, max(ranks))
        out = {}
        for r in ranks:
            bank.load(0, truncate_adapter(state["global"], r))
            with bank.use(1, r):
                out[r] = host.evaluate_loss(examples=examples)
        return out

    # ------------------------------------------------------------------ client side
    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        """Train ``jobs`` together (one slot each) from their payloads."""
        from .lora import train_lora

        return train_lora(host, jobs, [job.payload for job in jobs], prune=prune, freeze_a=self.freeze_a)

