"""A client's peak memory per rank, and ranks chosen from devices' memory budgets (docs/algorithm.md §7).

A LoRA client's footprint is a fixed part (runtime, frozen weights, activations, the loss) that
does not depend on its rank, plus its LoRA state, which grows linearly with it: factors, their
gradients and two AdamW moments, 16 bytes per element of (out + in)·r per adapted module. The
fixed part is measured: ``benchmarks/footprint.py`` runs real device processes at several ranks
and fits ``peak = fixed + per_rank · r`` per setting (model, base weights, precision, checkpointing, batch,
length, and the method's kind of client: a plain LoRA client, one that folds a base delta into its weights,
Fed-PLoRA's); the fits ship in ``footprint_calibration.json``. A setting without a fit is refused,
never guessed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..config import read_budgets
from ..core.ranks import ranks_from_budgets
from ..methods import get_method
from ..models.loading import from_gguf

CALIBRATION = Path(__file__).with_name("footprint_calibration.json")


def setting_key(model: str, base: str, precision: str, checkpointing: bool, batch_size: int, max_length: int,
                client: str = "lora") -> str:
    """The setting a fit belongs to; ``client`` is the method's footprint client (hetlora.methods.base.Method.
    footprint_client), named only when it is not a plain LoRA client (the keys of before it stay valid)."""
    key = f"{model}|base={base}|{precision}|checkpointing={'on' if checkpointing else 'off'}|batch={batch_size}|length={max_length}"
    return key if client == "lora" else f"{key}|client={client}"


@dataclass(frozen=True)
class FootprintModel:
    """peak RSS (MB) = ``fixed_mb`` + ``per_rank_mb`` · rank."""

    fixed_mb: float
    per_rank_mb: float

    def predict(self, rank: int) -> float:
        return self.fixed_mb + self.per_rank_mb * rank

    def largest_rank(self, budget_mb: float, r_min: int, r_max: int) -> int | None:
        """The largest rank in [r_min, r_max] predicted to fit ``budget_mb`` (None: not even r_min)."""
        if self.per_rank_mb <= 0:
            return r_max if self.predict(r_max) <= budget_mb else None
        best = min(r_max, int((budget_mb - self.fixed_mb) // self.per_rank_mb))
        return best if best >= r_min else None


def fit(points: Iterable[tuple[int, float]], min_slope: float = 0.0) -> FootprintModel:
    """The lowest line of slope ≥ max(least-squares slope, ``min_slope``) that no measured (rank, peak MB) point lies
    above: a budget is never given a rank whose measured peak exceeded it. Peaks of one setting vary by up to ~15 %
    between processes (glibc), more than the rank moves them, so a least-squares line predicted some measured peaks
    low (one fit came out with a negative slope); ``min_slope`` is what a rank certainly adds (the LoRA state, computed
    exactly by the benchmark). One point: a flat line through it."""
    pts = list(points)
    if len(pts) == 1:
        return FootprintModel(pts[0][1], 0.0)
    ranks, peaks = [r for r, _ in pts], [p for _, p in pts]
    slope = max(statistics.linear_regression(ranks, peaks).slope, min_slope)
    return FootprintModel(max(p - slope * r for r, p in pts), slope)


def rank_slope(rows: Iterable[Mapping]) -> float:
    """MB a rank certainly adds, from the rows' exact parts: the LoRA state (factors, gradients, two AdamW moments;
    0 when the rows lack it, or hold one rank)."""
    pts = [(r["rank"], r["trainable_state_mb"]) for r in rows if "trainable_state_mb" in r]
    if len({r for r, _ in pts}) < 2:
        return 0.0
    return max(statistics.linear_regression([r for r, _ in pts], [m for _, m in pts]).slope, 0.0)


def row_setting(row: Mapping, model: str = "smollm2") -> str:
    """The setting a footprint benchmark row measured (a row without ``model`` is ``model``'s, without ``base`` dense,
    without ``client`` a plain LoRA client's: the rows of before those were measured)."""
    return setting_key(row.get("model", model), row.get("base", "dense"), row["precision"], row["checkpointing"], row["batch"],
                       row["length"], row.get("client", "lora"))


def setting_rows(rows: Iterable[Mapping], model: str = "smollm2") -> dict[str, list[Mapping]]:
    """The rows a fit is made of, per setting: LoRA ClientApp rows, not of ``--release-memory`` clients (the prediction
    is for the default; conservative when it is on)."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        if r["kind"] == "lora" and r["engine"] == "clientapp" and not r.get("release_memory"):
            groups.setdefault(row_setting(r, model), []).append(r)
    return groups


def calibrate(rows: Iterable[Mapping], model: str = "smollm2") -> dict[str, dict]:
    """The fits of a footprint benchmark's rows, per setting (:func:`setting_rows`). Rows of several measurements of
    one setting are fitted together (the envelope then covers every one)."""
    fits = {}
    for key, mine in setting_rows(rows, model).items():
        points = sorted((r["rank"], r["peak_rss_mb"]) for r in mine)
        if len({r for r, _ in points}) >= 2:  # a line needs two ranks: one point would predict every rank's peak to be that rank's (a guess, refused)
            fits[key] = vars(fit(points, rank_slope(mine))) | {"points": points}
    return fits


def footprint_model(key: str, calibration: Path | None = None) -> FootprintModel:
    calibration = calibration or CALIBRATION
    fits = json.loads(calibration.read_text())["fits"] if calibration.is_file() else {}
    if key not in fits:
        raise ValueError(f"no memory footprint calibration for {key} in {calibration} (calibrated: {', '.join(sorted(fits)) or 'none'}); "
                         "run benchmarks/footprint.py with these settings, or leave memory budgets out")
    return FootprintModel(fits[key]["fixed_mb"], fits[key]["per_rank_mb"])


def calibration_problem(cfg, precision: str, device_clients: bool, stated: tuple[object, object] | None = None) -> str | None:
    """Why ranks cannot be fitted to memory for this run's clients (None: a fit exists): what :func:`fit_ranks` would
    raise, asked before it is (a SuperNode's stated budget is then refused by name, not a crash of the ServerApp).
    ``stated``: the (base weights, precision) a device said it runs (:func:`stated_setting`), else the run's here."""
    try:
        footprint_model(client_setting(cfg, precision, device_clients) if stated is None else stated_setting(cfg, *stated))
    except ValueError as err:
        return str(err)
    return None


def footprint_client(cfg) -> str:
    """The run's method's footprint client (hetlora.methods.base.AggregationMethod.footprint_client), refused where
    its rank does not set its clients' memory (fft)."""
    client = get_method(cfg.method).footprint_client
    if client is None:
        raise ValueError(f"{cfg.method}'s clients have no rank-dependent memory footprint: a memory budget cannot give them a rank")
    return client


#: what a device may state it holds its base in, and computes in (anything else leaves its node out)
STATED_BASES, STATED_PRECISIONS = ("dense", "gguf"), ("fp32", "bf16", "fp16")


def stated_setting(cfg, base: object, precision: object) -> str:
    """The footprint setting of a device of this run that states its own base weights and resolved precision (a
    SuperNode: a node may hold its base otherwise, and resolve ``auto`` otherwise, than the server); the rest of the
    setting is the run's. A value outside the known ones is refused (ValueError), never echoed into a key."""
    if base not in STATED_BASES or precision not in STATED_PRECISIONS:
        raise ValueError(f"states base-weights / precision that are not one of {'/'.join(STATED_BASES)} and "
                         f"{'/'.join(STATED_PRECISIONS)}")
    return setting_key(cfg.model, str(base), str(precision), cfg.checkpointing(True), cfg.batch_size, cfg.max_length,
                       footprint_client(cfg))


def client_setting(cfg, precision: str, device_clients: bool) -> str:
    """The footprint setting of this run's clients (refused for a method whose rank does not set its memory)."""
    base = cfg.base_for(device_clients, from_gguf(cfg.model))
    return setting_key(cfg.model, base, precision, cfg.checkpointing(device_clients), cfg.batch_size, cfg.max_length,
                       footprint_client(cfg))


def fit_ranks(cfg, ranks: Mapping[str, int], precision: str, device_clients: bool, low: int,
              budgets: Mapping[str, float] | None = None, settings: Mapping[str, str] | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """(ranks, left out) from memory budgets: each client the largest rank its budget is predicted to fit
    in [``low``, global rank] (uniform-rank methods: low = the one rank); ``budgets`` None: the config's
    (``memory_budgets`` file, else ``memory_budget_mb`` for all). Clients without a budget keep their rank.
    ``settings``: a client's own footprint setting where its device stated it (a SuperNode's base weights and
    precision are its own, not the server's); the others take the run's, on this machine's ``precision``."""
    if budgets is None:
        given = read_budgets(cfg.memory_budgets) if cfg.memory_budgets else {}
        unknown = sorted(set(given) - set(ranks))
        if unknown:
            raise ValueError(f"memory budgets {cfg.memory_budgets} name {len(unknown)} client(s) this federation does not have "
                             f"(e.g. {unknown[0]}): a typo would leave a device on the default budget")
        budgets = {c: given.get(c, cfg.memory_budget_mb) for c in ranks}
        missing = [c for c, b in budgets.items() if b is None]
        if missing:
            raise ValueError(f"memory budgets {cfg.memory_budgets} name no budget for {len(missing)} client(s) "
                             f"(e.g. {missing[0]}) and no --memory-budget is given for the rest")
    stated = settings or {}
    footprint_client(cfg)  # fft is refused whatever its devices stated
    run_setting = client_setting(cfg, precision, device_clients) if set(budgets) - set(stated) else None
    fitted, left_out, lowest = {}, {}, []
    for setting in dict.fromkeys(stated.get(c, run_setting) for c in budgets):
        model = footprint_model(setting)
        got, out = ranks_from_budgets({c: b for c, b in budgets.items() if stated.get(c, run_setting) == setting},
                                      model.largest_rank, low, cfg.global_rank)
        fitted, left_out, lowest = fitted | got, left_out | out, lowest + [model.predict(low)]
    kept = {c: fitted.get(c, r) for c, r in ranks.items() if c not in left_out}
    if not kept:
        raise ValueError(f"no client's memory budget fits a rank ≥ {low} (predicted {min(lowest):.0f} MB at rank {low})")
    return kept, left_out
