"""Run configuration: one dataclass, loadable from TOML, checked before any model loads."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS

# LoRA defaults (SPEC.md, Notation): lora_alpha = DEFAULT_SCALE · r, on all 7 linear layers of a
# Llama-style block. Here rather than in lora.py so that a config is checked without importing peft.
DEFAULT_SCALE = 2.0
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    prune: bool | None = None  # None: as the method says (hetlora prunes)
    seed: int = 0
    out: str = "runs/hetlora"
    eval_size: int = 64
    eval_batch_size: int = 16
    tier_eval: str = "final"  # final | every | off
    min_examples: int = 20
    max_clients: int | None = None  # register only the first N clients (sorted ids)
    min_clients: int = 1  # fewer valid updates than this: keep the previous global adapter
    bf16: bool = False
    grad_checkpointing: bool = False  # clients recompute activations in backward: less memory, slower
    release_memory: bool = False  # clients return freed heap pages to the OS every 3 layers: less RSS, slower
    lora_scale: float = DEFAULT_SCALE
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module names LoRA wraps
    dp_clip: float | None = None  # user-level DP on: clip norm C
    dp_noise: float = 1.0
    dp_delta: float = 1e-5
    engine: str = "local"
    partition: str | None = None  # user data without client_id: "iid:N" or "dirichlet:N"
    partition_by: str = "label"
    dirichlet_alpha: float = 0.5
    device: str = "auto"  # auto (cuda when present) | cpu | cuda

    @property
    def global_rank(self) -> int:
        """Rank of the global adapter: the one rank for fedavg, else r_max."""
        method = METHODS.get(self.method)
        return (self.rank or self.r_max) if method is not None and method.uniform_rank else self.r_max

    @property
    def prunes(self) -> bool:
        return METHODS[self.method].prunes if self.prune is None else self.prune

    def validate(self) -> "RunConfig":
        """Raise ValueError naming the problem; runs before any model or data is loaded."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if not 1 <= self.r_min <= self.r_max:
            problems.append(f"need 1 ≤ r_min ≤ r_max, got r_min={self.r_min}, r_max={self.r_max}")
        if self.rank is not None and not 1 <= self.rank <= self.r_max:
            problems.append(f"rank {self.rank} must lie in [1, r_max={self.r_max}]")
        if self.rank_dist not in ("uniform", "tiers", "list", "fixed"):
            problems.append(f"rank_dist must be uniform, tiers, list or fixed, got {self.rank_dist!r}")
        if self.rank_dist == "list" and not self.ranks:
            problems.append("rank_dist 'list' needs ranks = [..]")
        if any(not self.r_min <= r <= self.r_max for r in self.ranks):
            problems.append(f"ranks {self.ranks} must lie in [r_min, r_max]")
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size", "max_length", "eval_size", "min_clients"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma must be in (0, 1], got {self.gamma}")
        if self.lam < 0:
            problems.append(f"lambda must be ≥ 0, got {self.lam}")
        if self.norm_bound is not None and self.norm_bound <= 0:
            problems.append(f"norm_bound must be positive or off, got {self.norm_bound}")
        if self.tier_eval not in ("final", "every", "off"):
            problems.append(f"tier_eval must be final, every or off, got {self.tier_eval!r}")
        if not self.target_modules or not all(isinstance(m, str) and m.strip() for m in self.target_modules):
            problems.append(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.engine not in ("local", "flower"):
            problems.append(f"engine must be local or flower, got {self.engine!r}")
        if self.dp_clip is not None and (self.dp_clip <= 0 or self.dp_noise < 0):
            problems.append("dp_clip must be positive and dp_noise ≥ 0")
        if self.dp_clip is not None and METHODS.get(self.method) is not None and METHODS[self.method].client_kind != "lora":
            problems.append(f"DP mode supports the LoRA methods with a persistent global adapter, not {self.method}")
        if self.data != "chitchat" and not Path(self.data).is_file():
            problems.append(f"data {self.data!r} is neither 'chitchat' nor an existing .jsonl/.csv file")
        if self.partition is not None:
            scheme, _, n = self.partition.partition(":")
            if scheme not in ("iid", "dirichlet") or not n.isdigit() or int(n) < 1:
                problems.append(f"partition must be iid:N or dirichlet:N, got {self.partition!r}")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hetlora.data.load_data` from this config."""
        options: dict[str, Any] = {"max_length": self.max_length, "eval_size": self.eval_size, "seed": self.seed}
        if self.data == "chitchat":
            options["min_examples"] = self.min_examples
        elif self.partition:
            scheme, _, n = self.partition.partition(":")
            options["partition"] = {"scheme": scheme, "num_clients": int(n), "seed": self.seed,
                                    "label_column": self.partition_by, "alpha": self.dirichlet_alpha}
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
ALIASES = {"lambda": "lam", "clients-per-round": "clients_per_round"}


def from_mapping(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay ``values`` (TOML keys, dashes or underscores) on ``base``; unknown keys are errors."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for key, value in values.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in FIELDS:
            raise ValueError(f"unknown config key {key!r}")
        if name == "norm_bound" and isinstance(value, str):
            value = None if value.lower() == "off" else float(value)
        setattr(cfg, name, value)
    return cfg


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    values = raw.get("hetlora", raw)
    return from_mapping(values, base)
