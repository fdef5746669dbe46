"""Matplotlib figures of a comparison and of the study: convergence bands per method, the long regime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt

from ..server.plots import integer_rounds, save_figure


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
    return save_figure(fig, path, dpi=110)


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
    and the long regime's test and train curves; labels in ``order`` first, each with its own colour throughout."""
    directory.mkdir(parents=True, exist_ok=True)
    present = list(dict.fromkeys(r["label"] for r in runs))
    labels = [label for label in order if label in present] + [label for label in present if label not in order]
    paths = [_convergence(runs, labels, directory / "convergence.png"), _live_rank(runs, labels, directory / "live_rank.png")]
    tiers = _tier_ppl(runs, labels, directory / "tier_ppl.png")
    paths += [tiers] if tiers else []
    paths.append(_bytes_vs_ppl(runs, labels, directory / "bytes_vs_ppl.png"))
    if long_runs:
        paths.append(plot_long(long_runs, directory / "long_regime.png"))
    return paths


def _colour(i: int):
    return plt.get_cmap("tab20").colors[i % 20]


def _convergence(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Held-out perplexity per round: the mean over seeds and its 95 % band, per label."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    start = max((r["curve"][0][1] for r in runs), default=None)
    for i, label in enumerate(labels):
        xs, m, lo, hi = _band(_per_round(runs, label, "curve"))
        ax.plot(xs, m, marker="o", markersize=3, color=_colour(i), label=label)
        ax.fill_between(xs, lo, hi, color=_colour(i), alpha=0.15)
    if start:
        low = min(y for r in runs for _, y in r["curve"])
        ax.set_ylim(0.95 * low, 1.1 * start)
    ax.set(xlabel="round", ylabel="held-out perplexity (per-round subset)", title="Convergence (mean and 95 % interval over seeds)")
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path, dpi=110)


def _live_rank(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """The global adapter's live rank (solid) and trainable rank (dashed) per round, mean over seeds."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, label in enumerate(labels):
        per_round = _per_round(runs, label, "live_rank")
        if per_round:
            xs, m, _, _ = _band(per_round)
            ax.plot(xs, m, marker=".", color=_colour(i), label=label)
        trainable = _per_round(runs, label, "trainable_rank")
        if trainable:
            xs, m, _, _ = _band(trainable)
            ax.plot(xs, m, linestyle="--", color=_colour(i), alpha=0.6)
    ax.set(xlabel="round", ylabel="rank of the global adapter",
           title="Live rank (solid: ‖B_j‖·‖A_j‖ > 0) and trainable rank (dashed), mean over seeds")
    integer_rounds(ax)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path, dpi=110)


def _tier_ppl(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path | None:
    """Each rank tier's final perplexity (the global adapter truncated to the tier), mean over seeds; None without tiers."""
    tiers = [(label, [r["tier_ppl"] for r in runs if r["label"] == label and r.get("tier_ppl")]) for label in labels]
    tiers = [(label, t) for label, t in tiers if t]
    if not tiers:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = sorted({k for _, ts in tiers for t in ts for k in t}, key=int)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        means = [sum(t[name] for t in ts if name in t) / max(1, sum(name in t for t in ts)) for _, ts in tiers]
        ax.bar([i + j * width for i in range(len(tiers))], means, width=width, label=f"truncated to r = {name}")
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tiers))], [label for label, _ in tiers], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="final test perplexity (mean over seeds)", title="Each rank tier's perplexity: the global adapter truncated to the tier")
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def _bytes_vs_ppl(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Upload per run against final perplexity, one point per seed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, label in enumerate(labels):
        pts = [(r["bytes_up_total"] / 1e6, r["final_eval_ppl"]) for r in runs if r["label"] == label]
        if pts:
            ax.scatter(*zip(*pts), color=_colour(i), label=label, s=18)
    ax.set_xscale("log")
    ax.set(xlabel="upload per run (MB, log scale)", ylabel="final test perplexity", title="Communication vs quality (one point per seed)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


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
        integer_rounds(ax)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)
