"""The reproduction study: HetLoRA's claims as a checklist, with seeds, intervals and provenance.

``hetlora study --preset cpu-v4|cpu|gpu`` (or ``python benchmarks/reproduce.py``) runs every method
on the same seeds, clients, ranks and budget, then judges each comparison with ``hetlora`` on the per-seed
**paired** differences: v3 (``cpu``) its claims C1–C8 (study/claims.py); v4 (``cpu-v4``) one Holm family of
relative differences, every label at its own tuned rate (study/family.py, study/tuning.py; docs/algorithm.md §10).
A verdict is *reproduced* when the test rejects on the paper's side of zero, *not reproduced* when on the other
side, *inconclusive* otherwise.

A study continues across sittings and machines: every finished run's ``metrics.jsonl`` and
``summary.json`` land under ``<results>/<preset>/runs/<label>-s<seed>/``, finished runs are
skipped, and the report (``study.json``, ``study.md``, plots) is rebuilt from whatever is
there. Learning rates are tuned first on the validation half of the held-out pool (never the
test half): v3 one shared rate for the LoRA methods and a grid of its own for full fine-tuning; v4 every label its
own bracketed rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .compare import variant
from ..files import write_json_atomic
from ..config import RunConfig, default_of
from ..server.outputs import read_metrics
from ..server.runner import finished_as_asked
from ..data.chitchat import SPLIT_VERSION
from .stats import ALPHA
from .claims import EQUIVALENCE_MARGIN_PCT, block_key, by_label, claims, load_runs, paired
from .report import block_label, read_json
from .family import C4_RATE, C6_HOMLORA, comparisons
from .tuning import LADDER, label_table, rate_key, validation_score

# Methods in the order they run for each seed: the claims' methods first, then the chosen variants and the challengers.
CLAIM_LABELS = ["hetlora", "fedavg-rmin", "fedavg-rmax", "recon-svd", "hetlora-noprune", "hetlora-naive", "fft"]
# HetLoRA's rank-health variants picked on the validation split (benchmarks/results/pilot-rank-health, #23).
VARIANT_LABELS = ["hetlora-svd-revive", "hetlora-ordered"]
CORE_LABELS = CLAIM_LABELS + VARIANT_LABELS + ["fedex-lora", "fslora"]
REFERENCE_LABELS = ["hetlora-keep", "rbla", "rb-lora", "flexlora", "flora", "ffa", "hetlora-svd", "hetlora-revive"]
LONG_LABELS = ["hetlora", "fedavg-rmin", "fedavg-rmax"]
LABELS = CORE_LABELS + REFERENCE_LABELS
TUNE_LORA_LABELS = ["hetlora", "fedavg-rmin", "fedavg-rmax"]
TUNE_SEED = 100  # tuning runs use a seed no study run uses
# Study v4's core set: the paper's claims, v3's winners and variant, and the 2026 field (rb-lora stands for raFLoRA, whose
# one readable rule is rb-lora's: docs/algorithm.md).
V4_LABELS = CLAIM_LABELS + ["hetlora-svd-revive", "fedex-lora", "fslora", "flexlora", "fed-plora", "florist", "rb-lora"]
V4_SEEDS = 20  # what plan.size_family's rule gives from v3's runs (Study.plan refuses a preset that disagrees)
# One v4 run's ROUGE-L (64 greedy responses of ≤ 48 tokens), measured once before registering (AMD EPYC AVX512-BF16, bf16,
# 2 threads: the final evaluation took 69.5 s with ROUGE-L against ≈ 36 s for the 256 examples and the r_min tier alone);
# the plan adds it to every class, an overestimate on faster ones.
ROUGE_SECONDS_PER_RUN = 33.0
V4_SPLIT_SEED = 2026  # the one data split of every v4 run, tuning included (no run seed is 2026)

@dataclass(frozen=True)
class Preset:
    """A study's design. ``seeds`` × ``labels`` is the core set; references and the long regime run on fewer seeds."""

    seeds: tuple[int, ...]
    base: dict[str, Any]
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    fft_lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    tune_rounds: int = 6
    labels: tuple[str, ...] = tuple(CORE_LABELS)
    reference_labels: tuple[str, ...] = ()
    reference_seeds: tuple[int, ...] = ()
    long_labels: tuple[str, ...] = ()
    long_seeds: tuple[int, ...] = ()
    long_steps_factor: int = 3  # the long regime: this many times the local steps per visit
    results_dir: str | None = None  # under the results root; the preset's name when None
    sized_from: tuple[str, ...] = ()  # earlier results (under the results root) the pre-registered plan is sized from
    superseded: str | None = None  # a record kept for its report only: why it is not run again
    # study v4 (#44): every label its own bracketed rate on tune_seeds, one Holm family, the long regime as more rounds
    version: int = 3
    tune_seeds: tuple[int, ...] = (TUNE_SEED,)
    long_rounds: int | None = None  # v4: the long regime runs this many rounds at the same per-round budget
    long_best_of: tuple[str, ...] = ()  # v4: the long regime adds the one of these with the best tuned validation score


