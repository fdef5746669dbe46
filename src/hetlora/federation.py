"""The server's round logic and the client entry point, shared by every engine.

One :class:`Federation` holds the base model, the data, each client's rank and the
global state. A round is ``sample`` → ``payload`` (truncation, SPEC.md step 1) for each
client → ``train`` on the client → ``complete_round`` (validate, drop bad updates,
aggregate, update ranks, evaluate). The in-process runner calls these directly; the
Flower apps call the same methods on either side of the wire.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from typing import Any, Mapping, Sequence

import torch

from .client import LocalConfig, client_seed, fresh_adapter, merge_into_base, trainable_state, train_fft_client, train_lora_client
from .config import RunConfig
from .core.adapter import A_SUFFIX, B_SUFFIX, Adapter, ClientUpdate, num_bytes, num_parameters, truncate_adapter
from .core.dp import dp_aggregate
from .core.ranks import assign_ranks
from .core.validation import layer_shapes, split_valid
from .evaluate import evaluate_loss, perplexity
from .lora import attach_lora, detach_lora, init_global_adapter, load_adapter_strict
from .memory import RELEASE_EVERY_LAYERS
from .methods import aggregate, get_method

log = logging.getLogger(__name__)


def sample_clients(client_ids: Sequence[str], k: int, seed: int, round_index: int) -> list[str]:
    """K clients uniformly without replacement, a pure function of (seed, round)."""
    return sorted(random.Random(f"sample:{seed}:{round_index}").sample(list(client_ids), min(k, len(client_ids))))


def tier_ranks_for_eval(ranks: Mapping[str, int], r_min: int, r_max: int) -> list[int]:
    """The rank tiers to evaluate truncations at: the distinct ranks if few, else min/median/max."""
    distinct = sorted(set(ranks.values()))
    if len(distinct) <= 4:
        return distinct
    return sorted({r_min, int(statistics.median(distinct)), r_max})


class Federation:
    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, data=None):
        from .data import load_data
        from .models import load_base_model

        self.cfg = cfg.validate()
        self.method = get_method(cfg.method)
        if model is None:
            model, tokenizer = load_base_model(cfg.model)
        device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
        self.model, self.tokenizer = model.to(device), tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        if data is None:
            data = load_data(cfg.data, tokenizer, **cfg.data_options())
        self.data = data
        ids = data.client_ids
        self.client_ids = ids[: cfg.max_clients] if cfg.max_clients else ids
        self.local = LocalConfig(
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, gamma=cfg.gamma, lam=cfg.lam,
            r_min=cfg.r_min, bf16=cfg.bf16, grad_checkpointing=cfg.grad_checkpointing,
            release_memory_every=RELEASE_EVERY_LAYERS if cfg.release_memory else None, scale=cfg.lora_scale,
            targets=list(cfg.target_modules),
        )
        r = cfg.global_rank
        if self.method.uniform_rank:
            self.ranks = {c: r for c in self.client_ids}
        else:
            self.ranks = assign_ranks(self.client_ids, cfg.rank_dist, cfg.r_min, r, cfg.seed, cfg.ranks)
        self.assigned = dict(self.ranks)
        self.tiers = [] if self.method.uniform_rank or self.kind in ("fft", "flora") else tier_ranks_for_eval(self.ranks, cfg.r_min, r)
        if self.kind == "fft":
            self.global_state: Adapter = trainable_state(self.model)
        else:
            self.global_state = init_global_adapter(self.model, r, cfg.seed, cfg.lora_scale, self.local.targets)
        self.shapes = layer_shapes(self.global_state) if self.kind != "fft" else {}
        self.round = 0  # rounds completed
        self.download_bytes = 0  # flora: the stacked update every client must fetch and merge
        self.merged: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def kind(self) -> str:
        return self.method.client_kind

    def trainable_params(self) -> int:
        """Weights a client of the global rank trains: (out + in)·r per module, out·r for FFA, all for FFT."""
        if self.kind == "fft":
            return num_parameters(self.global_state)
        r = self.cfg.global_rank
        if self.kind == "ffa":
            return sum(o * r for o, _ in self.shapes.values())
        return sum((o + i) * r for o, i in self.shapes.values())

    def sample(self, round_index: int) -> list[str]:
        return sample_clients(self.client_ids, self.cfg.clients_per_round, self.cfg.seed, round_index)

    # ------------------------------------------------------------------ server -> client
    def payload(self, client_id: str, round_index: int) -> tuple[Adapter, int]:
        """What the server sends a client: its truncation of the global adapter and its rank."""
        rank = self.ranks[client_id]
        if self.kind == "fft":
            return self.global_state, 0
        if self.kind == "flora":
            return fresh_adapter(self.model, rank, self.local, client_seed(self.cfg.seed, round_index, client_id)), rank
        return truncate_adapter(self.global_state, rank), rank

    def download_cost(self, payload: Adapter) -> int:
        if self.kind == "flora":
            return self.download_bytes  # the fresh init is regenerated from a seed
        return num_bytes(payload)

    def upload_cost(self, update: ClientUpdate) -> int:
        if self.kind == "ffa":
            return sum(v.numel() * v.element_size() for k, v in update.adapter.items() if k.endswith(B_SUFFIX))
        return num_bytes(update.adapter)

    # ------------------------------------------------------------------ client side
    def train(self, client_id: str, start: Adapter, rank: int, round_index: int) -> ClientUpdate:
        """Run one client's local round on this process's model and data."""
        examples = self.data.train_examples(client_id)
        n = self.data.num_examples(client_id)
        common = dict(seed=self.cfg.seed, round_index=round_index)
        if self.kind == "fft":
            return train_fft_client(self.model, self.tokenizer, client_id, examples, n, start, self.local, **common)
        return train_lora_client(
            self.model, self.tokenizer, client_id, examples, n, start, rank, self.local,
            prune=self.cfg.prunes, freeze_a=self.kind == "ffa", **common,
        )

    # ------------------------------------------------------------------ aggregation
    def complete_round(self, round_index: int, updates: Sequence[ClientUpdate], failed: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Validate, aggregate, update ranks; returns the round's metrics (without eval)."""
        cfg = self.cfg
        if self.kind == "fft":
            kept, dropped = self._split_fft(updates)
        else:
            kept, dropped = split_valid(
                updates, cfg.global_rank, self.shapes, assigned_ranks=self.ranks, round_index=round_index
            )
        dropped = [{"client": c, "reason": r} for c, r in list(failed) + dropped]
        for d in dropped:
            log.warning("round %d: dropped client %s: %s", round_index + 1, d["client"], d["reason"])
        aggregated = len(kept) >= cfg.min_clients
        if aggregated:
            self._aggregate(round_index, kept)
            for u in kept:
                if u.client_id in self.ranks and self.kind != "fft":
                    self.ranks[u.client_id] = int(u.rank if u.rank is not None else self.ranks[u.client_id])
        self.round = round_index + 1
        train_losses = [u.metrics.get("train_loss") for u in kept if u.metrics.get("train_loss") is not None]
        return {
            "round": round_index + 1,
            "method": cfg.method,
            "clients": [u.client_id for u in kept],
            "aggregated": aggregated,
            "dropped": dropped,
            "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
            "ranks": {c: self.ranks[c] for c in sorted({u.client_id for u in updates if u.client_id in self.ranks})},
            "client_ranks_in": {u.client_id: u.metrics.get("rank_in") for u in kept},
            "bytes_up": sum(self.upload_cost(u) for u in kept),
            "client_seconds": sum(u.metrics.get("seconds", 0.0) for u in kept),
            "peak_rss_mb": max((u.metrics.get("peak_rss_mb", 0.0) for u in kept), default=0.0),
        }

    def _split_fft(self, updates):
        kept, dropped = [], []
        for u in updates:
            try:
                self.method.validate([u] if not kept else [kept[0], u], 0)
                kept.append(u)
            except ValueError as err:
                dropped.append((u.client_id, str(getattr(err, "problem", err))))
        return kept, dropped

    def _aggregate(self, round_index: int, kept: Sequence[ClientUpdate]) -> None:
        cfg = self.cfg
        if cfg.dp_clip is not None:
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, round_index, "dp-noise"))
            self.global_state = dp_aggregate(
                self.global_state, kept, cfg.global_rank, clip_norm=cfg.dp_clip, noise_multiplier=cfg.dp_noise,
                expected_clients=cfg.clients_per_round, generator=gen,
            )
            return
        options = {"per_layer": True} if cfg.per_layer and cfg.method == "hetlora" else {}
        new = aggregate(cfg.method, kept, cfg.global_rank, norm_bound=cfg.norm_bound if self.kind == "lora" else None,
                        previous=self.global_state if self.kind != "fft" else None, shapes=self.shapes or None, **options)
        if self.kind == "flora":
            merge_into_base(self.model, new, cfg.lora_scale)
            self._record_merge(new)
            self.download_bytes = num_bytes(new)
        self.global_state = new

    def _record_merge(self, stacked: Adapter) -> None:
        """Keep the merged weights of adapted modules so a checkpoint can restore them."""
        modules = dict(self.model.named_modules())
        for key in stacked:
            if key.endswith(A_SUFFIX):
                path = key[: -len(A_SUFFIX)].removeprefix("base_model.model.")
                self.merged[path + ".weight"] = modules[path].weight.detach().to("cpu").clone()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, ranks: Sequence[int] | None = None) -> dict[int, float]:
        """Held-out target-token loss of the global model at each rank (global rank if None)."""
        examples = self.data.eval_examples()
        pad = self.tokenizer.pad_token_id
        bs, bf16 = self.cfg.eval_batch_size, self.cfg.bf16
        if self.kind == "fft":
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in self.global_state.items():
                    params[k].copy_(v)
            return {0: evaluate_loss(self.model, examples, pad, bs, bf16)}
        if self.kind == "flora":
            return {0: evaluate_loss(self.model, examples, pad, bs, bf16)}
        out = {}
        for r in ranks or [self.cfg.global_rank]:
            peft_model = attach_lora(self.model, r, self.cfg.lora_scale, self.local.targets)
            try:
                load_adapter_strict(peft_model, truncate_adapter(self.global_state, r))
                out[r] = evaluate_loss(peft_model, examples, pad, bs, bf16)
            finally:
                detach_lora(peft_model)
        return out

    def eval_metrics(self, with_tiers: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        losses = self.evaluate()
        loss = next(iter(losses.values()))
        row: dict[str, Any] = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
        if with_tiers and self.tiers:
            tiers = self.evaluate(self.tiers)
            row["tier_eval_ppl"] = {str(r): perplexity(v) for r, v in tiers.items()}
        row["eval_seconds"] = time.perf_counter() - t0
        return row

    # ------------------------------------------------------------------ checkpoint state
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        tensors = {"global": self.global_state}
        if self.kind == "flora" and self.merged:
            tensors["merged"] = self.merged
        return tensors

    def state_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "ranks": self.ranks,
            "download_bytes": self.download_bytes,
            "torch_rng": torch.get_rng_state().tolist(),
        }

    def restore(self, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]) -> None:
        self.global_state = dict(tensors["global"])
        self.ranks = {c: int(r) for c, r in state["ranks"].items()}
        self.round = int(state["round"])
        self.download_bytes = int(state.get("download_bytes", 0))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if "merged" in tensors:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in tensors["merged"].items():
                    params[k].copy_(v)
            self.merged = dict(tensors["merged"])
