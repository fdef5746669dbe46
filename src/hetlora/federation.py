"""The server's round, shared by every engine: it orchestrates and never asks which client kind it runs.

A round is ``jobs`` (sample, then each client's payload from its kind: truncation,
docs/algorithm.md step 1) → clients train (in this process, or over Flower) →
``complete_round`` (validate once, drop bad updates, aggregate, let the kind update the
global state, update ranks). ``evaluate`` asks the kind to score the global model.
The loop over rounds is the engine's: ``runner.local_round`` in process,
``flower/server_app.py`` on Flower; both call the methods here.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import statistics
from typing import Any, Mapping, Sequence

import torch

from .clients import Job, get_kind
from .config import RunConfig
from .core.adapter import ClientUpdate
from .core.ranks import assign_ranks, ranks_from_budgets
from .core.rank_health import live_rank, rank_energy, trainable_rank
from .core.validation import InvalidUpdate, layer_shapes
from .evaluate import perplexity
from .host import ClientHost, auto_parallel_clients
from .methods import AggregationContext, aggregate_round, get_method
from .methods.dp import DPFedAvg
from .privacy import ServerPrivacy, check_sampling

log = logging.getLogger(__name__)


def sample_clients(client_ids: Sequence[str], k: int, seed: int, round_index: int, scheme: str = "uniform") -> list[str]:
    """The clients of round ``round_index``, a pure function of (seed, round).

    ``uniform``: K clients uniformly without replacement. ``cyclic``: a seeded permutation of
    all clients per "epoch" of ceil(N/K) rounds, cut into rounds of K, so every client is
    trained exactly once per epoch (the last round of an epoch may have fewer).
    """
    ids = sorted(client_ids)
    if scheme == "cyclic":
        per_epoch = -(-len(ids) // k)
        epoch, slot = divmod(round_index, per_epoch)
        order = random.Random(f"cycle:{seed}:{epoch}").sample(ids, len(ids))
        return sorted(order[slot * k : (slot + 1) * k])
    return sorted(random.Random(f"sample:{seed}:{round_index}").sample(ids, min(k, len(ids))))


def tier_ranks_for_eval(ranks: Mapping[str, int], r_min: int, r_max: int) -> list[int]:
    """The rank tiers to evaluate truncations at: the distinct ranks if few, else min/median/max."""
    distinct = sorted(set(ranks.values()))
    if len(distinct) <= 4:
        return distinct
    return sorted({r_min, int(statistics.median(distinct)), r_max})


def client_metrics(kept: Sequence[ClientUpdate]) -> dict[str, Any]:
    """What the round reports of its clients' own measurements (train loss, time, memory)."""
    losses = [u.metrics.get("train_loss") for u in kept]
    losses = [x for x in losses if isinstance(x, (int, float)) and math.isfinite(x)]
    return {
        "train_loss": sum(losses) / len(losses) if losses else None,
        "client_seconds": sum(float(u.metrics.get("seconds", 0.0)) for u in kept),
        "peak_rss_mb": max((float(u.metrics.get("peak_rss_mb", 0.0)) for u in kept), default=0.0),
    }


