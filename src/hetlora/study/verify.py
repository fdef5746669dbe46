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
from .runs import Study, execute, machine_block, run_label, utc_timestamp

#: what is compared, round by round and in the summary (timings and memory are the machine's, not the run's)
ROUND_FIELDS = ("clients", "ranks", "train_loss", "eval_loss", "eval_ppl", "full_eval_ppl", "tier_eval_ppl", "bytes_up", "bytes_down",
                "live_rank", "rank_energy", "rouge_l")
SUMMARY_FIELDS = ("initial_eval_ppl", "final_eval_ppl", "full_eval_ppl", "best_eval_ppl", "final_tier_eval_ppl", "final_rouge_l",
                  "final_ranks", "pruning_events", "bytes_up_total", "bytes_down_total", "rejected_rounds")


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
        if not same(old_sum.get(key), new_sum.get(key)):
            out.append(f"{key}: {old_sum.get(key)!r} kept, {new_sum.get(key)!r} now")
    return out


def same(a: Any, b: Any) -> bool:
    """Exact equality, nested, with NaN equal to NaN (a diverged run reproduces as diverged)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def verify_run(study: Study, label: str, seed: int, where: str = "runs", block: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-run ``label`` seed ``seed`` (kept under ``<results>/<where>/``) in a scratch directory of the study's work
    directory and compare it with the kept run. ``block``: this machine's (measured here when None)."""
    changes = next((c for w, _, _, c in study.sections() if w == where), None)
    if changes is None:
        raise ValueError(f"{where!r} is not a section of preset {study.preset_name!r}: {', '.join(dict.fromkeys(w for w, *_ in study.sections()))}")
    kept = study.results / where / f"{label}-s{seed}"
    if not (kept / "summary.json").is_file():
        raise ValueError(f"no finished run {kept}: nothing to reproduce")
    tuning = read_json(study.results / "tuning.json") or {}
    kept_block = read_json(kept / "block.json")
    block = block or machine_block(study.preset.base["precision"], study.base().device, study.work, study.fingerprint_labels())
    if block_key(block) != block_key(kept_block):
        raise ValueError(f"{kept.name} was made in block {block_label(kept_block or {})}; this machine is {block_label(block)}: "
                         "only a machine of the run's own block is expected to give the same numbers")
    scratch = study.work / "verify" / where / f"{label}-s{seed}"
    shutil.rmtree(scratch, ignore_errors=True)
    cfg = run_label(label, seed, study.base(lr=study.rate(tuning, label), **changes), scratch / "work")
    problem = (study.config_check(where) or (lambda *_: None))(label, seed, json.loads((kept / "summary.json").read_text())["config"])
    if problem:
        raise ValueError(f"{kept.name}: {problem}; the plan's run would not be this one")
    execute(cfg, scratch / "result")
    found = differences(kept, scratch / "result")
    shutil.rmtree(scratch, ignore_errors=True)
    result = {"run": f"{where}/{kept.name}", "block": block_label(block), "identical": not found, "differences": found}
    record = study.results / "verified" / f"{where.replace('/', '-')}-{kept.name}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, result | {"checked_at": utc_timestamp(), "provenance": environment(study.base().device),
                                        "kept_provenance": json.loads((kept / "summary.json").read_text()).get("provenance")})
    return result | {"record": str(record)}
