"""``hetlora compare`` / ``report``: several methods on one seed, a table and a plot."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..config import RunConfig, default_of
from ..server.outputs import read_metrics
from .plots import plot_comparison

# Named variants besides plain method names; "fedavg:R" gives HomLoRA at rank R.
PRESETS: dict[str, dict[str, Any]] = {
    "hetlora-noprune": {"method": "hetlora", "prune": False},
    "hetlora-bound": {"method": "hetlora", "norm_bound": 1.5},
    "hetlora-paper": {"method": "hetlora", "norm_bound": None},
    "hetlora-ordered": {"method": "hetlora", "ordered_dropout": True},
    "hetlora-svd-ordered": {"method": "hetlora-svd", "ordered_dropout": True},
}


def variant(label: str, base: RunConfig) -> RunConfig:
    """The config of one compared run: a method name, ``fedavg:R``, ``fedavg-rmin/-rmax`` or a preset."""
    changes: dict[str, Any]
    if label in PRESETS:
        changes = dict(PRESETS[label])
    elif label == "fedavg-rmin":
        changes = {"method": "fedavg", "rank": base.r_min}
    elif label == "fedavg-rmax":
        changes = {"method": "fedavg", "rank": base.r_max}
    elif ":" in label:
        method, rank = label.split(":", 1)
        if not rank.isdigit():
            raise ValueError(f"bad method spec {label!r}: expected NAME:RANK")
        changes = {"method": method, "rank": int(rank)}
    else:
        changes = {"method": label}
    safe = label.replace(":", "-r")
    return shared_options_for(dataclasses.replace(base, out=str(Path(base.out) / safe), **changes)).validate()


def shared_options_for(cfg: RunConfig) -> RunConfig:
    """A compared run's config without the shared options its method does not take (:meth:`RunConfig.
    unhonoured_options`), reset to their defaults so its ``config.json`` says what it ran with: ``--florist-energy``
    is florist's, ``per_layer`` hetlora's family's, ``prune`` for clients that prune, memory budgets for clients whose
    footprint is calibrated. (A lone run refuses them instead.)"""
    return dataclasses.replace(cfg, **{name: default_of(name) for name in cfg.unhonoured_options()})


def rounds_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((r for r, p in curve if p <= target), None)


def collect(directory: Path) -> list[dict[str, Any]]:
    """One row per run directory under ``directory`` (order of ``labels.json`` if present)."""
    order_file = directory / "labels.json"
    labels = json.loads(order_file.read_text()) if order_file.is_file() else sorted(p.name for p in directory.iterdir() if (p / "summary.json").is_file())
    rows = []
    for label in labels:
        run_dir = directory / label.replace(":", "-r")
        if not (run_dir / "summary.json").is_file():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = read_metrics(run_dir)
        curve = [(0, summary["initial_eval_ppl"])] + [(m["round"], m["eval_ppl"]) for m in metrics]
        rows.append(
            {
                "label": label,
                "method": summary.get("method"),
                "final_eval_ppl": summary.get("final_eval_ppl"),
                "best_eval_ppl": summary.get("best_eval_ppl"),
                "initial_eval_ppl": summary.get("initial_eval_ppl"),
                "rounds": summary.get("rounds"),
                "bytes_up_total": summary.get("bytes_up_total"),
                "bytes_down_total": summary.get("bytes_down_total"),
                "trainable_params": summary.get("trainable_params"),
                "seconds": summary.get("seconds_total"),
                "final_tier_eval_ppl": summary.get("final_tier_eval_ppl", {}),
                "curve": curve,
            }
        )
    return rows


def render(directory: Path, target: float | None = None, title: str = "") -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` from the runs under ``directory``."""
    rows = collect(directory)
    if not rows:
        raise ValueError(f"{directory}: no finished runs to compare")
    if target is None:  # halfway (geometrically) from the start to the best final perplexity
        start = rows[0]["initial_eval_ppl"]
        best = min(r["final_eval_ppl"] for r in rows)
        target = math.sqrt(start * best)
    lines = [
        f"| method | final ppl | best ppl | rounds to ppl ≤ {target:.1f} | MB up | MB down | trainable params | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reach = rounds_to_reach(r["curve"][1:], target)
        lines.append(
            f"| {r['label']} | {r['final_eval_ppl']:.2f} | {r['best_eval_ppl']:.2f} | {reach if reach is not None else '—'} | "
            f"{r['bytes_up_total'] / 1e6:.1f} | {r['bytes_down_total'] / 1e6:.1f} | {r['trainable_params']:,} | {r['seconds']:.0f} |"
        )
    md = directory / "comparison.md"
    md.write_text((f"# {title}\n\n" if title else "") + f"Initial perplexity {rows[0]['initial_eval_ppl']:.2f}.\n\n" + "\n".join(lines) + "\n")
    png = plot_comparison({r["label"]: r["curve"] for r in rows}, directory / "comparison.png", title)
    return md, png


def compare(labels: list[str], base: RunConfig, *, progress: bool = True, target: float | None = None) -> list[dict[str, Any]]:
    """Run each labelled variant with the same seed, clients and budget, then render."""
    from ..server.runner import finished_as_asked, run

    configs = [variant(label, base) for label in labels]  # all checked before anything runs
    root = Path(base.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps(labels))
    for label, cfg in zip(labels, configs):
        if finished_as_asked(Path(cfg.out), cfg):
            continue  # finished earlier with these settings: compare is restartable
        resume = (Path(cfg.out) / "config.json").is_file()
        run(cfg, resume=resume, progress=progress)
    render(root, target)
    return collect(root)
