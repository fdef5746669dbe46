"""The in-process engine: the round loop, checkpoints and outputs of ``hetlora run``.

Every random choice is a pure function of (seed, round, client), so a run resumed from
its last checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .checkpoint import load_latest, save_checkpoint
from .config import RunConfig, from_mapping
from .core.adapter import ClientUpdate
from .federation import Federation
from .memory import rss_mb
from .outputs import append_metrics, read_metrics, save_adapter, truncate_metrics, write_summary
from .plots import plot_run
from .privacy import epsilon

log = logging.getLogger(__name__)

RoundHook = Callable[[int, list[ClientUpdate]], list[ClientUpdate]]


def prepare_out(cfg: RunConfig, resume: bool) -> Path:
    """Create ``--out``; refuse to overwrite a finished or started run unless resuming."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if resume:
        if not saved.is_file():
            raise ValueError(f"--resume: {out} holds no run (no config.json)")
        return out
    if (out / "checkpoint").exists() or (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    return out


def resume_config(out: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The saved config of a run, with only ``rounds`` allowed to change."""
    saved = from_mapping(json.loads((out / "config.json").read_text()))
    for key, value in (overrides or {}).items():
        if key == "rounds":
            saved.rounds = value
        elif getattr(saved, key) != value:
            raise ValueError(f"--resume: {key} differs from the saved run ({getattr(saved, key)!r} vs {value!r})")
    return saved


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

    def client_done(self) -> None:
        if self.enabled:
            self.bar.advance(self.clients)

    def round_done(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.bar.advance(self.rounds)
            self.bar.console.print(
                f"round {row['round']}: eval ppl {row['eval_ppl']:.2f}  train loss {row['train_loss'] or float('nan'):.3f}  "
                f"ranks {sorted(row['ranks'].values())}  dropped {len(row['dropped'])}"
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
        f"(batch {cfg.batch_size}, max length {cfg.max_length}, lr {cfg.lr})\n"
        f"  ranks {cfg.rank_dist} in [{min(ranks) if ranks else '-'}, {max(ranks) if ranks else '-'}] (global rank {cfg.global_rank}), "
        f"prune={cfg.prunes}, norm_bound={cfg.norm_bound}, dp={'off' if cfg.dp_clip is None else f'C={cfg.dp_clip}, σ={cfg.dp_noise}'}, "
        f"eval on {len(fed.data.eval_examples())} held-out examples, seed {cfg.seed}\n  writing to {cfg.out}"
    )


def local_round(fed: Federation, t: int, progress: Progress, hook: RoundHook | None = None) -> dict[str, Any]:
    """The in-process engine's round: sample, send, train each client here, complete."""
    sampled = fed.sample(t)
    progress.round_started(t, len(sampled))
    updates, failed, bytes_down = [], [], 0
    for cid in sampled:
        job = fed.job(cid, t)
        bytes_down += fed.download_bytes(job)
        try:
            updates.append(fed.train(job))
        except Exception as err:  # a crashing client is dropped, the round goes on
            log.exception("client %s failed", cid)
            failed.append((cid, f"client failed: {err.__class__.__name__}: {err}"))
        progress.client_done()
    if hook is not None:
        updates = hook(t, updates)
    return fed.complete_round(t, updates, failed) | {"bytes_down": bytes_down}


RoundFn = Callable[[Federation, int, Progress, "RoundHook | None"], dict[str, Any]]


def evaluate_round(fed: Federation, t: int) -> dict[str, Any]:
    """Held-out evaluation after round t (tiers as configured) and the DP budget spent."""
    final = t + 1 == fed.cfg.rounds
    row = fed.eval_metrics(with_tiers=fed.cfg.tier_eval == "every" or (final and fed.cfg.tier_eval == "final"))
    if fed.cfg.dp_clip is not None:
        q = fed.cfg.clients_per_round / len(fed.client_ids)
        row["dp_epsilon"] = epsilon(fed.cfg.dp_noise, q, t + 1, fed.cfg.dp_delta)
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
    out = prepare_out(cfg, resume)
    fed = federation or Federation(cfg)
    if progress:
        print_plan(fed)
    if cfg.dp_clip is not None:
        log.warning("DP mode: sparsity weighting is off; clipped updates are averaged with uniform weights")
    restored = load_latest(out / "checkpoint") if resume else None
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    if restored is not None:
        round_done, tensors, state = restored
        fed.restore(tensors, state)
        truncate_metrics(out, round_done)
    else:
        truncate_metrics(out, 0)
    if "initial_eval_ppl" not in summary:
        base = fed.eval_metrics(with_tiers=False)  # B = 0: every truncation is the base model
        summary = {"initial_eval_loss": base["eval_loss"], "initial_eval_ppl": base["eval_ppl"]}
        write_summary(out, summary)
    bar = Progress(progress, cfg.rounds, fed.round)
    try:
        for t in range(fed.round, cfg.rounds):
            started = time.perf_counter()
            row = round_fn(fed, t, bar, hook)
            row.update(evaluate_round(fed, t))
            row["seconds"] = time.perf_counter() - started
            row["server_rss_mb"] = rss_mb()
            append_metrics(out, row)
            save_checkpoint(out / "checkpoint", fed.round, fed.state_tensors(), fed.state_json() | {"config": cfg.to_dict()})
            bar.round_done(row)
    finally:
        bar.stop()
    return finish(fed, out, summary)


def finish(fed: Federation, out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the final adapter, plots and summary.json from metrics.jsonl."""
    cfg = fed.cfg
    rows = read_metrics(out)
    if fed.kind.has_adapter:
        adapter_dir = out / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_adapter(adapter_dir, fed.state["global"], cfg.global_rank, cfg.lora_scale, cfg.target_modules, cfg.model)
    plot_run(rows, out / "plots", summary.get("initial_eval_ppl"))
    ppls = [r["eval_ppl"] for r in rows]
    summary.update(
        {
            "config": cfg.to_dict(),
            "method": cfg.method,
            "rounds": len(rows),
            "clients": len(fed.client_ids),
            "final_eval_loss": rows[-1]["eval_loss"] if rows else None,
            "final_eval_ppl": ppls[-1] if ppls else None,
            "best_eval_ppl": min(ppls) if ppls else None,
            "final_tier_eval_ppl": rows[-1].get("tier_eval_ppl", {}) if rows else {},
            "bytes_up_total": sum(r["bytes_up"] for r in rows),
            "bytes_down_total": sum(r["bytes_down"] for r in rows),
            "trainable_params": fed.trainable_params(),
            "seconds_total": sum(r["seconds"] for r in rows),
            "final_ranks": dict(sorted(fed.ranks.items())) if len(fed.ranks) <= 2000 else None,
            "dropped_total": sum(len(r["dropped"]) for r in rows),
        }
    )
    write_summary(out, summary)
    return summary