COMMON = dict(model="smollm2", data="chitchat", min_examples=20, sampling="cyclic", r_min=5, r_max=50,
              rank_dist="uniform", gamma=0.99, lam=0.01, norm_bound=None, tier_eval="final", tiers=[5, 50], precision="auto")
CPU_BASE = COMMON | dict(client_pool=12, clients_per_round=4, rounds=9, local_steps=2, batch_size=8, max_length=64, eval_size=32,
                         final_eval_size=256)
PRESETS: dict[str, Preset] = {
    # Study v3 on 2 CPU cores (#24): 12 returning clients, 4 a round, 9 rounds (every client trained 3 times);
    # the core set on 20 seeds (the median of what C1–C7 need for 80 % power, from v2: plan.json), every other
    # method on 3, and the long regime (3× local steps) on 3.
    "cpu": Preset(seeds=tuple(range(20)), base=CPU_BASE, tune_rounds=4, reference_labels=tuple(REFERENCE_LABELS),
                  reference_seeds=(0, 1, 2), long_labels=tuple(LONG_LABELS), long_seeds=(0, 1, 2), results_dir="cpu-v3",
                  sized_from=("cpu-v2", "pilot-rank-health")),
    # Study v2 (3 seeds, the old split): a record; ``--report-only`` rebuilds its report.
    "cpu-v2": Preset(seeds=(0, 1, 2), base=CPU_BASE, tune_rounds=4, results_dir="cpu-v2",
                     labels=tuple(CLAIM_LABELS + ["hetlora-keep", "rbla", "rb-lora", "flexlora", "flora", "ffa", "fslora", "fedex-lora"]),
                     superseded="study v2 stands on the old data split (split version 1); preset cpu is its successor"),
    # Study v4 on 2 CPU cores (#44): the 2026 field, every label at its own tuned rate, one Holm family; one data split for
    # every seed (split_seed), ROUGE-L of every final model; n from v3's paired effects by the plan's rule (plan.size_family).
    "cpu-v4": Preset(seeds=tuple(range(V4_SEEDS)), base=CPU_BASE | dict(split_seed=V4_SPLIT_SEED, rouge_size=64), version=4,
                     labels=tuple(V4_LABELS), lr_grid=(3e-4, 1e-3, 3e-3), fft_lr_grid=(3e-5, 1e-4, 3e-4), tune_rounds=CPU_BASE["rounds"],
                     tune_seeds=(TUNE_SEED, TUNE_SEED + 1), long_labels=("hetlora", "fedavg-rmin", "fedavg-rmax", "fslora"),
                     long_best_of=("fed-plora", "florist", "rb-lora"), long_seeds=(0, 1, 2, 3, 4), long_rounds=30,
                     results_dir="cpu-v4", sized_from=("cpu-v3",)),
    # one GPU, ≥ 5× the CPU preset's compute per run (8× the tokens), 5 seeds.
    "gpu": Preset(seeds=(0, 1, 2, 3, 4), base=COMMON | dict(client_pool=24, clients_per_round=8, rounds=9, local_steps=4,
                                                            batch_size=8, max_length=128, eval_size=64, final_eval_size=512),
                  tune_rounds=3, reference_labels=tuple(REFERENCE_LABELS), reference_seeds=(0, 1, 2),
                  long_labels=tuple(LONG_LABELS), long_seeds=(0, 1, 2), results_dir="gpu-v3", sized_from=("cpu-v2", "pilot-rank-health")),
    # seconds, for tests: the tiny model
    "smoke": Preset(seeds=(0, 1), base=COMMON | dict(model="tiny", client_pool=4, clients_per_round=2, rounds=2, local_steps=1,
                                                     batch_size=2, max_length=32, eval_size=4, final_eval_size=8, r_min=2, r_max=6,
                                                     min_examples=200, tiers=[2, 6]),
                    lr_grid=(1e-3, 1e-2), fft_lr_grid=(1e-4,), tune_rounds=1, labels=tuple(CLAIM_LABELS)),
}

FIRST_CORE_SEEDS = 10  # the core set's first seeds run before the references and the long regime, the rest after
PAUSE_FILE = "PAUSE"  # in the work root: the study starts no new run while it exists (quiet cores for a benchmark)


# ---------------------------------------------------------------------------------- running
def recorded(saved: dict[str, Any], key: str) -> Any:
    """A recorded config's ``key``; a setting added after the run was made reads as its default (what the run did)."""
    return saved[key] if key in saved else default_of(key)


def settings_problem(cfg: RunConfig, saved: dict[str, Any]) -> str | None:
    """Why a run recorded with ``saved`` settings is not the run ``cfg`` asks for (None: it is), by its decisive settings."""
    changed = [f"{k} {recorded(saved, k)!r} (the plan's {v!r})" for k, v in cfg.decisive_settings().items() if recorded(saved, k) != v]
    return f"its recorded settings are not the plan's: {'; '.join(changed)}" if changed else None


