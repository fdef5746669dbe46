"""The ``hetlora`` command: run, compare, report, export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .config import RunConfig, from_mapping, load_toml

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning with heterogeneous-rank LoRA (HetLoRA and peers).")


def _norm_bound(value: Optional[str]) -> Optional[float]:
    if value is None or value.lower() == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"--norm-bound takes a number or 'off', got {value!r}") from None


def build_config(config: Optional[Path], flags: dict) -> RunConfig:
    """TOML file first, then the flags the user gave (None = not given)."""
    cfg = load_toml(config) if config else RunConfig()
    given = {k: v for k, v in flags.items() if v is not None}
    if "ranks" in given:
        given["ranks"] = [int(x) for x in str(given["ranks"]).split(",") if x.strip()]
    if "target_modules" in given:
        given["target_modules"] = [m.strip() for m in str(given["target_modules"]).split(",") if m.strip()]
    if "norm_bound" in given:
        given["norm_bound"] = _norm_bound(given["norm_bound"])
        if given["norm_bound"] is None:
            cfg.norm_bound = None
            del given["norm_bound"]
    return from_mapping(given, cfg)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


COMMON = dict(
    config=typer.Option(None, "--config", help="TOML config file; flags override it."),
    method=typer.Option(None, help="hetlora | hetlora-naive | fedavg | recon-svd | flexlora | flora | ffa | rbla | fft [default: hetlora]"),
    model=typer.Option(None, help="smollm2 (default, offline) | tiny | HF model id | local path"),
    data=typer.Option(None, help="chitchat (default, offline) | path to .jsonl/.csv with client_id"),
    rounds=typer.Option(None, help="Federated rounds [default: 5]"),
    clients_per_round=typer.Option(None, "--clients-per-round", help="Clients sampled per round [default: 4]"),
    local_steps=typer.Option(None, "--local-steps", help="Local AdamW steps per round (τ) [default: 4]"),
    batch_size=typer.Option(None, "--batch-size", help="Local batch size [default: 8]"),
    max_length=typer.Option(None, "--max-length", help="Max tokens per example [default: 128]"),
    lr=typer.Option(None, help="Local learning rate [default: 1e-3]"),
    r_min=typer.Option(None, "--r-min", help="Smallest client rank [default: 5]"),
    r_max=typer.Option(None, "--r-max", help="Largest client rank = global rank [default: 50]"),
    rank=typer.Option(None, help="fedavg (HomLoRA): the one rank for all [default: r_max]"),
    gamma=typer.Option(None, help="Pruning ratio γ [default: 0.99]"),
    lam=typer.Option(None, "--lambda", help="Pruning penalty weight λ [default: 0.01]"),
    rank_dist=typer.Option(None, "--rank-dist", help="uniform | tiers | list | fixed [default: uniform]"),
    ranks=typer.Option(None, help="Comma-separated ranks for --rank-dist list"),
    norm_bound=typer.Option(None, "--norm-bound", help="Norm-inflation bound x, or 'off' (paper-faithful) [default: 1.5]"),
    seed=typer.Option(None, help="Seed for everything [default: 0]"),
    eval_size=typer.Option(None, "--eval-size", help="Held-out examples for perplexity [default: 64]"),
    max_clients=typer.Option(None, "--max-clients", help="Register only the first N clients"),
    min_examples=typer.Option(None, "--min-examples", help="chitchat: drop senders with fewer training examples [default: 20]"),
    bf16=typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (slower on CPUs without bf16 units)"),
    target_modules=typer.Option(None, "--target-modules", help="Comma-separated module names LoRA wraps [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"),
    grad_checkpointing=typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Clients recompute activations in backward: much less memory, ~1 extra forward per step"),
    release_memory=typer.Option(None, "--release-memory/--no-release-memory", help="Clients hand freed heap pages back to the OS every 3 layers (glibc): lower peak RSS, slower steps"),
    dp_clip=typer.Option(None, "--dp-clip", help="User-level DP: clip norm C (turns DP on)"),
    dp_noise=typer.Option(None, "--dp-noise", help="User-level DP: noise multiplier σ [default: 1.0]"),
    engine=typer.Option(None, help="local (in-process, default) | flower (Flower simulation)"),
    partition=typer.Option(None, help="Data file without client_id: iid:N or dirichlet:N (Flower Datasets partitioners; --partition-by, --dirichlet-alpha)"),
)


@app.command()
def run(
    config: Optional[Path] = COMMON["config"],
    method: Optional[str] = COMMON["method"],
    model: Optional[str] = COMMON["model"],
    data: Optional[str] = COMMON["data"],
    rounds: Optional[int] = COMMON["rounds"],
    clients_per_round: Optional[int] = COMMON["clients_per_round"],
    local_steps: Optional[int] = COMMON["local_steps"],
    batch_size: Optional[int] = COMMON["batch_size"],
    max_length: Optional[int] = COMMON["max_length"],
    lr: Optional[float] = COMMON["lr"],
    r_min: Optional[int] = COMMON["r_min"],
    r_max: Optional[int] = COMMON["r_max"],
    rank: Optional[int] = COMMON["rank"],
    gamma: Optional[float] = COMMON["gamma"],
    lam: Optional[float] = COMMON["lam"],
    rank_dist: Optional[str] = COMMON["rank_dist"],
    ranks: Optional[str] = COMMON["ranks"],
    norm_bound: Optional[str] = COMMON["norm_bound"],
    seed: Optional[int] = COMMON["seed"],
    eval_size: Optional[int] = COMMON["eval_size"],
    max_clients: Optional[int] = COMMON["max_clients"],
    min_examples: Optional[int] = COMMON["min_examples"],
    bf16: Optional[bool] = COMMON["bf16"],
    target_modules: Optional[str] = COMMON["target_modules"],
    grad_checkpointing: Optional[bool] = COMMON["grad_checkpointing"],
    release_memory: Optional[bool] = COMMON["release_memory"],
    dp_clip: Optional[float] = COMMON["dp_clip"],
    dp_noise: Optional[float] = COMMON["dp_noise"],
    engine: Optional[str] = COMMON["engine"],
    partition: Optional[str] = COMMON["partition"],
    partition_by: Optional[str] = typer.Option(None, "--partition-by", help="Label column for dirichlet partitioning [default: label]"),
    dirichlet_alpha: Optional[float] = typer.Option(None, "--dirichlet-alpha", help="Dirichlet concentration α [default: 0.5]"),
    out: Optional[str] = typer.Option(None, help="Output directory [default: runs/hetlora]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last good checkpoint"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars"),
) -> None:
    """Run one federated experiment (default: HetLoRA on SmolLM2-135M + chitchat, 10.5–12 min on 2 CPU cores)."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "resume", "quiet")}
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if resume:
            from .runner import resume_config

            out_dir = Path(out or RunConfig().out)
            cfg = resume_config(out_dir, {"rounds": rounds} if rounds else None)
        else:
            cfg = build_config(config, flags).validate()
        if cfg.engine == "flower":
            from .flower.simulation import run_simulation

            summary = run_simulation(cfg, resume=resume)
        else:
            from .runner import run as run_local

            summary = run_local(cfg, resume=resume, progress=not quiet)
    except ValueError as err:
        _fail(err)
        return
    typer.echo(
        f"done: perplexity {summary['initial_eval_ppl']:.2f} -> {summary['final_eval_ppl']:.2f} "
        f"(best {summary['best_eval_ppl']:.2f}) in {summary['seconds_total']:.0f}s; outputs in {cfg.out}"
    )


