"""Fed-PLoRA's client, Select-N-Fold (Zhang, Hu & Xu, ICLR 2026, arXiv 2602.16936; docs/algorithm.md "fed-plora").

The global adapter is R = r_max rank-1 modules (B[:, j], A[j, :]). A client of rank r_k receives all of them,
selects r_k uniformly at random (seeded by (seed, round, client): the server re-derives the choice), folds the
others into its frozen weights, W = W0 + s·Σ_{j∉K} B_j A_j, and trains the selected ones from their global values.
Its model at the start of training is therefore exactly the global model: it never sees a truncated adapter. It
sends back its r_k trained modules.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from ..core.adapter import ClientUpdate, adapter_rank
from ..core.base_delta import fold
from ..core.sketch import PLORA_STREAM, complement, gather, selected_modules
from .job import Job, State
from .lora import LoRAClient, train_lora

if TYPE_CHECKING:
    from ..device.host import ClientHost


class PLoRAClient(LoRAClient):
    name = "plora"
    rank_tiers = False  # every client runs the whole global model (the unselected modules folded in)
    parallel = False  # each client folds a different part of the global adapter into the one frozen model

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        return dict(state["global"])  # all R modules: the selected to train, the others to fold

    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        """Each job alone (its own fold), never self-pruning: the server reads its modules at the selected indices."""
        return [update for job in jobs for update in train_lora(host, *self.client_start(job, host.seed), prune=False)]

    @staticmethod
    def client_start(job: Job, seed: int) -> tuple[list[Job], list[dict[str, Tensor]]]:
        """([the job with the unselected modules folded into its base], [the selected modules to train]): with
        ``host.apply_base_delta`` and the LoRA, W0 + s·Σ_{j∉K} B_j A_j + s·B_K A_K, the global model."""
        r = adapter_rank(job.payload)
        chosen = selected_modules(seed, job.round, job.client_id, job.rank, r)
        rest = complement(chosen, r)
        base = dict(fold(job.base or None, gather(job.payload, rest))) if rest else job.base
        own = replace(job, base=base, base_version=(PLORA_STREAM, job.base_version, job.round, job.client_id))
        return [own], [gather(job.payload, chosen)]
