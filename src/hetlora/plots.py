"""Matplotlib figures of a run (perplexity, ranks, bytes) and of a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "perplexity.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({c for r in rows for c in r.get("ranks", {})})
    for c in clients[:40]:
        pts = [(r["round"], r["ranks"][c]) for r in rows if c in r.get("ranks", {})]
        ax.plot(*zip(*pts), marker=".", alpha=0.6)
    ax.set(xlabel="round", ylabel="client rank after round", title=f"Client ranks ({min(len(clients), 40)} shown)")
    fig.tight_layout()
    paths.append(directory / "ranks.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in rows], width=0.4, label="down")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in rows], width=0.4, label="up")
    ax.set(xlabel="round", ylabel="MB", title="Communication per round")
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "bytes.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def plot_comparison(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    ax.set(xlabel="round", ylabel="held-out perplexity", title=title or "Perplexity vs round")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
