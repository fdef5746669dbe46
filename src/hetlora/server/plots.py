"""Matplotlib figures of one run: perplexity, ranks, live rank and bytes per round (written by the runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def integer_rounds(ax) -> None:
    """Rounds are whole numbers: no 1.5 or 2.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(rows: Sequence[Mapping[str, Any]], directory: Path, initial_ppl: float | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = ([0] if initial_ppl else []) + rounds, ([initial_ppl] if initial_ppl else []) + [r["eval_ppl"] for r in rows]
    ax.plot(xs, ys, marker="o", label="global (r_max)")
    tiers = sorted({t for r in rows for t in r.get("tier_eval_ppl", {})}, key=int)
    for t in tiers:
        pts = [(r["round"], r["tier_eval_ppl"][t]) for r in rows if t in r.get("tier_eval_ppl", {})]
        ax.plot(*zip(*pts), marker="x", linestyle="none", label=f"truncated to r={t}")
    ax.set(xlabel="round", ylabel="held-out perplexity", title="Perplexity vs round")
    integer_rounds(ax)
    ax.legend()
    paths.append(save_figure(fig, directory / "perplexity.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({c for r in rows for c in r.get("ranks", {})})
    for c in clients[:40]:
        pts = [(r["round"], r["ranks"][c]) for r in rows if c in r.get("ranks", {})]
        ax.plot(*zip(*pts), marker=".", alpha=0.6)
    ax.set(xlabel="round", ylabel="client rank after round", title=f"Client ranks ({min(len(clients), 40)} shown)")
    integer_rounds(ax)
    paths.append(save_figure(fig, directory / "ranks.png"))

    live = [(r["round"], r["live_rank"]) for r in rows if r.get("live_rank") is not None]
    trainable = [(r["round"], r["trainable_rank"]) for r in rows if r.get("trainable_rank") is not None]
    if live or trainable:  # the diagnostic users most need: are rank components dying? (docs/algorithm.md §3)
        fig, ax = plt.subplots(figsize=(6, 4))
        if live:
            ax.plot(*zip(*live), marker="o", label="live rank (‖B_j‖·‖A_j‖ > 0)")
        if trainable:
            ax.plot(*zip(*trainable), marker="x", linestyle="--", label="trainable rank")
        ax.set(xlabel="round", ylabel="rank of the global adapter", title="Live and trainable rank")
        ax.set_ylim(bottom=0)
        integer_rounds(ax)
        ax.legend()
        paths.append(save_figure(fig, directory / "live_rank.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in rows], width=0.4, label="down")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in rows], width=0.4, label="up")
    ax.set(xlabel="round", ylabel="MB", title="Communication per round")
    integer_rounds(ax)
    ax.legend()
    paths.append(save_figure(fig, directory / "bytes.png"))
    return paths
