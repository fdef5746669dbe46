"""Run configuration: one dataclass, the one place every default lives.

Loadable from TOML (``key = value`` or ``key-name = value``, optionally under
``[hetlora]``), from Flower's run config and from CLI flags; every value is type-checked
when it is read and range-checked (finite numbers) by :meth:`RunConfig.validate`,
before any model or data loads. Each problem is one line naming the key, the value and
what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .core.ranks import budget_problem
from .methods import METHODS
from .methods.florist import DEFAULT_ENERGY as FLORIST_ENERGY

# LoRA defaults (docs/algorithm.md, "Scaling"): lora_alpha = DEFAULT_SCALE · r, on all 7 linear layers
# of a Llama-style block. Here rather than in lora.py so that a config is checked without importing peft.
DEFAULT_SCALE = 2.0
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DP_NOISE_DEFAULT = 1.0


# Settings that change a client's memory and speed but not what it computes (bit-identical; tests/test_memory.py).
NUMBER_NEUTRAL = ("grad_checkpointing", "release_memory")


@dataclass
class RunConfig:
    method: str = "hetlora"
    model: str = "smollm2"
    data: str = "chitchat"
    rounds: int = 5
    clients_per_round: int = 4
    local_steps: int = 4
    batch_size: int = 8
    max_length: int = 128
    lr: float = 1e-3
    r_min: int = 5
    r_max: int = 50
    rank: int | None = None  # fedavg: the one rank for all (default r_max)
    gamma: float = 0.99
    lam: float = 0.01
    rank_dist: str = "uniform"
    ranks: list[int] = field(default_factory=list)  # for rank_dist = "list"
    norm_bound: float | None = 1.5
    per_layer: bool = False
    florist_energy: float = FLORIST_ENERGY  # florist: each module keeps the fewest singular components holding this share of the energy (τ)
    prune: bool | None = None  # None: as the method says (hetlora prunes)
    seed: int = 0
    split_seed: int | None = None  # the data's train/validation/test split and held-out draw (None: the run's seed; a study fixes one for all seeds)
    out: str = "runs/hetlora"
    eval_size: int = 64  # held-out examples scored after every round
    eval_split: str = "test"  # test | validation (half of the held-out pool each; tune on validation)
    final_eval_size: int | None = None  # also score this many examples of eval_split after the last round
    rouge_size: int | None = None  # after the last round, ROUGE-L of greedy responses to this many held-out prompts of eval_split
    rouge_max_tokens: int = 48  # the longest greedy response (tokens) ROUGE-L scores
    eval_batch_size: int = 16
    tier_eval: str = "final"  # final | every | off
    tiers: list[int] = field(default_factory=list)  # rank tiers to evaluate truncations at (empty: chosen from the ranks)
    min_examples: int = 20
    max_clients: int | None = None  # register only the first N clients (sorted ids)
    client_pool: int | None = None  # register N clients drawn by the seed: a fixed pool that keeps coming back
    sampling: str = "uniform"  # uniform: K of the clients each round | cyclic: every client once per ceil(N/K) rounds
    min_clients: int = 1  # fewer valid updates than this: keep the previous global adapter
    round_timeout: float | None = None  # a round closes this many seconds after it opens (None: Flower waits 3600 s; in process, no deadline)
    over_select: float = 0.0  # ask ⌈K(1+F)⌉ clients, aggregate the first K valid replies, drop and name the rest
    client_delay: str | None = None  # simulation: each client's seeded reply time (hetlora.core.arrival.SPEC_HELP)
    precision: str = "auto"  # auto (bf16 where the hardware has it natively) | fp32 | bf16
    base_weights: str = "auto"  # dense | gguf (frozen weights in the GGUF's blocks) | auto: gguf for a device client of a GGUF model
    parallel_clients: int | None = None  # clients trained together in one process (None: chosen from memory)
    grad_checkpointing: bool | None = None  # recompute activations in backward (less memory, slower); None: on for device clients (a ClientApp), off in-process
    release_memory: bool = False  # clients' freed tensors go back to the OS at once (fixed mmap threshold): less RSS, slower
    memory_budget_mb: float | None = None  # every client's memory budget: its rank = the largest predicted to fit
    memory_budgets: str | None = None  # JSON file {client id: MB}: per-client budgets (overrides memory_budget_mb)
    ordered_dropout: bool = False  # LoRA clients train a random prefix r' ∈ [r_min, r_k] of their components each step
    lora_scale: float = DEFAULT_SCALE
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module names LoRA wraps
    dp_clip: float | None = None  # user-level DP on: clip norm C
    dp_noise: float | None = None  # noise multiplier σ (DP_NOISE_DEFAULT when dp_clip is set)
    dp_delta: float = 1e-5
    engine: str = "local"
    secure_aggregation: bool = False  # Flower: SecAgg+ — the server sees only the sum of the clients' padded, weighted factors
    secure_clip: float | None = None  # under secure aggregation: each client's fixed bound on ‖B‖/√r and ‖A‖/√r (None: auto, 2‖A₀‖/√r)
    secure_min_clients: int | None = None  # under secure aggregation: every summed component held by ≥ m clients (None: SecAgg+'s threshold)
    node_clients: str | None = None  # Flower: the operator's binding of node ids to partition ids ("ID=PID,…" or a JSON file)
    partition: str | None = None  # user data without client_id: "iid:N" or "dirichlet:N"
    partition_by: str = "label"
    dirichlet_alpha: float = 0.5
    device: str = "auto"  # auto (cuda when present) | cpu | cuda

    @property
    def global_rank(self) -> int:
        """Rank of the global adapter: the one rank for a uniform-rank method (fedavg), else r_max."""
        method = METHODS.get(self.method)
        return (self.rank or self.r_max) if method is not None and method.uniform_rank else self.r_max

    @property
    def client_kind(self) -> str:
        """The client kind the method trains with (hetlora.clients): what a device needs to know of the method."""
        return METHODS[self.method].client_kind

    @property
    def secure_weight(self) -> str | None:
        """The weight rule a client computes for itself under secure aggregation (hetlora.core.secure_sum)."""
        return METHODS[self.method].secure_weight

    @property
    def folds_into_base(self) -> bool:
        """Whether updates are folded into the frozen weights, by the method or by its clients (clients then keep
        fp32 originals to fold into)."""
        method = METHODS[self.method]
        return method.folds_into_base or method.client_folds

    @property
    def prunes(self) -> bool:
        """Whether clients self-prune: as the method says unless set; never under DP (the pruned rank
        is a data-dependent release the accountant does not cover)."""
        if self.dp_clip is not None:
            return False
        return METHODS[self.method].prunes if self.prune is None else self.prune

    @property
    def data_seed(self) -> int:
        """The seed of the data's split (train / validation / test, the held-out draw, a file's partition): the
        run's own seed unless ``split_seed`` fixes one split for runs of many seeds (study v4, issue #44)."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def noise_multiplier(self) -> float:
        return DP_NOISE_DEFAULT if self.dp_noise is None else self.dp_noise

    def validate(self) -> "RunConfig":
        """Raise ValueError naming every problem; runs before any model or data is loaded."""
        problems = [p for p in (_type_problem(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)) if p]
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        problems += self._range_problems()
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def _range_problems(self) -> list[str]:
        """Every value in its range, group by group (the order of the message follows the groups)."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
        problems += self._rank_problems() + self._size_problems() + self._training_problems() + self._run_problems()
        problems += self._method_option_problems() + self._dp_problems() + self._secure_problems() + self._data_problems()
        return problems + self._closing_problems()

    def unhonoured_options(self) -> dict[str, str]:
        """Each option set here that the method would not honour (field name → why). A lone run refuses them
        (:meth:`_method_option_problems`); ``hetlora compare`` resets them to their defaults per method."""
        method = METHODS.get(self.method)
        if method is None:
            return {}
        out: dict[str, str] = {}
        if self.prune and not method.can_prune:
            out["prune"] = (f"prune = true: {self.method}'s clients do not self-prune "
                            + ("(every client trains one rank and must return it)" if method.uniform_rank else
                               f"({method.client_kind} clients never prune)"))
        if self.per_layer and "per_layer" not in method.options:
            out["per_layer"] = f"per_layer weights are hetlora's (one weight per client and module); {self.method} has none"
        if self.florist_energy != FLORIST_ENERGY and "energy" not in method.options:
            out["florist_energy"] = f"florist_energy is florist's energy threshold; {self.method} has none"
        if self.rank is not None and not method.uniform_rank:
            out["rank"] = (f"rank sets the one rank of a uniform-rank method (fedavg); {self.method} gives each client "
                           "its own in [r_min, r_max]")
        if (self.memory_budget_mb is not None or self.memory_budgets) and not method.footprint_calibrated:
            why = (f"memory budgets turn into ranks by a footprint calibrated on LoRA clients; {self.method}'s clients "
                   f"({method.client_kind}) were not calibrated: they train every weight, so no rank sets their memory")
            out |= {"memory_budget_mb": why, "memory_budgets": why}
        return out

    def _method_option_problems(self) -> list[str]:
        """Options the method would not honour: refused, never accepted and silently ignored (a run's outputs would
        name an option it did not run with)."""
        return list(dict.fromkeys(self.unhonoured_options().values()))

    def _closing_problems(self) -> list[str]:
        """Rounds that close (docs/algorithm.md §7.3): a deadline, over-selection, a simulated delay model."""
        problems = []
        if self.round_timeout is not None and not self.round_timeout > 0:
            problems.append(f"round_timeout must be a positive number of seconds (or unset), got {self.round_timeout}")
        if not 0.0 <= self.over_select <= 10.0:
            problems.append(f"over_select must lie in [0, 10] (ask K·(1+F) clients), got {self.over_select}")
        if self.client_delay is not None:
            try:
                self.delay_model()
            except ValueError as err:
                problems.append(str(err))
        reshaped = [name for name in ("over_select", "client_delay") if getattr(self, name)]
        if reshaped and self.dp_clip is not None:
            problems.append(f"{' and '.join(reshaped)} with DP is refused: the accountant assumes the round aggregates the "
                            "K clients it sampled, not the first of more")
        if reshaped and self.secure_aggregation:
            problems.append(f"{' and '.join(reshaped)} with secure aggregation is refused: SecAgg+ fixes a round's clients "
                            "when it opens and closes its stages on its own timeout (round_timeout)")
        if self.over_select and self.sampling != "uniform":
            problems.append("over_select draws K·(1+F) clients uniformly; it is refused with sampling = cyclic")
        return problems

    def delay_model(self):
        """The simulated delay model (hetlora.core.arrival), None without one; a JSON file is read and checked here."""
        from .core.arrival import delay_table, parse_delay

        if self.client_delay is None:
            return None
        path = Path(self.client_delay)
        if path.suffix == ".json" or path.is_file():
            try:
                values = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"client_delay {path}: {err}") from None
            if not isinstance(values, dict):
                raise ValueError(f"client_delay {path}: expected a JSON object {{client id: seconds or null}}")
            return delay_table(values, str(path))
        return parse_delay(self.client_delay)

    def _data_problems(self) -> list[str]:
        """The data file and how a file without client ids is partitioned."""
        problems = []
        if self.data != "chitchat" and not Path(self.data).is_file():
            problems.append(f"data {self.data!r} is neither 'chitchat' nor an existing .jsonl/.csv file")
        if self.partition is not None:
            scheme, _, n = self.partition.partition(":")
            if scheme not in ("iid", "dirichlet") or not n.isdigit() or int(n) < 1:
                problems.append(f"partition must be iid:N or dirichlet:N, got {self.partition!r}")
        if not self.dirichlet_alpha > 0:
            problems.append(f"dirichlet_alpha must be positive, got {self.dirichlet_alpha}")
        return problems

    def _rank_problems(self) -> list[str]:
        """Ranks, tiers, budgets and the operator's node binding."""
        problems = []
        if not 1 <= self.r_min <= self.r_max:
            problems.append(f"need 1 ≤ r_min ≤ r_max, got r_min={self.r_min}, r_max={self.r_max}")
        if self.rank is not None and not 1 <= self.rank <= self.r_max:
            problems.append(f"rank {self.rank} must lie in [1, r_max={self.r_max}]")
        if self.node_clients:
            try:
                node_partitions(self.node_clients)
            except ValueError as e:
                problems.append(str(e))
        if self.memory_budget_mb is not None and (p := budget_problem(self.memory_budget_mb)):
            problems.append(f"memory_budget_mb: {p}")
        if self.memory_budgets:
            try:  # the file's own problems before any model or data loads
                read_budgets(Path(self.memory_budgets))
            except ValueError as e:
                problems.append(str(e))
        if (self.memory_budget_mb is not None or self.memory_budgets) and self.dp_clip is not None:
            problems.append("memory budgets and DP together are not supported (under DP the sampled ranks are seed-assigned)")
        if self.ordered_dropout and self.method in METHODS and not METHODS[self.method].trains_rank_components:
            problems.append(f"ordered_dropout trains a prefix of LoRA rank components; {self.method}'s clients train none")
        if self.rank_dist not in ("uniform", "tiers", "list", "fixed"):
            problems.append(f"rank_dist must be uniform, tiers, list or fixed, got {self.rank_dist!r}")
        if self.rank_dist == "list" and not self.ranks:
            problems.append("rank_dist 'list' needs ranks = [..]")
        if any(not 1 <= r <= self.r_max for r in self.tiers):
            problems.append(f"tiers {self.tiers} must lie in [1, r_max]")
        if any(not self.r_min <= r <= self.r_max for r in self.ranks):
            problems.append(f"ranks {self.ranks} must lie in [r_min, r_max]")
        return problems

    def _size_problems(self) -> list[str]:
        """Counts, pools and sizes."""
        problems = []
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size", "max_length", "eval_size",
                     "eval_batch_size", "min_clients", "min_examples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_clients", "client_pool", "parallel_clients"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1 (or unset for all), got {getattr(self, name)}")
        if self.max_clients is not None and self.client_pool is not None:
            problems.append("max_clients and client_pool both choose the registered clients: set one")
        if self.batch_size > 4096:
            problems.append(f"batch_size {self.batch_size} is larger than any device batch here (≤ 4096)")
        if self.max_length > 8192:
            problems.append(f"max_length {self.max_length} exceeds 8192 tokens")
        return problems

    def _training_problems(self) -> list[str]:
        """Local training and the server's bound."""
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if not self.lam >= 0:
            problems.append(f"lambda must be ≥ 0, got {self.lam}")
        if self.norm_bound is not None and not self.norm_bound > 0:
            problems.append(f"norm_bound must be positive or off, got {self.norm_bound}")
        if not self.lora_scale > 0:
            problems.append(f"lora_scale must be positive, got {self.lora_scale}")
        if not 0 < self.florist_energy <= 1:
            problems.append(f"florist_energy must be in (0, 1], got {self.florist_energy}")
        return problems

    def _run_problems(self) -> list[str]:
        """Evaluation, sampling, precision, device, output, engine."""
        problems = []
        if self.eval_split not in ("test", "validation"):
            problems.append(f"eval_split must be test or validation, got {self.eval_split!r}")
        if self.rouge_size is not None and self.rouge_size < 1:
            problems.append(f"rouge_size must be ≥ 1 (or off), got {self.rouge_size}")
        if self.rouge_max_tokens < 1:
            problems.append(f"rouge_max_tokens must be ≥ 1, got {self.rouge_max_tokens}")
        if self.final_eval_size is not None and self.final_eval_size < 1:
            problems.append(f"final_eval_size must be ≥ 1 (or off), got {self.final_eval_size}")
        if self.sampling not in ("uniform", "cyclic"):
            problems.append(f"sampling must be uniform or cyclic, got {self.sampling!r}")
        if self.tier_eval not in ("final", "every", "off"):
            problems.append(f"tier_eval must be final, every or off, got {self.tier_eval!r}")
        if not self.target_modules or not all(m.strip() for m in self.target_modules):
            problems.append(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        problems += self._base_problems()
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        elif self.device == "cuda" and not _cuda_available():
            problems.append("device cuda was asked for, but this machine has no CUDA device (torch sees none); use auto or cpu")
        if not str(self.out).strip():
            problems.append("out must name a directory, got an empty string")
        if self.engine not in ("local", "flower"):
            problems.append(f"engine must be local or flower, got {self.engine!r}")
        return problems

    def _base_problems(self) -> list[str]:
        if self.base_weights not in ("auto", "dense", "gguf"):
            return [f"base_weights must be auto, dense or gguf, got {self.base_weights!r}"]
        method = METHODS.get(self.method)
        if self.base_weights == "gguf" and method is not None and (self.folds_into_base or method.client_kind == "fft"):
            return [f"base_weights gguf keeps the frozen weights in GGUF blocks, but {self.method} "
                    f"{'folds updates into them' if self.folds_into_base else 'trains them'}: use base_weights dense"]
        return []

    def base_for(self, device_client: bool, model_from_gguf: bool) -> str:
        """The base a host loads: as configured, else (auto) the GGUF's blocks for a device client of a GGUF model
        whose method leaves the base frozen, dense otherwise (docs/algorithm.md §7.1)."""
        if self.base_weights != "auto":
            return self.base_weights
        frozen = not self.folds_into_base and METHODS[self.method].client_kind != "fft"
        return "gguf" if device_client and model_from_gguf and frozen else "dense"

    def _dp_problems(self) -> list[str]:
        if self.dp_clip is None:
            return ["dp_noise needs dp_clip (DP is on only with a clip norm)"] if self.dp_noise is not None else []
        problems = []
        if self.prune:
            problems.append("prune = true is refused under DP: the rank a client prunes to depends on its data and is "
                            "released in the clear (update shape, ranks), which the DP accountant does not cover")
        if self.sampling != "uniform":
            problems.append("DP accounting assumes uniform sampling without replacement: use sampling = uniform with DP")
        if self.per_layer:
            problems.append("per_layer weights are refused under DP: DP-FedAvg weighs every clipped change equally")
        if not self.dp_clip > 0 or not self.noise_multiplier >= 0:
            problems.append(f"dp_clip must be positive and dp_noise ≥ 0, got {self.dp_clip} and {self.dp_noise}")
        if not 0 < self.dp_delta < 1:
            problems.append(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        method = METHODS.get(self.method)
        if method is not None and not method.dp_capable:
            allowed = ", ".join(name for name, m in METHODS.items() if m.dp_capable)
            problems.append(f"DP-FedAvg stands in only for a rule that is a weighted sum of zero-padded LoRA factors ({allowed}); "
                            f"{self.method}'s is not, and would be silently replaced")
        pool = self.client_pool or self.max_clients
        if pool is not None and self.clients_per_round > pool:
            problems.append(f"DP sampling: clients_per_round {self.clients_per_round} exceeds the {pool} registered clients")
        return problems

    def _secure_problems(self) -> list[str]:
        """What secure aggregation (docs/algorithm.md §6.1) cannot do: it hands the server one sum, nothing per client."""
        if not self.secure_aggregation:
            return [f"{name} needs secure_aggregation" for name in ("secure_clip", "secure_min_clients")
                    if getattr(self, name) is not None]
        problems = []
        method = METHODS.get(self.method)
        if method is not None and method.secure_weight is None:
            secure = ", ".join(name for name, m in METHODS.items() if m.secure_weight is not None)
            problems.append(f"secure aggregation needs a rule that is a weighted sum of zero-padded factors with one weight "
                            f"per client ({secure}); {self.method}'s is not, so its server would need the individual updates")
        if self.per_layer:
            problems.append("per_layer weights are one weight per client and module; secure aggregation carries one per client")
        if self.norm_bound is not None:
            problems.append("the norm bound compares each client with the round's median, which needs individual norms that "
                            "secure aggregation hides: use --norm-bound off (and --secure-clip C for a fixed client-side bound)")
        if self.dp_clip is not None:
            problems.append("DP and secure aggregation together are not supported here")
        if self.clients_per_round < 2:
            problems.append("secure aggregation needs at least 2 clients per round (a sum of one is that client's update)")
        if self.secure_clip is not None and not (self.secure_clip > 0 and math.isfinite(self.secure_clip)):
            problems.append(f"secure_clip must be a positive number or off (auto), got {self.secure_clip}")
        m = self.secure_min_clients
        if m is not None and not 2 <= m <= self.clients_per_round:
            problems.append(f"secure_min_clients must be between 2 and clients_per_round ({self.clients_per_round}), got {m}: "
                            "every component the server unmasks is a sum over at least that many clients")
        return problems

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hetlora.data.load_data` from this config."""
        options: dict[str, Any] = {"max_length": self.max_length, "eval_size": self.eval_size, "seed": self.data_seed,
                                   "min_examples": self.min_examples}
        if self.data != "chitchat" and self.partition:
            scheme, _, n = self.partition.partition(":")
            options["partition"] = {"scheme": scheme, "num_clients": int(n), "seed": self.data_seed,
                                    "label_column": self.partition_by, "alpha": self.dirichlet_alpha}
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpointing(self, device_client: bool) -> bool:
        """Whether clients checkpoint: as configured, else on for a device client (a Flower ClientApp) only."""
        return device_client if self.grad_checkpointing is None else self.grad_checkpointing

    def decisive_settings(self) -> dict[str, Any]:
        """The settings that decide a run's numbers: all but ``out`` and :data:`NUMBER_NEUTRAL` (memory and
        speed only; a finished run is reused, and a run resumed, whatever they are)."""
        return {k: v for k, v in self.settings().items() if k not in NUMBER_NEUTRAL}

    def settings(self) -> dict[str, Any]:
        """What defines the experiment: everything but where it is written (``out``)."""
        return {k: v for k, v in self.to_dict().items() if k != "out"}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def default_of(name: str) -> Any:
    """A RunConfig field's default value (its factory's, for a list or dict)."""
    f = FIELDS[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


ALIASES = {"lambda": "lam"}
_HINTS = typing.get_type_hints(RunConfig)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {args[0].__name__}"
    names = [a.__name__ for a in args if a is not type(None)] or [hint.__name__]
    return " or ".join(names) + (" or off" if type(None) in args else "")


def _is_instance(value: Any, hint: Any) -> bool:
    if value is None:
        return type(None) in typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if typing.get_args(hint) and origin is not None:  # Optional / union
        return any(_is_instance(value, a) for a in typing.get_args(hint) if a is not type(None))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:  # a 64-bit integer (what torch, numpy and JSON readers elsewhere can hold)
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return isinstance(value, hint)


def _type_problem(name: str, value: Any) -> str | None:
    hint = _HINTS[name]
    if _is_instance(value, hint):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return f"{name} = {value} is beyond a 64-bit integer"
    return f"{name} = {value!r} must be {_type_name(hint)} (got {type(value).__name__})"


def _coerce(name: str, value: Any) -> Any:
    """The value as the field holds it: ints given for floats become floats; "off" is None where allowed."""
    hint = _HINTS[name]
    if isinstance(value, str) and value.lower() == "off" and type(None) in typing.get_args(hint) and str not in typing.get_args(hint):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and float in (hint, *typing.get_args(hint)) and int not in typing.get_args(hint):
        return float(value)
    return value


def from_mapping(values: Mapping[str, Any], base: RunConfig | None = None, *, none_is_value: bool = False) -> RunConfig:
    """Overlay ``values`` (TOML keys, dashes or underscores) on ``base``.

    Unknown keys and values of the wrong type are errors naming key, value and the
    expected type. A ``None`` value means "not given" (flags), or — with ``none_is_value``, for
    a saved config.json — the setting's value (e.g. ``norm_bound`` off); "off" turns off a
    setting that allows it.
    """
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    problems = []
    seen: dict[str, str] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in FIELDS:
            problems.append(f"unknown config key {key!r}")
            continue
        if name in seen:
            problems.append(f"{seen[name]!r} and {key!r} both set {name}: give it once")
            continue
        seen[name] = key
        if value is None and not none_is_value:
            continue
        value = _coerce(name, value)
        problem = _type_problem(name, value)
        if problem:
            problems.append(problem.replace(f"{name} =", f"{key} =", 1))
            continue
        setattr(cfg, name, value)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    return cfg


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"5, 27,50"`` → [5, 27, 50]; anything else is one line naming the flag."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}")
    return [int(p) for p in parts]


def build_config(config: str | Path | None, flags: Mapping[str, Any]) -> RunConfig:
    """A TOML file first, then the command-line flags the user gave (None = not given)."""
    cfg = load_toml(config) if config else RunConfig()
    given = {k: v for k, v in flags.items() if v is not None}
    if "data" not in given and cfg.data != "chitchat" and Path(cfg.data).is_file():
        given["data"] = cfg.data
    if "ranks" in given:
        given["ranks"] = parse_int_list(given["ranks"], "--ranks")
    if "target_modules" in given:
        given["target_modules"] = [m.strip() for m in str(given["target_modules"]).split(",") if m.strip()]
    if given.get("data") not in (None, "chitchat") and Path(str(given["data"])).is_file():
        given["data"] = str(Path(str(given["data"])).resolve())  # a run finds its data from any directory
    if given.get("memory_budgets") and Path(str(given["memory_budgets"])).is_file():
        given["memory_budgets"] = str(Path(str(given["memory_budgets"])).resolve())  # and its budgets
    if given.get("client_delay") and Path(str(given["client_delay"])).is_file():
        given["client_delay"] = str(Path(str(given["client_delay"])).resolve())  # and its delay table
    if "norm_bound" in given and str(given["norm_bound"]).lower() != "off":
        try:
            given["norm_bound"] = float(given["norm_bound"])
        except ValueError:
            raise ValueError(f"--norm-bound takes a number or 'off', got {given['norm_bound']!r}") from None
    return from_mapping(given, cfg)


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory, not a TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, PermissionError) as err:
        raise ValueError(f"config file {path} is unreadable: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    values = raw.get("hetlora", raw)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: [hetlora] must be a table")
    if "hetlora" in raw and len(raw) > 1:
        others = sorted(k for k in raw if k != "hetlora")
        raise ValueError(f"config file {path} has both a [hetlora] table and top-level keys {others}: put every "
                         "setting in one place (top-level keys would be ignored)")
    return from_mapping(values, base)


def node_partitions(spec: str | None) -> dict[int, int]:
    """``node_clients``: "NODE=PID,…" or a JSON file {node id: partition id} → {node id: partition id}."""
    import json
    from pathlib import Path

    if not spec:
        return {}
    try:
        if "=" in spec:
            pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
            return {int(n): int(p) for n, p in pairs}
        return {int(n): int(p) for n, p in json.loads(Path(spec).read_text()).items()}
    except (ValueError, OSError, AttributeError) as e:
        raise ValueError(f"node_clients {spec!r}: expected NODE=PARTITION,… or a JSON file of node id → partition id ({e})") from None


def read_budgets(path: Path) -> dict[str, float]:
    """Per-client memory budgets (MB) from a JSON object ``{client id: MB}``, every value checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"memory budgets {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"memory budgets {path}: expected a JSON object of client id → positive MB")
    problems = [f"{k}: {p}" for k, v in data.items() if (p := budget_problem(v))]
    if problems:
        raise ValueError(f"memory budgets {path}: " + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return {str(k): float(v) for k, v in data.items()}
