"""FLoRA's client (Wang et al., NeurIPS 2024; docs/algorithm.md "flora").

Each round every client starts a fresh LoRA (PEFT's init, seeded by (seed, round,
client)), on frozen weights that hold every earlier round's stacked update. The stacked
update is the method's base update (hetlora.methods.flora), so a client receives the
cumulative base delta, never a global adapter, and the fresh init costs no bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import Tensor

from ..core.adapter import ClientUpdate
from ..device.lora import lora_init, target_shapes
from ..device.training import client_seed
from .job import Job, State
from .base import Measure, held_out_loss
from .lora import LoRAClient, train_lora

if TYPE_CHECKING:
    from ..device.host import ClientHost


class FLoRAClient(LoRAClient):
    name = "flora"
    rank_tiers = False
    has_adapter = False

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        return {}  # the fresh LoRA is drawn on the client

    def evaluate(self, state: State, host: "ClientHost", ranks: Sequence[int], base_version: int, examples=None,
                 measure: Measure | None = None) -> dict[int, Any]:
        host.apply_base_delta(state.get("base_delta"), base_version)
        return {0: (measure or held_out_loss)(host, examples)}

    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        shapes = target_shapes(host.model, host.local.targets)
        fresh = [lora_init(shapes, job.rank, client_seed(host.seed, job.round, job.client_id)) for job in jobs]
        return train_lora(host, jobs, fresh, prune=False)
