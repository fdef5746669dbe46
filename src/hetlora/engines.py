"""The engine dispatcher: ``hetlora run`` builds its config and runs it in process or on Flower.

It sits above both engines (hetlora.server.runner in process, hetlora.flower over Flower), so neither
imports the other's shell: the Flower ServerApp drives :func:`hetlora.server.runner.run` with its own
round function, and nothing in the runner knows Flower exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .config import RunConfig, build_config
from .server.runner import resume_config, run


class RunFailed(RuntimeError):
    """The run finished its rounds but its result must not be trusted (no aggregate, or a rejected one)."""


def failure(summary: Mapping[str, Any]) -> str | None:
    """Why a finished run's result must not be trusted (None: it can be)."""
    if summary.get("rejected_rounds"):
        return (f"the aggregate of round(s) {summary['rejected_rounds']} was rejected (not finite, or the held-out loss "
                "after it was not; the previous global model was kept); see 'rejected' in metrics.jsonl")
    if summary.get("rounds") and not summary.get("rounds_aggregated"):
        return "no round aggregated a single valid update; see 'dropped' in metrics.jsonl"
    return None


def run_experiment(config: Path | None, flags: Mapping[str, Any], out: str | None, *, resume: bool, progress: bool) -> dict[str, Any]:
    """``hetlora run``: build (or, with ``resume``, reload) the config, run it on its engine,
    and raise :class:`RunFailed` when the result must not be trusted."""
    if resume:
        if out is not None and not str(out).strip():
            raise ValueError("--out must name a directory, got an empty string")
        out_dir = Path(out if out is not None else RunConfig().out)
        asked = build_config(config, dict(flags)).settings() if config else {}
        given = {k: v for k, v in build_config(None, dict(flags)).settings().items() if flags.get(k) is not None}
        cfg = resume_config(out_dir, given=asked | given)
    else:
        cfg = build_config(config, dict(flags) | {"out": out}).validate()
    if cfg.engine == "flower":
        from .flower.simulation import run_simulation  # Flower and Ray load only for a Flower run

        summary = run_simulation(cfg, resume=resume, quiet=not progress)
    else:
        summary = run(cfg, resume=resume, progress=progress)
    summary = dict(summary) | {"out": cfg.out}
    problem = failure(summary)
    if problem:
        raise RunFailed(f"run finished but {problem}")
    return summary
