"""FLoRA's client: a fresh LoRA each round on frozen weights that hold every earlier round's
stacked update (Wang et al., NeurIPS 2024; docs/algorithm.md "flora")."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core.adapter import A_SUFFIX, Adapter, ClientUpdate, lora_pairs, num_bytes
from ..training import client_seed
from .base import ClientKind, Job, State

if TYPE_CHECKING:
    from ..host import ClientHost


def merge_into_base(model, adapter: Adapter, scale: float) -> None:
    """W0 ← W0 + s · B A for every module of ``adapter``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, b, a in lora_pairs(adapter):
            layer = modules[name.removeprefix("base_model.model.")]
            delta = scale * (b.to(layer.weight.device, torch.float32) @ a.to(layer.weight.device, torch.float32))
            layer.weight += delta.to(layer.weight.dtype)


class FLoRAClient(ClientKind):
    name = "flora"
    rank_tiers = False
    has_adapter = False

    def payload(self, state: State, client_id: str, rank: int, round_index: int) -> dict[str, Tensor]:
        return {}  # the fresh LoRA is drawn on the client from (seed, round, client)

    def train(self, host: "ClientHost", job: Job, *, prune: bool) -> ClientUpdate:
        from ..lora import init_global_adapter
        from .lora import train_lora

        seed = client_seed(host.seed, job.round, job.client_id)
        fresh = init_global_adapter(host.model, job.rank, seed, host.local.scale, host.local.targets)
        return train_lora(host, replace(job, payload=fresh), prune=False)

    def download_bytes(self, payload, state: State) -> int:
        return num_bytes(state["global"]) if "merged" in state else 0  # the fresh init is regenerated from a seed

    def after_aggregate(self, state: State, aggregated: Adapter, host: "ClientHost") -> State:
        merge_into_base(host.model, aggregated, host.local.scale)
        modules = dict(host.model.named_modules())
        merged = dict(state.get("merged", {}))
        for key in aggregated:
            if key.endswith(A_SUFFIX):
                path = key[: -len(A_SUFFIX)].removeprefix("base_model.model.")
                merged[path + ".weight"] = modules[path].weight.detach().to("cpu").clone()
        return {**state, "global": aggregated, "merged": merged}

    def restore(self, state: State, host: "ClientHost") -> None:
        if "merged" in state:
            params = dict(host.model.named_parameters())
            with torch.no_grad():
                for k, v in state["merged"].items():
                    params[k].copy_(v)

    def evaluate(self, state: State, host: "ClientHost", ranks: list[int]) -> dict[int, float]:
        return {0: host.evaluate_loss(host.model)}
