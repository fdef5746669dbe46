"""The full fine-tuning client: every weight trained from the global weights (cost reference)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from ..core.adapter import ClientUpdate, num_parameters
from ..core.validation import LayerShapes
from ..device.memory import peak_rss_mb
from ..device.training import client_seed, optimise
from .base import ClientKind, Measure, held_out_loss
from .job import Job, State

if TYPE_CHECKING:
    from ..device.host import ClientHost


def trainable_state(model) -> dict[str, torch.Tensor]:
    """All weights of a model as detached fp32 copies (tied weights appear once)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.named_parameters()}


def load_weights(model, weights: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


class FFTClient(ClientKind):
    name = "fft"
    rank_tiers = False
    has_adapter = False
    parallel = False  # every client needs its own copy of all weights

    def initial_state(self, host: "ClientHost", rank: int, seed: int) -> State:
        return {"global": trainable_state(host.model)}

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        return state["global"]

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        return num_parameters(state["global"])

    def evaluate(self, state: State, host: "ClientHost", ranks: Sequence[int], base_version: int, examples=None,
                 measure: Measure | None = None) -> dict[int, Any]:
        load_weights(host.model, state["global"])
        return {0: (measure or held_out_loss)(host, examples)}

    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        return [self._train_one(host, job) for job in jobs]

    def _train_one(self, host: "ClientHost", job: Job) -> ClientUpdate:
        """Full fine-tuning of every weight from the global weights in the payload."""
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(client_seed(host.seed, job.round, job.client_id))
        model = host.model
        load_weights(model, job.payload)
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        try:
            (losses,) = optimise(model, list(params.values()), [(host.data.train_examples(job.client_id), generator)],
                                 host.tokenizer.pad_token_id, host.local)
        finally:
            for p in params.values():
                p.requires_grad_(False)
        metrics = {"train_loss": sum(losses) / len(losses), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
        return ClientUpdate(trainable_state(model), host.data.num_examples(job.client_id), client_id=job.client_id,
                            round=job.round, metrics=metrics)