@app.command()
def compare(
    methods: str = typer.Option("hetlora,fedavg-rmin,fedavg-rmax,recon-svd", help="Comma-separated: method names, NAME:RANK (fedavg:5), fedavg-rmin/-rmax, hetlora-noprune, hetlora-bound, hetlora-paper"),
    config: Optional[Path] = COMMON["config"],
    model: Optional[str] = COMMON["model"],
    data: Optional[str] = COMMON["data"],
    rounds: Optional[int] = COMMON["rounds"],
    clients_per_round: Optional[int] = COMMON["clients_per_round"],
    local_steps: Optional[int] = COMMON["local_steps"],
    batch_size: Optional[int] = COMMON["batch_size"],
    max_length: Optional[int] = COMMON["max_length"],
    lr: Optional[float] = COMMON["lr"],
    r_min: Optional[int] = COMMON["r_min"],
    r_max: Optional[int] = COMMON["r_max"],
    norm_bound: Optional[str] = COMMON["norm_bound"],
    seed: Optional[int] = COMMON["seed"],
    eval_size: Optional[int] = COMMON["eval_size"],
    max_clients: Optional[int] = COMMON["max_clients"],
    min_examples: Optional[int] = COMMON["min_examples"],
    out: Optional[str] = typer.Option("runs/compare", help="Directory for every run and comparison.md/png"),
    target_ppl: Optional[float] = typer.Option(None, "--target-ppl", help="Perplexity target for 'rounds to reach'"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Run several methods on the same seed, clients, ranks and budget; write comparison.md/png."""
    flags = {k: v for k, v in locals().items() if k not in ("methods", "config", "target_ppl", "quiet")}
    from .compare import compare as run_compare

    logging.basicConfig(level=logging.WARNING)
    try:
        base = build_config(config, flags)
        rows = run_compare([m.strip() for m in methods.split(",") if m.strip()], base, progress=not quiet, target=target_ppl)
    except ValueError as err:
        _fail(err)
        return
    for r in rows:
        typer.echo(f"{r['label']:>18}: final ppl {r['final_eval_ppl']:.2f} (best {r['best_eval_ppl']:.2f})")
    typer.echo(f"table: {Path(base.out) / 'comparison.md'}")


@app.command()
def report(directory: Path = typer.Argument(..., help="A compare output directory"), target_ppl: Optional[float] = typer.Option(None, "--target-ppl")) -> None:
    """Re-render comparison.md and comparison.png from existing outputs."""
    from .compare import render

    try:
        md, png = render(directory, target_ppl)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    typer.echo(f"wrote {md} and {png}")


@app.command()
def export(
    directory: Path = typer.Argument(..., help="A run's --out directory (holds adapter/ and summary.json)"),
    merged: Path = typer.Option(..., "--merged", help="Where to write the merged standalone HF model"),
) -> None:
    """Merge the run's global adapter into its base model and save a standalone HF model."""
    from .export import export_merged

    try:
        export_merged(directory, merged)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
        return
    typer.echo(f"wrote merged model to {merged}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