def run_label(label: str, seed: int, base: RunConfig, out: Path) -> RunConfig:
    cfg = variant(label, dataclasses.replace(base, seed=seed, out=str(out)))
    return dataclasses.replace(cfg, out=str(out))


def execute(cfg: RunConfig, results: Path, block: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) one run in its work directory, then keep its metrics, summary and seed block in ``results``."""
    from ..server.runner import run

    work = Path(cfg.out)
    resume = (work / "config.json").is_file()
    summary = run(cfg, resume=resume, progress=False)
    results.mkdir(parents=True, exist_ok=True)
    if block is not None:
        write_json_atomic(results / "block.json", block)
    for name in ("metrics.jsonl", "summary.json"):
        shutil.copy2(work / name, results / name)
    drop_heavy_outputs(work)
    return summary


HEAVY_OUTPUTS = ("checkpoint", "adapter", "base_delta.safetensors")


def drop_heavy_outputs(work: Path) -> None:
    """A kept run's work directory is scratch: its checkpoints, adapter and folded delta go (0.1–1.4 GB a run).

    Kept, they filled a 250 GB disk by seed 5 of study v4. The results keep what the report reads (metrics,
    summary); ``hetlora run`` with the run's recorded config trains its model again, bit for bit on its seed block
    (``--verify`` checks that on the metrics). The small files (config, lock) stay; a kept run asked for more rounds
    later (a changed plan) therefore starts again from round 0, not from its last checkpoint.
    """
    for name in HEAVY_OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


FINGERPRINT_LABELS = ("hetlora", "fft")  # what a study of version < 5 fingerprints (the blocks of v3 and v4 were made so)


def behaviour_fingerprint(precision: str, work: Path, labels: tuple[str, ...] = FINGERPRINT_LABELS, device: str = "auto") -> str:
    """A hash of what the training code computes here: one tiny round of each of ``labels``, timings left out.

    Two machines, precisions or commits with the same fingerprint train alike; a commit that changes a
    run's numbers changes it, and so starts a new seed block (the seeds run before it must be re-run). It sees
    only the labels it runs: a study whose labels are not all in it (v4 runs 14; its block was fingerprinted
    with hetlora and fft) would not notice a commit that changes another label's arithmetic (fslora's streamed
    server changed after v4 was registered), which is why v4 runs from a pinned commit, and why a study of
    version 5 or later fingerprints every one of its labels (:meth:`Study.fingerprint_labels`).
    """
    import hashlib

    from ..server.runner import run

    digest = hashlib.sha256()
    for label in labels:
        out = work / f"fingerprint-{label}"
        shutil.rmtree(out, ignore_errors=True)
        base = RunConfig(**(PRESETS["smoke"].base | dict(seed=0, rounds=1, precision=precision, lr=1e-3, tier_eval="off",
                                                          device=device, out=str(out))))
        cfg = dataclasses.replace(variant(label, base), out=str(out))
        run(cfg, progress=False)
        for row in read_metrics(out):
            digest.update(json.dumps([row.get("train_loss"), row.get("eval_loss"), row.get("bytes_up")]).encode())
        for f in sorted((out / "adapter").rglob("*.safetensors")):
            digest.update(f.read_bytes())
        shutil.rmtree(out, ignore_errors=True)
    return digest.hexdigest()[:16]


def machine_block(precision: str, device: str, work: Path, labels: tuple[str, ...] = FINGERPRINT_LABELS) -> dict[str, Any]:
    """The seed block this machine runs in: device class, resolved precision and training behaviour (of ``labels``)."""
    import torch

    from ..device.host import pick_device, resolve_precision
    from ..provenance import device_name

    device = pick_device(device)  # where the runs train: a preset's "auto" is cuda on a GPU machine, and so is its block
    resolved = resolve_precision(precision, device)
    device_class = (f"cuda: {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else
                    f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    return {"device_class": device_class, "precision": resolved, "behaviour": behaviour_fingerprint(resolved, work, labels, device),
            "device": device_name(device)}


def utc_timestamp() -> str:
    """When a plan was registered or a seed set aside: UTC, to the second (the records a reader compares with commit times)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Study:
    preset_name: str
    results_root: Path = Path("benchmarks/results")
    work_root: Path = Path("runs/study")
    budget_seconds: float | None = None
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)

    @property
    def preset(self) -> Preset:
        return PRESETS[self.preset_name]

    @property
    def results(self) -> Path:
        return self.results_root / (self.preset.results_dir or self.preset_name)

    @property
    def work(self) -> Path:
        return self.work_root / (self.preset.results_dir or self.preset_name)

    def base(self, **changes: Any) -> RunConfig:
        return RunConfig(**(self.preset.base | changes))

    def out_of_time(self) -> bool:
        return self.budget_seconds is not None and time.perf_counter() - self.started > self.budget_seconds

    def wait_while_paused(self, poll_seconds: float = 5.0) -> None:
        pause = self.work_root / PAUSE_FILE
        if pause.exists():
            self.log(f"paused: {pause} exists; the next run starts when it is removed")
            while pause.exists():
                time.sleep(poll_seconds)

    # -------------------------------------------------------------- the pre-registered plan
    def design(self) -> dict[str, Any]:
        p = self.preset
        design = {"core_labels": list(p.labels), "core_seeds": list(p.seeds), "variant_labels": [v for v in VARIANT_LABELS if v in p.labels],
                "reference_labels": list(p.reference_labels), "reference_seeds": list(p.reference_seeds),
                "long_labels": list(p.long_labels), "long_seeds": list(p.long_seeds), "long_steps_factor": p.long_steps_factor,
                "base": p.base, "lr_grid": list(p.lr_grid), "fft_lr_grid": list(p.fft_lr_grid), "tune_rounds": p.tune_rounds,
                "split": SPLIT_VERSION, "alpha": ALPHA, "equivalence_margin_pct": EQUIVALENCE_MARGIN_PCT,
                "families": {"C1-C7": "Holm across the seven claims", "C8": "Holm across every core label vs hetlora"},
                "c8_rule": "a method beats hetlora when its Holm-adjusted two-sided paired test rejects with lower perplexity",
                "seed_blocks": "all runs of one seed (core and references; the long regime apart) share device class, "
                               "precision and training behaviour (fingerprint); a seed of another block is not run here"}
        if p.version < 4:
            return design
        for v3_only in ("equivalence_margin_pct", "long_steps_factor", "c8_rule"):  # v4 judges by its own rules (design_v4)
            design.pop(v3_only)
        return design | self.design_v4()

    def design_v4(self) -> dict[str, Any]:
        """What v4 registers beside v3's design (docs/algorithm.md §10): tuning, the one family, the long regime, the seed rule."""
        p = self.preset
        return {"version": 4, "tune_seeds": list(p.tune_seeds), "tuning_ladder": list(LADDER),
                "tuning_rule": "every label its own rate: its first grid on every tuning seed, on the validation split of the one data "
                               "split, the study's own rounds; score = geometric mean of the seeds' validation perplexities; while the "
                               "best rate is the grid's edge, the ladder's next rate on that side is added (study/tuning.py)",
                "families": {"all": "one Holm family: every core label vs hetlora (C1, C2, C3, C5 among them), C4's trade, C6, C7"},
                "statistic": "per seed 100 · (ppl(label) − ppl(hetlora)) / ppl(hetlora), two-sided paired t-test, α = 0.05 after Holm",
                "c4_rate_pct_ppl_per_pct_upload": C4_RATE, "c6_homlora": C6_HOMLORA,
                "long_rounds": p.long_rounds, "long_best_of": list(p.long_best_of),
                "long_rule": f"the long regime runs {', '.join(p.long_labels)} and the one of {', '.join(p.long_best_of)} whose tuned "
                             f"validation score is lowest, {p.long_rounds} rounds at the core set's per-round budget; descriptive "
                             "(curves and best rounds), not in the family",
                "rouge": "ROUGE-L of each final model's greedy responses (secondary outcome, not in the family)",
                "unfinished_seed_rule": "a seed still owing a planned run when its block's machines are gone is set aside whole "
                                        "(hetlora study --set-aside-seed, with the reason) and run again in another block; a complete "
                                        "seed is never set aside; the report lists the set-aside runs and their compute",
                "plan_rule": "this plan is written and committed before any v4 run (tuning included) and never edited after"}

    def plan(self) -> dict[str, Any]:
        """The registered plan (``plan.json``), written before the first run; refuses a design changed since."""
        from .plan import preregister

        path = self.results / "plan.json"
        design = json.loads(json.dumps(self.design()))
        if path.is_file():
            registered = json.loads(path.read_text())
            if registered["design"] != design:
                changed = sorted(k for k in design.keys() | registered["design"].keys() if design.get(k) != registered["design"].get(k))
                raise ValueError(f"the study's design differs from its pre-registered plan {path} in {', '.join(changed)}; "
                                 "a registered plan is not changed after runs were seen: start a new results directory")
            return registered
        if self.preset.version >= 4:
            plan = self.plan_v4(design)
            write_json_atomic(path, plan)
            return plan
        # each source is paired within itself: the first (the earlier study) sizes C1–C7, and C8 takes each label
        # from the first source that ran it beside hetlora (the variants from the validation-split pilot)
        sources = [by_label(load_runs(self.results_root / d)) for d in self.preset.sized_from if (self.results_root / d / "runs").is_dir()]
        c8: dict[str, list[float]] = {}
        for label in self.preset.labels:
            diffs = next((d for d in (paired(src, label, lambda r: r["final_eval_ppl"])[1] for src in sources) if d), [])
            if label != "hetlora" and diffs:
                c8[label] = diffs
        plan = preregister(design, claims(sources[0], self.preset) if sources else [], c8,
                           ", ".join(f"{self.results_root / d}" for d in self.preset.sized_from) or "nothing")
        plan["registered"] = utc_timestamp()
        self.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan)
        return plan

    def plan_v4(self, design: dict[str, Any]) -> dict[str, Any]:
        """v4's plan: the one family sized from the earlier study's paired effects; refuses a preset whose n is not the rule's."""
        from .plan import size_family

        p = self.preset
        source = self.results_root / p.sized_from[0]
        prior_runs = load_runs(source)
        sizing = size_family(comparisons(by_label(prior_runs), p.labels, p.base["r_min"]))
        if sizing["n"] != len(p.seeds):
            raise ValueError(f"the plan's rule gives n = {sizing['n']} seeds from {source}, the preset has {len(p.seeds)}: "
                             "set the preset's seeds to the rule's n before registering")
        self.results.mkdir(parents=True, exist_ok=True)
        return {"design": design, "core_labels": list(p.labels), "n": sizing["n"], "sized_from": str(source), "sizing": sizing,
                "rule": sizing["rule"], "compute": self.compute_v4(prior_runs), "registered": utc_timestamp()}

    def compute_v4(self, prior_runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The plan's compute: runs × rounds × the earlier study's seconds per round on each machine class, + ROUGE-L per run."""
        from .plan import compute_plan, seconds_per_round

        p = self.preset
        long_labels = len(p.long_labels) + (1 if p.long_best_of else 0)
        sections = {"tuning, first grids (each ladder step adds one run per tuning seed)":
                    (len(p.labels) * len(p.lr_grid) * len(p.tune_seeds), p.tune_rounds, False),
                    "core": (len(p.labels) * len(p.seeds), p.base["rounds"], True),
                    "long": (long_labels * len(p.long_seeds), p.long_rounds or p.base["rounds"], True)}
        return compute_plan(sections, seconds_per_round(prior_runs), ROUGE_SECONDS_PER_RUN)

    # -------------------------------------------------------------- learning rates
    def rate(self, tuning: dict[str, Any], label: str) -> float:
        """The learning rate a label runs at: v4 its own tuned rate, v3 the shared LoRA rate or FFT's."""
        if self.preset.version >= 4:
            return tuning["labels"][label]["chosen"]
        return tuning["fft_lr"] if label == "fft" else tuning["lora_lr"]

    def tune(self, block: dict[str, Any] | None = None) -> dict[str, Any]:
        """The learning rates, chosen on the validation split (resumable): v4 per label, v3 shared."""
        return self.tune_v4(block) if self.preset.version >= 4 else self.tune_shared(block)

    def tune_v4(self, block: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every label its own rate from a grid that brackets its optimum (study/tuning.py), label by label."""
        p = self.preset
        labels: dict[str, dict[str, Any]] = {}
        provenance: dict[str, Any] = {}
        for label in p.labels:
            labels[label] = self.tune_label(label, block, provenance)
            if self.out_of_time():
                break
        complete = len(labels) == len(p.labels) and all(t["complete"] for t in labels.values())
        best_new = (min(p.long_best_of, key=lambda lab: labels[lab]["scores"][rate_key(labels[lab]["chosen"])])
                    if complete and p.long_best_of else None)
        out = {"version": 4, "split": "validation", "split_seed": p.base.get("split_seed"), "seeds": list(p.tune_seeds),
               "rounds": p.tune_rounds, "complete": complete, "labels": labels, "long_best_new": best_new,
               "score": "geometric mean of the tuning seeds' validation perplexities", "provenance": provenance}
        self.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.results / "tuning.json", out)
        return out

    def tune_label(self, label: str, block: dict[str, Any] | None, provenance: dict[str, Any]) -> dict[str, Any]:
        """One label's tuning table: its kept runs read back, then (on a machine of the label's block) what it still owes
        run until it is bracketed or time is up. A label's rates are compared inside one seed block: one begun on another
        machine class is complete if its runs are, and otherwise waits for that class (``waiting_for_block``)."""
        p = self.preset
        first = p.fft_lr_grid if label == "fft" else p.lr_grid
        per_rate: dict[float, list[float]] = {}
        held = {block_key(read_json(f)) for f in (self.results / "tuning").glob(f"{label}-lr*-s*/block.json")}
        if len(held) > 1:  # two machines tuned it at once: its rates would be compared across blocks
            raise ValueError(f"{label}'s tuning runs come from {len(held)} seed blocks {sorted(map(str, held))}; its rates are "
                             f"compared inside one: keep one block's runs and move the others under set-aside/ with the reason")
        foreign = sorted(map(str, held - {block_key(block)})) if block is not None else []
        while not (table := label_table(first, per_rate, len(p.tune_seeds)))["complete"]:
            for lr in table["owed"]:
                for seed in p.tune_seeds[len(per_rate.get(lr, [])):]:
                    name = f"{label}-lr{rate_key(lr)}-s{seed}"
                    summary = self.tuning_run(label, lr, seed, name, block, may_run=not foreign)
                    if summary is None:
                        if foreign:
                            self.log(f"tuning {label}: begun in block {foreign}; this machine is {block_key(block)}: left for that block")
                        return label_table(first, per_rate, len(p.tune_seeds)) | ({"waiting_for_block": foreign} if foreign else {})
                    per_rate.setdefault(lr, []).append(validation_score(summary))
                    provenance[name] = summary.get("provenance")
        return table

    def tuning_run(self, label: str, lr: float, seed: int, name: str, block: dict[str, Any] | None,
                   may_run: bool = True) -> dict[str, Any] | None:
        """One tuning run's summary, run now unless kept already (None: not kept and not to be run here, or the time
        budget is used up)."""
        p = self.preset
        kept = self.results / "tuning" / name
        base = self.base(lr=lr, rounds=p.tune_rounds, eval_split="validation", tier_eval="off", rouge_size=None)
        cfg = run_label(label, seed, base, self.work / "tuning" / name)
        if not finished_as_asked(kept, cfg):
            if not may_run or self.out_of_time():
                return None
            self.wait_while_paused()
            t = time.perf_counter()
            execute(cfg, kept, block)
            self.log(f"tuning {name}: validation ppl {json.loads((kept / 'summary.json').read_text())['full_eval_ppl']:.2f} "
                     f"({time.perf_counter() - t:.0f}s)")
        return json.loads((kept / "summary.json").read_text())

    def tune_shared(self, block: dict[str, Any] | None = None) -> dict[str, Any]:
        """v3: the shared LoRA rate and FFT's own, chosen on the validation split (resumable)."""
        tuning_file = self.results / "tuning.json"
        p = self.preset
        scores: dict[str, dict[str, float]] = {}
        provenance: dict[str, Any] = {}
        plan = [(label, lr) for lr in p.lr_grid for label in TUNE_LORA_LABELS] + [("fft", lr) for lr in p.fft_lr_grid]
        for label, lr in plan:
            name = f"{label}-lr{lr:g}"
            kept = self.results / "tuning" / name
            base = self.base(lr=lr, rounds=p.tune_rounds, eval_split="validation", tier_eval="off")
            cfg = run_label(label, TUNE_SEED, base, self.work / "tuning" / name)
            if not finished_as_asked(kept, cfg):
                if self.out_of_time():
                    break
                self.wait_while_paused()
                t = time.perf_counter()
                execute(cfg, kept, block)
                self.log(f"tuning {name}: {time.perf_counter() - t:.0f}s")
            summary = json.loads((kept / "summary.json").read_text())
            scores.setdefault(label, {})[f"{lr:g}"] = summary["full_eval_ppl"]
            provenance[name] = summary.get("provenance")
        complete = all(f"{lr:g}" in scores.get(label, {}) for label, lr in plan)
        lora_scores = {f"{lr:g}": math.exp(statistics.fmean(math.log(scores[m][f"{lr:g}"]) for m in TUNE_LORA_LABELS))
                       for lr in p.lr_grid if all(f"{lr:g}" in scores.get(m, {}) for m in TUNE_LORA_LABELS)}
        fft_scores = scores.get("fft", {})
        out = {
            "split": "validation", "seed": TUNE_SEED, "rounds": p.tune_rounds, "complete": complete,
            "lora_grid": list(p.lr_grid), "fft_grid": list(p.fft_lr_grid), "scores": scores,
            "lora_score": "geometric mean of the validation perplexity of " + ", ".join(TUNE_LORA_LABELS),
            "lora_lr": float(min(lora_scores, key=lora_scores.get)) if lora_scores else None,
            "lora_scores": lora_scores,
            "fft_lr": float(min(fft_scores, key=fft_scores.get)) if fft_scores else None,
            "provenance": provenance,  # per tuning run: commit, device, library versions
        }
        self.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(tuning_file, out)
        return out

    # -------------------------------------------------------------- the runs
    def sections(self) -> list[tuple[str, tuple[int, ...], tuple[str, ...], dict[str, Any]]]:
        """(where, seeds, labels, config changes) in the order they run: the core set's first ten seeds, seed by
        seed, then the references and the long regime, then the core set's other seeds."""
        p = self.preset
        long = {"rounds": p.long_rounds} if p.long_rounds else {"local_steps": p.base["local_steps"] * p.long_steps_factor}
        first, rest = p.seeds[:FIRST_CORE_SEEDS], p.seeds[FIRST_CORE_SEEDS:]
        return [("runs", first, p.labels, {}), ("runs", p.reference_seeds, p.reference_labels, {}),
                ("long/runs", p.long_seeds, self.long_labels(), long), ("runs", rest, p.labels, {})]

    def config_check(self, where: str) -> Callable[[str, int, dict[str, Any]], str | None] | None:
        """v4: why a finished run's recorded settings are not the ones the plan asks of its label and seed (its tuned
        rate, the registered base, the section's changes), None when they are, for the report's :func:`load_runs`.
        A run of a label whose rate is not chosen yet is not checked (nothing to check it against); v3 is a record."""
        if self.preset.version < 4:
            return None
        tuning = read_json(self.results / "tuning.json") or {}
        changes = next(c for w, _, _, c in self.sections() if w == where)

        def problem(label: str, seed: int, saved: dict[str, Any]) -> str | None:
            if ((tuning.get("labels") or {}).get(label) or {}).get("chosen") is None:
                return None
            cfg = run_label(label, seed, self.base(lr=self.rate(tuning, label), **changes), self.work / where / f"{label}-s{seed}")
            return settings_problem(cfg, saved)
        return problem

    def label_configs(self) -> dict[str, RunConfig]:
        """Each core label's config as the study runs it (the registered base; seed and rate do not matter here): what
        the report asks a deployment constraint of (hetlora.study.constraints)."""
        return {label: run_label(label, 0, self.base(), self.work / "runs" / label) for label in self.preset.labels}

    def long_labels(self) -> tuple[str, ...]:
        """The long regime's labels; v4 adds the best new method once tuning has named it (tuning.json)."""
        p = self.preset
        if not p.long_best_of:
            return p.long_labels
        best = (read_json(self.results / "tuning.json") or {}).get("long_best_new")
        return p.long_labels + ((best,) if best else ())

    def seed_block(self, where: str, seed: int) -> tuple | None:
        """The block of a seed's finished runs in one pairing group (``runs`` or ``long/runs``), None when it has none."""
        keys = {block_key(json.loads(f.read_text())) for f in (self.results / where).glob(f"*-s{seed}/block.json")}
        if len(keys) > 1:
            raise ValueError(f"seed {seed} under {self.results / where} mixes seed blocks {sorted(map(str, keys))}; "
                             "remove the runs of the other block")
        return keys.pop() if keys else None

    def planned_labels(self, where: str, seed: int) -> list[str]:
        """The labels a seed owes in one pairing group, read off :meth:`sections` (the one account of what runs)."""
        return [label for w, seeds, labels, _ in self.sections() if w == where and seed in seeds for label in labels]

    def progress(self) -> dict[str, Any]:
        """What the study has finished and still owes, per section, and the hours left at its own pace on each block
        that made runs (median seconds per round of that block's finished runs; the per-run evaluation is spread over
        the rounds, so a 30-round run is overestimated): for planning the sittings that remain. A run counts as the
        report counts it (:meth:`config_check`). Not priced: tuning runs still owed, and, until tuning names it, the
        long regime's best new method (``tuning_complete`` says which)."""
        tuning = read_json(self.results / "tuning.json") or {}
        out: dict[str, Any] = {"tuning_complete": bool(tuning.get("complete")),
                               "tuning_runs": len(list((self.results / "tuning").glob("*/summary.json"))), "sections": {}}
        pace: dict[str, list[float]] = {}
        for where, seeds, labels, changes in self.sections():
            rounds = changes.get("rounds", self.preset.base["rounds"])
            check = self.config_check(where)
            entry = out["sections"].setdefault(where, {"finished": 0, "planned": 0, "rounds_owed": 0})
            for seed in seeds:
                for label in labels:
                    entry["planned"] += 1
                    kept = self.results / where / f"{label}-s{seed}"
                    summary = read_json(kept / "summary.json")
                    if summary is None or summary.get("rounds") != rounds or (check and check(label, seed, summary.get("config") or {})):
                        entry["rounds_owed"] += rounds
                        continue
                    entry["finished"] += 1
                    pace.setdefault(block_label(read_json(kept / "block.json") or {}), []).append(summary["seconds_total"] / rounds)
        owed = sum(e["rounds_owed"] for e in out["sections"].values())
        out["hours_left"] = {block: owed * statistics.median(v) / 3600 for block, v in pace.items()}
        return out

    def set_aside(self, seed: int, reason: str, where: str = "runs") -> Path:
        """Move an unfinished seed's runs out of the pairing, so a machine of another block can run the whole seed again.

        A seed belongs to the block of its first run (docs/algorithm.md §10); when no machine of that block can be had,
        the seed starts again in another block. Only an *unfinished* seed (one still owing a planned run) may be set
        aside, so the results can never choose which seeds count; its runs and the reason are kept under ``set-aside/``
        and the report lists them (not paired, counted in the compute spent).
        """
        if not reason.strip():
            raise ValueError("setting a seed aside needs a reason (--why)")
        source = self.results / where
        runs = sorted(d for d in source.glob(f"*-s{seed}") if (d / "summary.json").is_file())
        if not runs:
            raise ValueError(f"seed {seed} has no finished runs under {source}: nothing to set aside")
        missing = [label for label in self.planned_labels(where, seed) if not (source / f"{label}-s{seed}" / "summary.json").is_file()]
        if not missing:
            raise ValueError(f"seed {seed} under {source} is complete in its block; a complete seed is never set aside "
                             "(that would let results choose the seeds)")
        held = self.seed_block(where, seed)
        block = read_json(runs[0] / "block.json")
        target = self.move_aside(runs, f"{where.replace('/', '-')}-seed-{seed}", block, {
            "seed": seed, "where": where, "reason": reason.strip(), "missing_when_set_aside": missing})
        self.log(f"seed {seed} ({where}): {len(runs)} runs of block {held} set aside in {target}; {len(missing)} were still missing")
        return target

    def move_aside(self, runs: list[Path], name: str, block: dict | None, record: dict[str, Any]) -> Path:
        """Move finished runs of one block to ``set-aside/<name>-<behaviour>/`` with their record (once per block)."""
        target = self.results / "set-aside" / f"{name}-{(block or {}).get('behaviour', 'no-block')}"
        if target.exists():
            raise ValueError(f"{target} exists already: runs of one block are set aside once")
        target.mkdir(parents=True)
        for run in runs:
            shutil.move(str(run), str(target / run.name))
        write_json_atomic(target / "set-aside.json", record | {"block": block, "set_aside_at": utc_timestamp(),
                                                               "runs": [run.name for run in runs]})
        return target

    def set_aside_tuning(self, label: str, reason: str) -> Path:
        """Move an unfinished label's v4 tuning runs out of the way, so a machine of another block can tune it whole.

        A label's rates are compared inside one seed block, so one begun on a machine class that can no longer be had
        would hold every core run back. As for a seed (:meth:`set_aside`), only an *unfinished* label (one still owing
        a tuning run) may be set aside, so results never choose which tuning counts; its runs and the reason are kept
        under ``set-aside/`` and the report lists them.
        """
        if not reason.strip():
            raise ValueError("setting a label's tuning aside needs a reason (--why)")
        p = self.preset
        if p.version < 4 or label not in p.labels:
            raise ValueError(f"{label!r} is not a label tuned by preset {self.preset_name!r}")
        runs = sorted(d for d in (self.results / "tuning").glob(f"{label}-lr*-s*") if (d / "summary.json").is_file())
        if not runs:
            raise ValueError(f"{label} has no finished tuning runs under {self.results / 'tuning'}: nothing to set aside")
        per_rate: dict[float, list[float]] = {}
        for run in runs:
            summary = json.loads((run / "summary.json").read_text())
            per_rate.setdefault(float(summary["config"]["lr"]), []).append(validation_score(summary))
        if label_table(p.fft_lr_grid if label == "fft" else p.lr_grid, per_rate, len(p.tune_seeds))["complete"]:
            raise ValueError(f"{label}'s tuning is complete; a complete label is never set aside (that would let results "
                             "choose its rate)")
        target = self.move_aside(runs, f"tuning-{label}", read_json(runs[0] / "block.json"),
                                 {"label": label, "where": "tuning", "seed": None, "reason": reason.strip()})
        self.log(f"tuning of {label}: {len(runs)} runs set aside in {target}")
        return target

    def fingerprint_labels(self) -> tuple[str, ...]:
        """What this study's block fingerprint runs: hetlora and fft for the registered v3 and v4 (their blocks were
        made so); every label of the study (core, references, long regime) from version 5 on."""
        p = self.preset
        if p.version < 5:
            return FINGERPRINT_LABELS
        return tuple(dict.fromkeys(("hetlora",) + p.labels + p.reference_labels + p.long_labels + p.long_best_of))

    def run_all(self) -> None:
        if self.preset.superseded:
            raise ValueError(f"preset {self.preset_name!r} is a record, not run again: {self.preset.superseded} (--report-only rebuilds its report)")
        self.plan()
        block = machine_block(self.preset.base["precision"], self.base().device, self.work,
                              self.fingerprint_labels())
        self.log(f"seed block here: {block['device_class']}, {block['precision']}, behaviour {block['behaviour']}")
        tuning = self.tune(block)
        if not tuning["complete"]:
            self.log("time budget used up during tuning; run the study again to continue")
            return
        for where, seeds, labels, changes in self.sections():
            for seed in seeds:  # seed-major: a partial study still pairs every method on the seeds it has
                held = self.seed_block(where, seed)
                if held is not None and held != block_key(block):
                    self.log(f"seed {seed} ({where}) was run in block {held}; this machine is {block_key(block)}: not mixing")
                    continue
                for label in labels:
                    if not self.run_one(where, label, seed, tuning, changes, block):
                        return

    def run_one(self, where: str, label: str, seed: int, tuning: dict, changes: dict, block: dict) -> bool:
        """Run one (label, seed) unless it is kept already; False when the time budget is used up."""
        kept = self.results / where / f"{label}-s{seed}"
        lr = self.rate(tuning, label)
        cfg = run_label(label, seed, self.base(lr=lr, **changes), self.work / where / f"{label}-s{seed}")
        if finished_as_asked(kept, cfg):
            return True
        if self.out_of_time():
            self.log("time budget used up; run the study again to continue")
            return False
        self.wait_while_paused()
        t = time.perf_counter()
        s = execute(cfg, kept, block)
        self.log(f"{label:>16} seed {seed} ({where}): test ppl {s['full_eval_ppl']:.2f} ({time.perf_counter() - t:.0f}s)")
        return True
