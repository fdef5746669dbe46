"""Run one kept study run again and say whether it comes out the same (docs/algorithm.md §10, "Reproducing a run").

A reader who doubts a committed number can re-run that run from this checkout: the settings are the ones the plan asks
of its label and seed (the tuned rate, the registered base, the section's changes: what the study itself would run),
and the comparison is exact — every round's training loss, held-out loss and perplexity, bytes and live rank, and the
summary's final figures (test perplexity, tier perplexities, upload, ROUGE-L). Only a machine of the run's own seed
block (device class, resolved precision, training behaviour) is expected to give the same bits; another is refused
before anything runs, naming both blocks, since its numbers differ by design (docs/algorithm.md §10, seed blocks).
Each check is recorded under ``<results>/verified/`` (when, on which machine and commit, against which kept run).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..files import write_json_atomic
from ..provenance import environment
from ..server.outputs import read_metrics
from .claims import block_key
from .report import block_label, read_json
from .runs import Study, execute, machine_block, run_label, settings_problem, utc_timestamp

#: what is compared, round by round and in the summary (timings and memory are the machine's, not the run's)
ROUND_FIELDS = ("clients", "ranks", "client_ranks_in", "aggregated", "dropped", "train_loss", "eval_loss", "eval_ppl", "full_eval_ppl",
                "tier_eval_ppl", "bytes_up", "bytes_down", "live_rank", "trainable_rank", "rank_energy", "rouge_l")
SUMMARY_FIELDS = ("initial_eval_ppl", "final_eval_ppl", "full_eval_ppl", "best_eval_ppl", "final_tier_eval_ppl", "final_rouge_l",
                  "final_ranks", "final_live_rank", "final_trainable_rank", "pruning_events", "rounds_aggregated", "visits",
                  "bytes_up_total", "bytes_down_total", "rejected_rounds")


def differences(kept: Path, fresh: Path) -> list[str]:
    """Each figure in which the fresh run differs from the kept one (empty: the same numbers)."""
    out = []
    old_rows, new_rows = read_metrics(kept), read_metrics(fresh)
    if len(old_rows) != len(new_rows):
        out.append(f"rounds: {len(old_rows)} kept, {len(new_rows)} now")
    for old, new in zip(old_rows, new_rows):
        for key in ROUND_FIELDS:
            if not same(old.get(key), new.get(key)):
                out.append(f"round {old.get('round')} {key}: {old.get(key)!r} kept, {new.get(key)!r} now")
    old_sum, new_sum = (json.loads((d / "summary.json").read_text()) for d in (kept, fresh))
    for key in SUMMARY_FIELDS:
        if key not in old_sum or key not in new_sum:  # a renamed or dropped field is said, never read as equal
            out.append(f"{key}: {'absent' if key not in old_sum else 'present'} in the kept summary, "
                       f"{'absent' if key not in new_sum else 'present'} now")
        elif not same(old_sum[key], new_sum[key]):
            out.append(f"{key}: {old_sum[key]!r} kept, {new_sum[key]!r} now")
    return out


def same(a: Any, b: Any) -> bool:
    """Exact equality, nested, with NaN equal to NaN (a diverged run reproduces as diverged)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def verify_run(study: Study, label: str, seed: int, where: str = "runs", block: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-run ``label`` seed ``seed`` (kept under ``<results>/<where>/``) in a scratch directory of the study's work
    directory and compare it with the kept run. ``block``: this machine's (measured here when None, after every check
    that needs no run: measuring it trains a tiny round of each fingerprint label)."""
    kept, cfg = planned_run(study, label, seed, where)
    kept_block = read_json(kept / "block.json")
    block = block or machine_block(study.preset.base["precision"], study.base().device, study.work, study.fingerprint_labels())
    if block_key(block) != block_key(kept_block):
        raise ValueError(f"{kept.name} was made in block {block_label(kept_block or {})}; this machine is {block_label(block)}: "
                         "only a machine of the run's own block is expected to give the same numbers")
    scratch = Path(cfg.out).parent
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        execute(cfg, scratch / "result")  # cfg.out is scratch / "work" (planned_run)
        found = differences(kept, scratch / "result")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"run": f"{where}/{kept.name}", "block": block_label(block), "identical": not found, "differences": found}
    return result | {"record": str(record_check(study, kept, where, result))}


def planned_run(study: Study, label: str, seed: int, where: str) -> tuple[Path, Any]:
    """The kept run and the config the plan asks of it, or a clear refusal (no section, no run, no tuned rate, a
    record preset, or recorded settings that are not the plan's): all before anything is trained."""
    if study.preset.superseded:
        raise ValueError(f"preset {study.preset_name!r} is a record, not run again: {study.preset.superseded}")
    changes = next((c for w, _, _, c in study.sections() if w == where), None)
    if changes is None:
        raise ValueError(f"{where!r} is not a section of preset {study.preset_name!r}: {', '.join(dict.fromkeys(w for w, *_ in study.sections()))}")
    kept = study.results / where / f"{label}-s{seed}"
    if not (kept / "summary.json").is_file():
        raise ValueError(f"no finished run {kept}: nothing to reproduce")
    try:
        lr = study.rate(read_json(study.results / "tuning.json") or {}, label)
    except (KeyError, TypeError):
        raise ValueError(f"no tuned learning rate for {label} in {study.results / 'tuning.json'}: the plan's run is not known") from None
    cfg = run_label(label, seed, study.base(lr=lr, **changes), study.work / "verify" / where / f"{label}-s{seed}" / "work")
    problem = settings_problem(cfg, json.loads((kept / "summary.json").read_text())["config"])
    if problem:
        raise ValueError(f"{kept.name}: {problem}; the plan's run would not be this one")
    return kept, cfg


def record_check(study: Study, kept: Path, where: str, result: dict[str, Any]) -> Path:
    """Append this check to the run's record under ``<results>/verified/`` (every check kept, newest last)."""
    record = study.results / "verified" / f"{where.replace('/', '-')}-{kept.name}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    earlier = (read_json(record) or {}).get("checks", [])
    check = result | {"checked_at": utc_timestamp(), "provenance": environment(study.base().device),
                      "kept_provenance": json.loads((kept / "summary.json").read_text()).get("provenance")}
    write_json_atomic(record, {"run": result["run"], "checks": earlier + [check]})
    return record
