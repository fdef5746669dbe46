"""The in-process engine: the round loop, checkpoints and outputs of ``hetlora run``.

A run directory is the unit of truth: it holds the run's settings (``config.json``), its
metrics, checkpoints and outputs, and it is the directory given that is written — never a
path recorded inside it. A run holds an exclusive lock on its directory while it lives.
Every random choice is a pure function of (seed, round, client), so a run resumed from
its last checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .checkpoint import load_latest, round_dirs, save_checkpoint
from ..files import sha256, write_json_atomic
from ..config import NUMBER_NEUTRAL, RunConfig, from_mapping
from ..core.adapter import ClientUpdate
from . import round_report
from .federation import Federation
from ..device.memory import rss_mb
from .outputs import append_metrics, read_metrics, save_adapter, save_base_delta, truncate_metrics, write_summary
from .plots import plot_run
from .privacy import epsilon
from ..provenance import provenance

log = logging.getLogger(__name__)

RoundHook = Callable[[int, list[ClientUpdate]], list[ClientUpdate]]
LOCK = ".hetlora.lock"


# ---------------------------------------------------------------------------------- the run directory
def check_writable(out: Path) -> None:
    """``out`` must be a directory we can create and write (one line if not)."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out}: {parent} is not writable")
            return


@contextmanager
def run_lock(out: Path, name: str = LOCK) -> Iterator[None]:
    """An exclusive lock on the run directory for as long as the run lives (fcntl, released on exit or crash); ``name``:
    another lock file of the directory (a Flower simulation holds its own around the run's, which it takes inside)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise ValueError(f"{out} is in use by another hetlora run (pid {owner}); wait for it or choose another --out") from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_settings(out: Path, doing: str) -> dict[str, Any]:
    """The raw settings in a run directory's config.json; ``doing`` (e.g. "--resume") starts each error."""
    path = out / "config.json"
    if not out.is_dir():
        raise ValueError(f"{doing}: {out} does not exist")
    if not path.is_file():
        raise ValueError(f"{doing}: {out} holds no run (no config.json)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{doing}: {path} is not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{doing}: {path} does not hold a JSON object of settings")
    values.pop("out", None)
    values.pop(RECORD, None)
    return values


RECORD = "_run"  # config.json's record of the run itself (not a setting): id, data file hash, rounds asked over time