def non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor holding NaN or ±Inf, named (None if all are finite)."""
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return f"{key} holds NaN or Inf"
    return None


class Federation:
    def __init__(self, cfg: RunConfig, host: ClientHost | None = None, device_clients: bool = False):
        self.device_clients = device_clients  # clients are Flower ClientApps (their memory defaults differ)
        self.cfg = cfg.validate()
        self.host = host if host is not None else ClientHost(cfg)
        method = get_method(cfg.method)
        if cfg.dp_clip is not None:
            check_sampling(cfg.clients_per_round, len(self.host.client_ids))
            method = DPFedAvg(method, cfg.dp_clip, cfg.noise_multiplier, cfg.clients_per_round)
        self.method = method
        self.kind = get_kind(method.client_kind)
        self.client_ids = self.host.client_ids
        r = cfg.global_rank
        if method.uniform_rank:
            self.ranks = {c: r for c in self.client_ids}
        else:
            self.ranks = assign_ranks(self.client_ids, cfg.rank_dist, cfg.r_min, r, cfg.seed, cfg.ranks)
        self.left_out: dict[str, str] = {}  # client -> why it takes no part (its memory fits no rank)
        self.refused_claims: list[dict[str, Any]] = []  # Flower: nodes whose claim to a client was refused (node, client, reason)
        if cfg.memory_budget_mb is not None or cfg.memory_budgets:
            self.fit_ranks_to_memory()
        self.assigned = dict(self.ranks)
        tiers = sorted(set(cfg.tiers)) or tier_ranks_for_eval(self.ranks, cfg.r_min, r)
        self.tiers = [t for t in tiers if t <= r] if self.kind.rank_tiers and not method.uniform_rank else []
        self.state = self.kind.initial_state(self.host, r, cfg.seed)
        self.shapes = layer_shapes(self.state["global"])
        self.round = 0  # rounds completed
        self.base_version = 0  # the round that last changed the base delta
        self._before: tuple | None = None  # the state before the last applied aggregate (for roll_back)
        self.privacy = ServerPrivacy.fresh() if cfg.dp_clip is not None else None

    def fit_ranks_to_memory(self, budgets: Mapping[str, float] | None = None) -> None:
        """Ranks from memory budgets (docs/algorithm.md §7): each client gets the largest rank its budget is
        predicted to fit (uniform-rank methods: the one rank, if it fits); one that fits none is left out.
        Clients ``budgets`` does not name keep their ranks (Flower nodes that state no budget)."""
        from .footprint import footprint_model, read_budgets, setting_key

        cfg = self.cfg
        if budgets is None:
            given = read_budgets(cfg.memory_budgets) if cfg.memory_budgets else {}
            budgets = {c: given.get(c, cfg.memory_budget_mb) for c in self.client_ids}
            missing = [c for c, b in budgets.items() if b is None]
            if missing:
                raise ValueError(f"memory budgets {cfg.memory_budgets} name no budget for {len(missing)} client(s) "
                                 f"(e.g. {missing[0]}) and no --memory-budget is given for the rest")
        model = footprint_model(setting_key(cfg.model, self.host.precision, cfg.checkpointing(self.device_clients), cfg.batch_size, cfg.max_length))
        low = cfg.global_rank if self.method.uniform_rank else cfg.r_min
        fitted, left_out = ranks_from_budgets(budgets, model.largest_rank, low, cfg.global_rank)
        self.ranks = {c: fitted.get(c, r) for c, r in self.ranks.items() if c not in left_out}  # clients without a budget keep theirs
        self.left_out = left_out
        self.client_ids = [c for c in self.client_ids if c not in left_out]
        self.assigned = dict(self.ranks)
        if not self.client_ids:
            raise ValueError(f"no client's memory budget fits a rank ≥ {low} (predicted {model.predict(low):.0f} MB at rank {low})")
        if cfg.clients_per_round > len(self.client_ids):
            raise ValueError(f"{len(left_out)} client(s) left out for memory; {len(self.client_ids)} remain, "
                             f"fewer than --clients-per-round {cfg.clients_per_round}")

    @property
    def data(self):
        return self.host.data

    def trainable_params(self) -> int:
        return self.kind.trainable_params(self.shapes, self.cfg.global_rank, self.state)

    @functools.cached_property
    def parallel_clients(self) -> int:
        """How many clients train together here: the config's, else as many as memory allows
        (decided once per run, so the number printed, used every round and recorded agree)."""
        if not self.kind.parallel:
            return 1
        k = self.cfg.parallel_clients or auto_parallel_clients(self.host)
        return max(1, min(k, self.cfg.clients_per_round))

    def sample(self, round_index: int) -> list[str]:
        """The round's clients: from the seed, or under DP from the server's private entropy (a secret sample)."""
        seed = self.privacy.sampling_seed if self.privacy else self.cfg.seed
        return sample_clients(self.client_ids, self.cfg.clients_per_round, seed, round_index, self.cfg.sampling)

    # ------------------------------------------------------------------ server -> client
    def job(self, client_id: str, round_index: int) -> Job:
        """What the server sends client ``client_id`` this round (its kind's payload, its rank)."""
        rank = self.ranks[client_id]
        payload = self.kind.payload(self.state, client_id, rank, round_index, self.cfg.seed)
        return Job(client_id, rank, round_index, payload, self.state.get("base_delta", {}), self.base_version)

    def download_bytes(self, job: Job) -> int:
        return self.kind.download_bytes(job)

    def train(self, jobs: Sequence[Job]) -> list[ClientUpdate]:
        """Train clients in this process, together (the in-process engine's client side)."""
        return self.kind.train(self.host, jobs, prune=self.cfg.prunes)

    # ------------------------------------------------------------------ aggregation
    def context(self, round_index: int) -> AggregationContext:
        cfg = self.cfg
        options = {"per_layer": True} if cfg.per_layer and "per_layer" in self.method.options else {}
        return AggregationContext(
            r_max=cfg.global_rank, previous=self.state["global"], norm_bound=cfg.norm_bound, shapes=self.shapes,
            options=options, generator=self.privacy.noise_generator(round_index) if self.privacy else None,
            seed=cfg.seed, round_index=round_index, ranks=dict(self.ranks),
        )

    def complete_round(self, round_index: int, updates: Sequence[ClientUpdate], failed: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Validate, aggregate, update ranks; returns the round's metrics (without eval)."""
        ctx = self.context(round_index)
        self._before = None  # only this round's aggregate can be rolled back
        sent = dict(self.ranks)  # what the server sent this round: the ranks it reports, never a client's own claim
        kept, dropped_updates = self.method.split_valid(updates, ctx, assigned_ranks=self.ranks, round_index=round_index,
                                                         exact_rank=not self.cfg.prunes)
        dropped = [{"client": c, "reason": r} for c, r in list(failed) + dropped_updates]
        new, base_update, kept = self._aggregate(kept, ctx, dropped)
        return self._close_round(round_index, new, base_update, kept, updates, dropped, sent,
                                 sum(self.kind.upload_bytes(u) for u in kept))

    def complete_secure_round(self, round_index: int, aggregate: Mapping[str, torch.Tensor] | None, reports: Sequence[ClientUpdate],
                              failed: Sequence[tuple[str, str]], bytes_up: int) -> dict[str, Any]:
        """Close a round whose aggregate is a secure sum (docs/algorithm.md §6.1): no individual update exists
        here to validate or bound, so the sum itself is checked (finite; shapes by the caller); ``reports``
        carry each client's rank and metrics, ``aggregate`` is None when the round produced no sum."""
        self._before = None
        sent = dict(self.ranks)
        dropped = [{"client": c, "reason": r} for c, r in failed]
        if aggregate is not None and len(reports) < self.cfg.min_clients:
            aggregate = None
        return self._close_round(round_index, dict(aggregate) if aggregate is not None else None, None, list(reports),
                                 reports, dropped, sent, bytes_up)

    def _close_round(self, round_index: int, new, base_update, kept: list[ClientUpdate], updates: Sequence[ClientUpdate],
                     dropped: list[dict[str, Any]], sent: Mapping[str, int], bytes_up: int) -> dict[str, Any]:
        """Apply a finite aggregate (a non-finite one keeps the previous global model) and write the round's row."""
        for d in dropped:
            log.warning("round %d: dropped client %s: %s", round_index + 1, d["client"], d["reason"])
        rejected = None
        if new is not None:
            rejected = non_finite(new) or non_finite(base_update or {})
            if rejected:
                log.error("round %d: the aggregate is not finite (%s); keeping the previous global model", round_index + 1, rejected)
            else:
                self._apply(round_index, new, base_update, kept)
        self.round = round_index + 1
        row = self.rank_metrics() | {
            "rejected": rejected,
            "round": round_index + 1,
            "method": self.cfg.method,
            "clients": [u.client_id for u in kept],
            "aggregated": new is not None and not rejected,
            "dropped": dropped,
            "ranks": self.sampled_ranks(updates),
            "client_ranks_in": {u.client_id: sent.get(u.client_id) for u in kept},
            "bytes_up": bytes_up,
        } | client_metrics(kept)
        return self.privacy.released(row) if self.privacy else row

    def _aggregate(self, kept: list[ClientUpdate], ctx: AggregationContext, dropped: list[dict[str, Any]]):
        """(aggregate, base update, the updates it came from); a client whose norm is not finite is dropped and the rest retried."""
        while len(kept) >= self.cfg.min_clients:
            try:
                new, base_update = aggregate_round(self.method, kept, ctx)
                return new, base_update, kept
            except InvalidUpdate as err:  # found while aggregating (a norm that is not finite): drop, retry
                kept = [u for u in kept if u.client_id != err.client]
                dropped.append({"client": err.client, "reason": err.problem})
        return None, None, kept

    def _apply(self, round_index: int, new, base_update, kept: Sequence[ClientUpdate]) -> None:
        """Make the aggregate the global state; the state before it is kept until :meth:`roll_back` or the next round."""
        self._before = (self.state, dict(self.ranks), self.base_version)
        state = self.kind.after_aggregate(self.state, new, base_update)
        if state.get("base_delta") is not self.state.get("base_delta"):
            self.base_version = round_index + 1
        self.state = state
        for u in kept:
            if u.client_id in self.ranks:
                self.ranks[u.client_id] = int(u.rank if u.rank is not None else self.ranks[u.client_id])

    def roll_back(self) -> bool:
        """Undo the last applied aggregate (its held-out loss was not finite); False if there is none to undo."""
        if self._before is None:
            return False
        self.state, self.ranks, self.base_version = self._before
        self._before = None
        return True

    def sampled_ranks(self, updates: Sequence[ClientUpdate]) -> dict[str, int]:
        """client -> its rank after the round, for the clients that sent an update."""
        return {c: self.ranks[c] for c in sorted({u.client_id for u in updates if u.client_id in self.ranks})}

    def rank_metrics(self) -> dict[str, Any]:
        """Live rank, trainable rank and rank energy of the global adapter (kinds with rank tiers only)."""
        if not self.kind.rank_tiers:
            return {}
        global_adapter = self.state["global"]
        r = self.cfg.global_rank
        mid = max(self.cfg.r_min, min(r, int(statistics.median(self.assigned.values())) if self.assigned else r))
        return {"live_rank": live_rank(global_adapter), "trainable_rank": trainable_rank(global_adapter),
                "rank_energy": rank_energy(global_adapter, min(self.cfg.r_min, r), mid, r)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, ranks: Sequence[int] | None = None, examples=None) -> dict[int, float]:
        """Held-out target-token loss of the global model at each rank (global rank if None)."""
        return self.kind.evaluate(self.state, self.host, list(ranks or [self.cfg.global_rank]), self.base_version, examples)

    def eval_metrics(self, with_tiers: bool, final: bool = False) -> dict[str, Any]:
        """The round's evaluation; after the last round also the final set (``final_eval_size``), tiers on it."""
        import time

        t0 = time.perf_counter()
        loss = next(iter(self.evaluate().values()))
        row: dict[str, Any] = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
        examples = None
        if final and self.cfg.final_eval_size:
            examples = self.data.eval_examples(self.cfg.eval_split, self.cfg.final_eval_size)
            final_loss = next(iter(self.evaluate(examples=examples).values()))
            row.update({"full_eval_loss": final_loss, "full_eval_ppl": perplexity(final_loss), "full_eval_size": len(examples)})
        if with_tiers and self.tiers:
            top = self.cfg.global_rank  # the global model itself: reuse its loss on the same examples
            tiers = self.evaluate([r for r in self.tiers if r != top], examples) if any(r != top for r in self.tiers) else {}
            if top in self.tiers:
                tiers[top] = final_loss if examples is not None else loss
            row["tier_eval_ppl"] = {str(r): perplexity(tiers[r]) for r in sorted(tiers)}
        row["eval_seconds"] = time.perf_counter() - t0
        return row

    # ------------------------------------------------------------------ checkpoint state
    CHECKPOINT_GROUPS = ("global", "base_delta")

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: group for name, group in self.state.items() if group}

    def state_json(self) -> dict[str, Any]:
        """The checkpoint's JSON state (under DP it holds the server-private secret: checkpoints are server-private)."""
        return {"round": self.round, "ranks": self.ranks, "base_version": self.base_version,
                "torch_rng": torch.get_rng_state().tolist()} | (self.privacy.state() if self.privacy else {})

    def restore(self, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]) -> None:
        self.state = {name: dict(group) for name, group in tensors.items()}
        self.ranks = {c: int(r) for c, r in state["ranks"].items()}
        self.round = int(state["round"])
        self.base_version = int(state.get("base_version", 0))
        self._before = None
        if self.privacy is not None:
            self.privacy = ServerPrivacy.from_state(state)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
