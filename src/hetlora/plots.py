"""Matplotlib figures of a run (perplexity, ranks, bytes) and of a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path, dpi: int = 100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _integer_rounds(ax) -> None:
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
    _integer_rounds(ax)
    ax.legend()
    paths.append(_save(fig, directory / "perplexity.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({c for r in rows for c in r.get("ranks", {})})
    for c in clients[:40]:
        pts = [(r["round"], r["ranks"][c]) for r in rows if c in r.get("ranks", {})]
        ax.plot(*zip(*pts), marker=".", alpha=0.6)
    ax.set(xlabel="round", ylabel="client rank after round", title=f"Client ranks ({min(len(clients), 40)} shown)")
    _integer_rounds(ax)
    paths.append(_save(fig, directory / "ranks.png"))

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
        _integer_rounds(ax)
        ax.legend()
        paths.append(_save(fig, directory / "live_rank.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in rows], width=0.4, label="down")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in rows], width=0.4, label="up")
    ax.set(xlabel="round", ylabel="MB", title="Communication per round")
    _integer_rounds(ax)
    ax.legend()
    paths.append(_save(fig, directory / "bytes.png"))
    return paths


def plot_comparison(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """One line per method; the y axis stops at 1.5x the starting perplexity so that a
    diverging run does not flatten the others (it is marked "off scale")."""
    fig, ax = plt.subplots(figsize=(8, 5))
    starts = [pts[0][1] for pts in curves.values() if pts]
    top = 1.5 * max(starts) if starts else None
    colours = plt.get_cmap("tab10").colors
    for i, (label, pts) in enumerate(curves.items()):
        if pts:
            off = top is not None and max(p for _, p in pts) > top
            ax.plot(*zip(*pts), marker="o", markersize=3, color=colours[i % 10],
                    linestyle="-" if i < 10 else "--", label=label + (" (off scale)" if off else ""))
    ax.set(xlabel="round", ylabel="held-out perplexity", title=title or "Perplexity vs round")
    if top is not None:
        low = min(p for pts in curves.values() for _, p in pts)
        ax.set_ylim(bottom=0.9 * low, top=top)
    ax.legend(fontsize=8, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, dpi=110)


def _band(values_by_round: dict[int, list[float]]):
    """Mean and 95 % t-interval across seeds at every round (the interval collapses to the mean for one seed)."""
    from .stats import t_interval

    xs = sorted(values_by_round)
    means, lows, highs = [], [], []
    for x in xs:
        m, ci = t_interval(values_by_round[x])
        means.append(m)
        lows.append(ci[0] if ci else m)
        highs.append(ci[1] if ci else m)
    return xs, means, lows, highs


def plot_study(runs: Sequence[Mapping[str, Any]], directory: Path, r_min: int, order: Sequence[str] = (),
               long_runs: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """Convergence with 95 % bands across seeds, live and trainable rank, tier perplexity, bytes vs perplexity,
    and the long regime's test and train curves."""
    directory.mkdir(parents=True, exist_ok=True)
    present = list(dict.fromkeys(r["label"] for r in runs))
    labels = [label for label in order if label in present] + [label for label in present if label not in order]
    colours = plt.get_cmap("tab20").colors
    paths = []

    fig, ax = plt.subplots(figsize=(9, 5.5))
    start = max((r["curve"][0][1] for r in runs), default=None)
    for i, label in enumerate(labels):
        xs, m, lo, hi = _band(_per_round(runs, label, "curve"))
        ax.plot(xs, m, marker="o", markersize=3, color=colours[i % 20], label=label)
        ax.fill_between(xs, lo, hi, color=colours[i % 20], alpha=0.15)
    if start:
        low = min(y for r in runs for _, y in r["curve"])
        ax.set_ylim(0.95 * low, 1.1 * start)
    ax.set(xlabel="round", ylabel="held-out perplexity (per-round subset)", title="Convergence (mean and 95 % interval over seeds)")
    ax.legend(fontsize=7, ncol=3)
    paths.append(_save(fig, directory / "convergence.png", dpi=110))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, label in enumerate(labels):
        per_round = _per_round(runs, label, "live_rank")
        if per_round:
            xs, m, _, _ = _band(per_round)
            ax.plot(xs, m, marker=".", color=colours[i % 20], label=label)
        trainable = _per_round(runs, label, "trainable_rank")
        if trainable:
            xs, m, _, _ = _band(trainable)
            ax.plot(xs, m, linestyle="--", color=colours[i % 20], alpha=0.6)
    ax.set(xlabel="round", ylabel="rank of the global adapter",
           title="Live rank (solid: ‖B_j‖·‖A_j‖ > 0) and trainable rank (dashed), mean over seeds")
    _integer_rounds(ax)
    ax.legend(fontsize=7, ncol=3)
    paths.append(_save(fig, directory / "live_rank.png", dpi=110))

    tiers = [(label, [r["tier_ppl"] for r in runs if r["label"] == label and r.get("tier_ppl")]) for label in labels]
    tiers = [(label, t) for label, t in tiers if t]
    if tiers:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        names = sorted({k for _, ts in tiers for t in ts for k in t}, key=int)
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            means = [sum(t[name] for t in ts if name in t) / max(1, sum(name in t for t in ts)) for _, ts in tiers]
            ax.bar([i + j * width for i in range(len(tiers))], means, width=width, label=f"truncated to r = {name}")
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tiers))], [label for label, _ in tiers], rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="final test perplexity (mean over seeds)", title="Each rank tier's perplexity: the global adapter truncated to the tier")
        ax.legend(fontsize=7)
        paths.append(_save(fig, directory / "tier_ppl.png", dpi=110))

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, label in enumerate(labels):
        pts = [(r["bytes_up_total"] / 1e6, r["final_eval_ppl"]) for r in runs if r["label"] == label]
        if pts:
            ax.scatter(*zip(*pts), color=colours[i % 20], label=label, s=18)
    ax.set_xscale("log")
    ax.set(xlabel="upload per run (MB, log scale)", ylabel="final test perplexity", title="Communication vs quality (one point per seed)")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, directory / "bytes_vs_ppl.png", dpi=110))
    if long_runs:
        paths.append(plot_long(long_runs, directory / "long_regime.png"))
    return paths


def _per_round(runs: Sequence[Mapping[str, Any]], label: str, key: str) -> dict[int, list[float]]:
    per_round: dict[int, list[float]] = {}
    for r in runs:
        if r["label"] == label:
            for x, y in r.get(key) or []:
                if y is not None:
                    per_round.setdefault(x, []).append(y)
    return per_round


def plot_long(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The long regime: per-round test perplexity (left) and mean client train loss (right), bands over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, label in enumerate(dict.fromkeys(r["label"] for r in runs)):
        for ax, key in ((left, "curve"), (right, "train_curve")):
            xs, m, lo, hi = _band(_per_round(runs, label, key))
            ax.plot(xs, m, marker="o", markersize=3, color=colours[i % 10], label=label)
            ax.fill_between(xs, lo, hi, color=colours[i % 10], alpha=0.15)
    left.set(xlabel="round", ylabel="test perplexity (per-round subset)", title="Long regime: held-out perplexity")
    right.set(xlabel="round", ylabel="mean client train loss", title="Long regime: train loss")
    for ax in (left, right):
        _integer_rounds(ax)
        ax.legend(fontsize=7)
    return _save(fig, path, dpi=110)