def run_record(out: Path) -> dict[str, Any]:
    """The run's own record in config.json (empty for a run written before it existed)."""
    try:
        record = json.loads((out / "config.json").read_text()).get(RECORD, {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


def data_sha256(cfg: RunConfig) -> str | None:
    """The SHA-256 of a user data file (None for the packaged chitchat)."""
    return sha256(Path(cfg.data)) if cfg.data != "chitchat" and Path(cfg.data).is_file() else None


def budgets_sha256(cfg: RunConfig) -> str | None:
    """The SHA-256 of the memory budgets file (None without one): a resumed run must fit the same ranks."""
    return sha256(Path(cfg.memory_budgets)) if cfg.memory_budgets and Path(cfg.memory_budgets).is_file() else None


def delays_sha256(cfg: RunConfig) -> str | None:
    """The SHA-256 of a client delay table (None without one): a resumed run must close its rounds the same way."""
    return sha256(Path(cfg.client_delay)) if cfg.client_delay and Path(cfg.client_delay).is_file() else None


def input_files(cfg: RunConfig) -> dict[str, str | None]:
    """The run record's hashes of the files a run reads besides its settings (data, memory budgets, delays)."""
    return {"data_sha256": data_sha256(cfg), "memory_budgets_sha256": budgets_sha256(cfg),
            "client_delay_sha256": delays_sha256(cfg)}


def write_config(out: Path, cfg: RunConfig, record: Mapping[str, Any]) -> None:
    write_json_atomic(out / "config.json", cfg.settings() | {RECORD: dict(record)})


def rounds_done(out: Path) -> int:
    """Finished rounds in metrics.jsonl; a line torn by a crash (the last one) is not a finished round."""
    return len(read_metrics(out, torn_tail=True))


def saved_config(out: Path) -> RunConfig:
    """The settings a run directory was started with (its own directory as ``out``)."""
    return from_mapping(run_settings(out, "--resume"), RunConfig(out=str(out)), none_is_value=True)


def resume_config(out: Path, given: Mapping[str, Any] | None = None) -> RunConfig:
    """The saved config of the run in ``out``; only ``rounds`` may be raised.

    ``given``: the settings the user set now; every one that differs from the saved one is
    listed (old → new) and refused.
    """
    saved = saved_config(out)
    asked = dict(given or {})
    asked.pop("out", None)
    rounds = asked.pop("rounds", None)
    for k in NUMBER_NEUTRAL:  # memory and speed only: a resumed run may change them
        if k in asked:
            setattr(saved, k, asked.pop(k))
    changed = [f"{k}: {getattr(saved, k)!r} → {v!r}" for k, v in asked.items() if getattr(saved, k) != v]
    if changed:
        raise ValueError("--resume keeps the run's settings; these differ from the saved run: " + "; ".join(changed)
                         + " (only --rounds may be raised)")
    if rounds is not None:
        done = rounds_done(out)
        if rounds < max(saved.rounds, done):
            raise ValueError(f"--resume: --rounds {rounds} is below the {max(done, saved.rounds)} round(s) of the saved run "
                             f"({done} finished); rounds can only be raised")
        saved.rounds = rounds
    record = run_record(out)
    for key, current in input_files(saved).items():
        recorded = record.get(key)
        if recorded and current != recorded:
            name = {"data_sha256": f"data file {saved.data}", "memory_budgets_sha256": f"memory budgets file {saved.memory_budgets}",
                    "client_delay_sha256": f"client delay table {saved.client_delay}"}[key]
            raise ValueError(f"--resume: the {name} is not the one this run started with "
                             f"(SHA-256 {current or 'missing'}, recorded {recorded})")
    try:
        return saved.validate()
    except ValueError as err:  # settings a later rule refuses (an option its method never honoured): say so
        raise ValueError(f"--resume: the saved settings of {out} are refused now ({err}); they were accepted when the run "
                         "started, but this version refuses them: start a new run with settings it accepts") from None


def finished_as_asked(summary_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``summary_dir`` holds a finished run of exactly ``cfg`` (``compare`` and the study reuse it then).

    A finished run of other settings is refused, naming them (old → new): reusing it would report
    numbers of an experiment other than the one asked for.
    """
    path = summary_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    saved = summary.get("config") or {}
    asked = cfg.decisive_settings()
    changed = [f"{k}: {saved.get(k)!r} → {v!r}" for k, v in asked.items() if k != "rounds" and saved.get(k) != v]
    if changed:
        raise ValueError(f"{summary_dir} holds a finished run of other settings ({'; '.join(changed)}); "
                         "remove it or choose another directory")
    return summary.get("rounds") == cfg.rounds


def check_resumable(cfg: RunConfig) -> None:
    """``cfg`` may continue the run in ``cfg.out``: the same settings but ``rounds``, which may only grow.

    Every engine resumes through here (the CLI, ``hetlora run --engine flower`` and ``flwr run``'s
    ServerApp), so a changed setting is refused the same way everywhere.
    """
    resume_config(Path(cfg.out), given=cfg.settings())


def has_finished_round(out: Path) -> bool:
    return rounds_done(out) > 0 or bool(round_dirs(out / "checkpoint"))


def prepare_out(cfg: RunConfig, resume: bool) -> Path:
    """Create ``--out``; refuse to overwrite a run with a finished round unless resuming (then with the same settings).

    A directory whose run failed before finishing a round (a bad flag or data found after set-up) is
    started again in place. An extension (more rounds) is recorded in config.json.
    """
    out = Path(cfg.out)
    if resume:
        check_resumable(cfg)
        record = run_record(out)
        history = record.get("rounds_history") or [saved_config(out).rounds]
        if cfg.rounds != history[-1]:
            write_config(out, cfg, record | {"rounds_history": history + [cfg.rounds]})
        return out
    if has_finished_round(out):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    if (out / "config.json").exists():
        log.warning("%s holds a run that finished no round; starting it again in place", out)
        for name in ("config.json", "summary.json", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg, {"id": uuid.uuid4().hex, **input_files(cfg), "rounds_history": [cfg.rounds]})
    return out


# ---------------------------------------------------------------------------------- progress
class Progress:
    """Rich progress bars over rounds and clients; silent when disabled."""

    def __init__(self, enabled: bool, rounds: int, start: int):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.bar.start()
            self.rounds = self.bar.add_task("rounds", total=rounds, completed=start)
            self.clients = self.bar.add_task("clients", total=1)

    def round_started(self, t: int, n: int) -> None:
        if self.enabled:
            self.bar.reset(self.clients, total=n, description=f"round {t + 1} clients")

    def client_done(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.advance(self.clients, n)

    def round_done(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.bar.advance(self.rounds)
            self.bar.console.print(
                f"round {row['round']}: eval ppl {row['eval_ppl']:.2f}  train loss {row.get('train_loss') or float('nan'):.3f}  "
                f"ranks {sorted(row.get('ranks', {}).values())}  live rank {row.get('live_rank', '-')}  "
                f"dropped {row.get('dropped_count', len(row.get('dropped', [])))}"
                + (f"  REJECTED: {row['rejected']}" if row.get("rejected") else "")
            )

    def stop(self) -> None:
        if self.enabled:
            self.bar.stop()


def print_plan(fed: Federation) -> None:
    from rich.console import Console

    cfg = fed.cfg
    ranks = sorted(fed.assigned.values())
    Console().print(
        f"[bold]hetlora[/bold] {cfg.method} on [cyan]{cfg.model}[/cyan] + [cyan]{fed.data.name}[/cyan]: "
        f"{len(fed.client_ids)} clients, {cfg.clients_per_round} per round, {cfg.rounds} rounds × {cfg.local_steps} local steps "
        f"(batch {cfg.batch_size}, max length {cfg.max_length}, lr {cfg.lr}, {fed.host.precision} on {fed.host.device}, "
        f"{fed.parallel_clients} client(s) at a time)\n"
        f"  ranks {cfg.rank_dist} in [{min(ranks) if ranks else '-'}, {max(ranks) if ranks else '-'}] (global rank {cfg.global_rank}), "
        f"prune={cfg.prunes}, norm_bound={cfg.norm_bound}, dp={'off' if cfg.dp_clip is None else f'C={cfg.dp_clip}, σ={cfg.noise_multiplier}'}, "
        f"eval on {len(fed.data.eval_examples(cfg.eval_split, cfg.eval_size))} held-out {cfg.eval_split} examples"
        + (f" (finally {cfg.final_eval_size})" if cfg.final_eval_size else "") + f", seed {cfg.seed}\n  writing to {cfg.out}"
        + "".join(f"\n  [yellow]left out[/yellow] {c}: {why}" for c, why in sorted(fed.left_out.items()))
    )


# ---------------------------------------------------------------------------------- rounds
def local_round(fed: Federation, t: int, progress: Progress, hook: RoundHook | None = None) -> dict[str, Any]:
    """The in-process engine's round: open (sample, order by simulated reply time), train the clients here
    (K at a time), complete. The updates reach the server as each chunk finishes (a weighted-sum method folds
    them in as they come; §7.2); under over-selection no more clients train than the round can still take (§7.3)."""
    opening = fed.open_round(t)
    progress.round_started(t, len(opening.asked))
    jobs, bytes_down = fed.round_jobs(opening)  # each payload made once: counted here, trained below
    failed = opening.late_failures()  # filled further while the updates are taken
    updates = _trained(fed, jobs, failed, progress, opening.close)
    if hook is not None:  # a test's hook sees the whole list: under over-selection every asked client then trains
        updates = hook(t, list(updates))
    return fed.complete_round(t, updates, failed, opening) | {"bytes_down": bytes_down}


def _trained(fed: Federation, jobs: dict, failed: list[tuple[str, str]], progress: Progress, close):
    """Chunks of ``fed.parallel_clients`` jobs (in reply order) trained together, no more than ``close`` still
    wants, each chunk's updates yielded; a chunk that crashes is trained one by one, so only a crashing client is
    dropped (into ``failed``) and the round goes on."""
    pending = list(jobs.values())
    while pending and not close.full:
        k = min(fed.parallel_clients, close.missing or fed.parallel_clients)
        chunk, pending = pending[:k], pending[k:]
        try:
            yield from _chunk_trained(fed, chunk, failed)
        finally:  # also when the round stops reading (it has its K)
            progress.client_done(len(chunk))


def _chunk_trained(fed: Federation, chunk: list, failed: list[tuple[str, str]]):
    """One chunk's updates; if training it together crashes, each client alone, a crashing one into ``failed``."""
    try:
        yield from fed.train(chunk)
    except Exception:
        for job in chunk:
            try:
                yield from fed.train([job])
            except Exception as err:
                log.exception("client %s failed", job.client_id)
                failed.append((job.client_id, f"client failed: {err.__class__.__name__}: {err}"))


RoundFn = Callable[[Federation, int, Progress, "RoundHook | None"], dict[str, Any]]


def evaluate_round(fed: Federation, t: int, round_row: Mapping[str, Any]) -> dict[str, Any]:
    """Held-out evaluation after round t (tiers as configured), rank health and the DP budget spent.

    An aggregate after which the held-out loss is not finite is rejected: the previous global
    model is restored and evaluated, and the row says why (the run then exits non-zero).
    """
    final = t + 1 == fed.cfg.rounds
    with_tiers = fed.cfg.tier_eval == "every" or (final and fed.cfg.tier_eval == "final")
    row = round_report.eval_metrics(fed, with_tiers=with_tiers, final=final)
    if not math.isfinite(row["eval_loss"]) and fed.roll_back():
        reason = f"the held-out loss after aggregating was {row['eval_loss']}; the previous global model is kept"
        log.error("round %d: %s", t + 1, reason)
        row = round_report.eval_metrics(fed, with_tiers=with_tiers, final=final) | round_report.rank_metrics(fed)
        row |= {"rejected": reason, "aggregated": False, "ranks": {c: fed.ranks[c] for c in round_row.get("ranks", {})}}
    if fed.cfg.dp_clip is not None:
        eps = epsilon(fed.cfg.noise_multiplier, fed.cfg.clients_per_round, len(fed.client_ids), t + 1, fed.cfg.dp_delta)
        row["dp_epsilon"] = eps if math.isfinite(eps) else None  # no noise: no finite ε (JSON has no Infinity)
        row["dp_delta"] = fed.cfg.dp_delta
    return row


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    federation: Federation | None = None,
    hook: RoundHook | None = None,
    round_fn: RoundFn = local_round,
) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the summary.

    ``round_fn`` gathers one round's updates and completes it: in this process by
    default, or over Flower (hetlora.flower). Evaluation, metrics and checkpoints
    are the same for every engine.
    """
    cfg = cfg.validate()
    if cfg.secure_aggregation and round_fn is local_round:
        raise ValueError("secure aggregation runs on Flower's SecAgg+ (--engine flower, or a deployment): "
                         "the in-process engine has one process and nothing to hide the updates from")
    out = Path(cfg.out)
    check_writable(out)
    with run_lock(out):
        prepare_out(cfg, resume)
        fed = federation or Federation(cfg)
        if progress:
            print_plan(fed)
        if cfg.dp_clip is not None:
            log.warning("DP mode: sparsity weighting is off; clipped updates are averaged with uniform weights")
        run_id = run_record(out).get("id")
        summary = restore_or_start(fed, out, resume, run_id)
        run_rounds(fed, out, run_id, Progress(progress, cfg.rounds, fed.round), round_fn, hook)
        return finish(fed, out, summary)


def restore_or_start(fed: Federation, out: Path, resume: bool, run_id: str | None) -> dict[str, Any]:
    """Load the last checkpoint of a resumed run (metrics cut back to it), else start clean; the summary so
    far, with the base model's held-out loss measured once (B = 0: every truncation is the base model)."""
    restored = load_latest(out / "checkpoint", ("global",), Federation.CHECKPOINT_GROUPS, run_id=run_id) if resume else None
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    if restored is not None:
        round_done, tensors, state = restored
        fed.restore(tensors, state)
        truncate_metrics(out, round_done)
    else:
        truncate_metrics(out, 0)
    if "initial_eval_ppl" not in summary:
        base = round_report.eval_metrics(fed, with_tiers=False)
        summary = {"initial_eval_loss": base["eval_loss"], "initial_eval_ppl": base["eval_ppl"]}
        write_summary(out, summary)
    return summary


def run_rounds(fed: Federation, out: Path, run_id: str | None, bar: "Progress", round_fn: RoundFn, hook: RoundHook | None) -> None:
    """The remaining rounds: each gathered by ``round_fn``, evaluated, written to metrics.jsonl and checkpointed."""
    cfg = fed.cfg
    try:
        for t in range(fed.round, cfg.rounds):
            started = time.perf_counter()
            row = round_fn(fed, t, bar, hook)
            row.update(evaluate_round(fed, t, row))
            row["seconds"] = time.perf_counter() - started
            row["server_rss_mb"] = rss_mb()
            row["precision"] = fed.host.precision
            row = fed.released(row)
            append_metrics(out, row)
            save_checkpoint(out / "checkpoint", fed.round, fed.state_tensors(), fed.state_json() | {"config": cfg.settings()},
                            run_id=run_id)
            bar.round_done(row)
    finally:
        bar.stop()


def finish(fed: Federation, out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the final adapter, plots and summary.json from metrics.jsonl."""
    cfg = fed.cfg
    rows = read_metrics(out)
    if fed.kind.has_adapter:
        adapter_dir = out / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_adapter(adapter_dir, fed.state["global"], cfg.global_rank, cfg.lora_scale, cfg.target_modules, cfg.model)
    save_base_delta(out, fed.state.get("base_delta") or {})
    plot_run(rows, out / "plots", summary.get("initial_eval_ppl"))
    summary.update(run_summary(fed, rows) | {"provenance": provenance(fed.host)})
    write_summary(out, summary)
    return summary


def run_summary(fed: Federation, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What summary.json says of a finished run: its settings, evaluation, rank health, cost and participation."""
    return {"config": fed.cfg.settings(), "method": fed.cfg.method, "rounds": len(rows),
            "rounds_aggregated": sum(1 for r in rows if r.get("aggregated")),
            "rejected_rounds": [r["round"] for r in rows if r.get("rejected")],
            "clients": len(fed.client_ids), "left_out": fed.left_out, "refused_claims": fed.refused_claims} | \
        evaluation_summary(rows) | cost_summary(fed, rows) | participation_summary(fed, rows)


def evaluation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The final and best held-out perplexity, the tiers', and the global adapter's rank health at the end."""
    last = rows[-1] if rows else {}
    ppls = [r["eval_ppl"] for r in rows]
    return {"final_eval_loss": last.get("eval_loss"), "final_eval_ppl": ppls[-1] if ppls else None,
            "best_eval_ppl": min(ppls) if ppls else None, "final_tier_eval_ppl": last.get("tier_eval_ppl", {}),
            "full_eval_ppl": last.get("full_eval_ppl"), "full_eval_size": last.get("full_eval_size"),
            "final_rouge_l": last.get("rouge_l"), "rouge_size": last.get("rouge_size"),
            "final_live_rank": last.get("live_rank"), "final_trainable_rank": last.get("trainable_rank")}


def cost_summary(fed: Federation, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes, trainable parameters and time (under DP the time follows the secret sample and is withheld)."""
    return {"bytes_up_total": sum(r["bytes_up"] for r in rows), "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "trainable_params": fed.trainable_params(),
            "seconds_total": None if fed.privacy else sum(r["seconds"] for r in rows),
            "precision": fed.host.precision, "parallel_clients": fed.parallel_clients}


def participation_summary(fed: Federation, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final ranks, drops, visits and pruning events (the server's own account, never a client's)."""
    return {"final_ranks": dict(sorted(fed.ranks.items())) if len(fed.ranks) <= 2000 else None,
            "dropped_total": sum(len(r["dropped"]) for r in rows), "visits": visits(rows),
            "pruning_events": sum(1 for r in rows for c, r_in in r.get("client_ranks_in", {}).items()
                                  if r_in is not None and r["ranks"].get(c, r_in) < r_in)}


def visits(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many rounds each client was trained in (and aggregated)."""
    out: dict[str, int] = {}
    for r in rows:
        for c in r.get("clients", []):
            out[c] = out.get(c, 0) + 1
    return dict(sorted(out.items()))


