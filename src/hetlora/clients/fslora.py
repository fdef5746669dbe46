"""FSLoRA's client: trains the sketch B[:, I_k], A[I_k, :] it received with the forward scaled
by r/m_k (docs/algorithm.md, "fslora"); the server re-derives I_k from (seed, round, client)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from ..core.adapter import ClientUpdate, adapter_rank
from ..core.sketch import gather, sketch_indices
from .job import Job, State
from .lora import LoRAClient, train_lora

if TYPE_CHECKING:
    from ..device.host import ClientHost


class FSLoRAClient(LoRAClient):
    name = "fslora"

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        r = adapter_rank(state["global"])
        return gather(state["global"], sketch_indices(seed, round_index, client_id, rank, r))

    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        r = host.cfg.global_rank
        return train_lora(host, jobs, [job.payload for job in jobs], prune=False, scales=[r / job.rank for job in jobs])
