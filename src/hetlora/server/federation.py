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
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Sequence

import torch

from ..clients import Job, get_kind
from ..config import RunConfig
from ..core.adapter import ClientUpdate
from ..core.arrival import arrival_order, asked_count
from ..core.ranks import assign_ranks, tier_ranks_for_eval
from ..core.sampling import sample_clients
from ..core.validation import layer_shapes, non_finite
from . import round_report
from ..device.footprint import fit_ranks
from ..device.host import ClientHost, auto_parallel_clients
from ..methods import AggregationContext, get_method
from ..methods.dp import DPFedAvg
from .privacy import ServerPrivacy, check_sampling
from .aggregation import RoundClose, aggregate_replies

log = logging.getLogger(__name__)


@dataclass
class RoundOpening:
    """Who a round asks and how it closes (docs/algorithm.md §7.3): ``order``, the clients asked, earliest
    (simulated) reply first; ``late``, ``(client, delay)`` of those whose simulated reply comes after the deadline
    (never waited for, never trained); ``close``, how many valid replies the round takes."""

    round_index: int
    order: list[str]
    late: list[tuple[str, float]]
    close: RoundClose
    deadline: float | None

    @property
    def asked(self) -> list[str]:
        return sorted(self.order + [c for c, _ in self.late])

    def late_failures(self) -> list[tuple[str, str]]:
        """A simulated late or silent client, named with its delay."""
        return [(c, "never replied (a silent client in the simulated delay model)" if math.isinf(d) else
                 f"no reply by the round deadline (simulated delay {d:.2f} s > {self.deadline:g} s)") for c, d in self.late]

    def unheard(self, replied: Collection[str | None], failed: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        """The asked clients the round closed without: over-selected ones it no longer needed, or those that missed
        the deadline."""
        known = set(replied) | {c for c, _ in failed}
        reason = (f"over-selected: the round closed with its {self.close.wanted} valid replies before this one was taken"
                  if self.close.full else f"no reply by the round deadline ({self.deadline or 0:g} s)")
        return [{"client": c, "reason": reason} for c in self.order if c not in known]


def require_server_packages(cfg: RunConfig) -> None:
    """The server extra's packages a run's settings need, checked where the server starts (a device's config check
    cannot: a device install lacks them by design)."""
    import importlib.util

    needed = {"rouge_size": ("rouge_score", "rouge-score") if cfg.rouge_size else None,
              "dp_clip": ("dp_accounting", "dp-accounting") if cfg.dp_clip is not None else None}
    for setting, (module, package) in ((s, n) for s, n in needed.items() if n):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{setting} needs the {package} package of the server extra: pip install 'hetlora[server]'")


class Federation:
    def __init__(self, cfg: RunConfig, host: ClientHost | None = None, device_clients: bool = False):
        self.device_clients = device_clients  # clients are Flower ClientApps (their memory defaults differ)
        self.cfg = cfg.validate()
        require_server_packages(self.cfg)  # before the model loads: a run must not fail after its last round
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

    def fit_ranks_to_memory(self, budgets: Mapping[str, float] | None = None, settings: Mapping[str, str] | None = None) -> None:
        """Ranks from memory budgets (docs/algorithm.md §7; hetlora.device.footprint.fit_ranks): a client that fits
        no rank ≥ r_min is left out. Clients ``budgets`` does not name keep their ranks; ``settings``: the footprint
        setting a client's device stated (its own base weights and precision)."""
        low = self.cfg.global_rank if self.method.uniform_rank else self.cfg.r_min
        self.ranks, self.left_out = fit_ranks(self.cfg, self.ranks, self.host.precision, self.device_clients, low, budgets, settings)
        self.client_ids = [c for c in self.client_ids if c not in self.left_out]
        self.assigned = dict(self.ranks)
        if self.cfg.clients_per_round > len(self.client_ids):
            raise ValueError(f"{len(self.left_out)} client(s) left out for memory; {len(self.client_ids)} remain, "
                             f"fewer than --clients-per-round {self.cfg.clients_per_round}")

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
        """The round's clients: from the seed, or under DP from the server's private entropy (a secret sample);
        ⌈K(1+F)⌉ of them under over-selection (docs/algorithm.md §7.3)."""
        seed = self.privacy.sampling_seed if self.privacy else self.cfg.seed
        k = asked_count(self.cfg.clients_per_round, self.cfg.over_select, len(self.client_ids))
        return sample_clients(self.client_ids, k, seed, round_index, self.cfg.sampling)

    @functools.cached_property
    def delays(self):
        """The simulated delay model (None: replies come when they come)."""
        return self.cfg.delay_model()

    def open_round(self, round_index: int, reachable: Collection[str] | None = None) -> RoundOpening:
        """The round's sample in the order its replies will come (simulated delays; else the sample's order) and
        how it closes; ``reachable``: the clients an engine can send to (Flower: those with a node)."""
        sampled = [c for c in self.sample(round_index) if reachable is None or c in reachable]
        if self.delays is None and not self.cfg.over_select:
            order, late = sampled, []  # every reply is taken: the order does not matter
        else:  # simulated reply times, or all at once (0 s) in a seeded order: which K come first must not be the lowest ids
            model = self.delays
            delays = {c: model.delay(self.cfg.seed, round_index, c) if model else 0.0 for c in sampled}
            order, late = arrival_order(sampled, delays, self.cfg.round_timeout, self.cfg.seed, round_index)
        close = RoundClose(self.cfg.clients_per_round if self.cfg.over_select else None)
        return RoundOpening(round_index, order, late, close, self.cfg.round_timeout)

    # ------------------------------------------------------------------ server -> client
    def job(self, client_id: str, round_index: int) -> Job:
        """What the server sends client ``client_id`` this round (its kind's payload, its rank)."""
        rank = self.ranks[client_id]
        payload = self.kind.payload(self.state, client_id, rank, round_index, self.cfg.seed)
        return Job(client_id, rank, round_index, payload, self.state.get("base_delta", {}), self.base_version)

    def download_bytes(self, job: Job) -> int:
        return self.kind.download_bytes(job)

    def round_jobs(self, opening: RoundOpening) -> tuple[dict[str, Job], int]:
        """The jobs of the clients a round will ask, in reply order, each payload made once, and the round's download:
        every asked client downloads, a late one too (docs/algorithm.md §7.3)."""
        t = opening.round_index
        jobs = {cid: self.job(cid, t) for cid in opening.order}
        late = sum(self.download_bytes(self.job(c, t)) for c, _ in opening.late)
        return jobs, sum(map(self.download_bytes, jobs.values())) + late

    def round_download(self, opening: RoundOpening) -> int:
        """The round's download (:meth:`round_jobs`'s count) without holding its jobs: each asked client's job is made,
        counted and let go; a server that sends them one at a time makes each again when it sends it."""
        t = opening.round_index
        return sum(self.download_bytes(self.job(c, t)) for c in [*opening.order, *(c for c, _ in opening.late)])

    def train(self, jobs: Sequence[Job]) -> list[ClientUpdate]:
        """Train clients in this process, together (the in-process engine's client side)."""
        return self.kind.train(self.host, jobs, prune=self.cfg.prunes)

    # ------------------------------------------------------------------ aggregation
    def context(self, round_index: int) -> AggregationContext:
        cfg = self.cfg
        return AggregationContext(
            r_max=cfg.global_rank, previous=self.state["global"], norm_bound=cfg.norm_bound, shapes=self.shapes,
            options=self._options(), generator=self.privacy.noise_generator(round_index) if self.privacy else None,
            seed=cfg.seed, round_index=round_index, ranks=dict(self.ranks),
        )

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"per_layer": True} if self.cfg.per_layer and "per_layer" in self.method.options else {}
        if "energy" in self.method.options:
            options["energy"] = self.cfg.florist_energy
        return options

    def complete_round(self, round_index: int, updates: Iterable[ClientUpdate], failed: Sequence[tuple[str, str]] = (),
                       opening: RoundOpening | None = None) -> dict[str, Any]:
        """Validate, aggregate, update ranks; returns the round's metrics (without eval).

        ``updates`` may be a stream (replies as they arrive): a method that can folds each in and lets it go, or
        spills it for a module-wise rule (hetlora.server.aggregation, docs/algorithm.md §7.2); fft aggregates the list. With ``opening`` the round takes replies
        until it has the K it wants and names every asked client it closed without (§7.3)."""
        ctx = self.context(round_index)
        done = aggregate_replies(self.method, ctx, updates, assigned_ranks=self.ranks, exact_rank=not self.cfg.prunes,
                                 min_clients=self.cfg.min_clients, upload_bytes=self.kind.upload_bytes,
                                 close=opening.close if opening else None)
        failed = list(failed)  # read after the replies were taken: an engine adds the clients that failed meanwhile
        dropped = [{"client": c, "reason": r} for c, r in failed] + done.dropped
        if opening is not None:
            dropped += opening.unheard(done.replied, failed)
        row = self._close_round(round_index, done.new, done.base_update, done.kept, done.replied, dropped, done.bytes_up)
        if opening is not None:
            row |= {"asked": len(opening.asked), "closed_by": _closed_by(opening, dropped)}
        return row

    def complete_secure_round(self, round_index: int, aggregate: Mapping[str, torch.Tensor] | None, reports: Sequence[ClientUpdate],
                              failed: Sequence[tuple[str, str]], bytes_up: int) -> dict[str, Any]:
        """Close a round whose aggregate is a secure sum (docs/algorithm.md §6.1): no individual update exists
        here to validate or bound, so the sum itself is checked (finite here; shapes and the clip's bound by
        the caller), then the method finishes it as it would a plain aggregate (hetlora-svd's re-factoring);
        ``reports`` carry each client's rank and metrics, ``aggregate`` is None when the round produced no sum."""
        new = None
        if aggregate is not None and len(reports) >= self.cfg.min_clients:  # one not finite is refused in _close_round
            new = dict(aggregate) if non_finite(aggregate) else self.method.finish(dict(aggregate), self.context(round_index))
        return self._close_round(round_index, new, None, list(reports), [u.client_id for u in reports],
                                 [{"client": c, "reason": r} for c, r in failed], bytes_up)

    def _close_round(self, round_index: int, new, base_update, kept: list[ClientUpdate], replied: Sequence[str | None],
                     dropped: list[dict[str, Any]], bytes_up: int) -> dict[str, Any]:
        """Apply a finite aggregate (a non-finite one keeps the previous global model) and write the round's row."""
        self._before = None  # only this round's aggregate can be rolled back
        sent = dict(self.ranks)  # what the server sent this round: the ranks it reports, never a client's own claim
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
        return round_report.round_row(self, round_index, new is not None and not rejected, rejected, kept, replied, dropped, sent, bytes_up)

    def released(self, row: dict[str, Any]) -> dict[str, Any]:
        """The round's row as it is published: under DP nothing per client and nothing that depends on the
        secret sample (hetlora.server.privacy); otherwise the row itself."""
        return self.privacy.released(row, self.expected_bytes) if self.privacy else row

    @functools.cached_property
    def expected_bytes(self) -> tuple[float, float]:
        """(up, down) bytes of a round averaged over every sample of K clients: K/N · Σ_i bytes(rank_i), a
        function of the public ranks only. Made once: under DP nothing prunes and no budget refits a rank,
        so ranks and shapes are the run's (a client uploads the rank it was sent)."""
        per_client = [self.kind.download_bytes(self.job(c, 0)) for c in self.client_ids]
        mean = self.cfg.clients_per_round * sum(per_client) / len(per_client)
        return mean, mean

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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, ranks: Sequence[int] | None = None, examples=None, measure=None) -> dict[int, Any]:
        """Held-out target-token loss (or ``measure(host, examples)``) of the global model at each rank (global rank if None)."""
        return self.kind.evaluate(self.state, self.host, list(ranks or [self.cfg.global_rank]), self.base_version, examples, measure)

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


def _closed_by(opening: RoundOpening, dropped: Sequence[Mapping[str, Any]]) -> str:
    """Why the round closed: it had the K valid replies it wanted, its deadline passed with replies missing, or
    every reply that was coming was in (a silent client sends none)."""
    if opening.close.full:
        return "enough valid replies"
    missed = any(str(d["reason"]).startswith("no reply by the round deadline") for d in dropped)
    return "deadline" if missed else "all replies"
