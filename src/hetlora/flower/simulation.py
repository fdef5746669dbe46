"""``hetlora run --engine flower``: the experiment on Flower's simulation engine (Ray)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..server.runner import run_lock

# Ray's Unix sockets must fit in 107 bytes; a deep --out gets a short sibling under /tmp.
MAX_RAY_DIR = 60
SIBLING_ROOT, SIBLING_PREFIX = "/tmp", "hetlora-ray-"
#: the simulation's own lock file in the run directory (held around the run's lock, which the ServerApp takes)
RAY_LOCK = ".simulation.lock"


def _ray_temp_dir(out: Path) -> Path:
    inside = (out / ".ray").resolve()
    if len(str(inside)) <= MAX_RAY_DIR:
        return inside
    return Path(SIBLING_ROOT) / f"{SIBLING_PREFIX}{hashlib.sha1(str(inside).encode()).hexdigest()[:10]}"


def _names_dir(proc: Path, marker: str) -> bool:
    """Whether a process's command line, or any file it holds open, lies under ``marker``.

    Ray renames some of its processes (``ray::DashboardAgent``): those are found by their open log files."""
    try:
        if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
        return any(os.readlink(fd).startswith(marker) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def end_stale_ray(ray_dir: Path, announce: bool = True) -> list[int]:
    """End the processes a SIGKILLed earlier run of this directory left behind (Ray's GCS, raylet, agents, workers).

    A SIGKILL gives the driver no chance to stop its Ray cluster, and nothing can end it at that moment; the
    next start or resume of the same run directory ends every process that names this run's Ray temp dir
    (which no other run uses) in its command line or its open files. Returns the pids ended.
    """
    marker = str(ray_dir)
    mine = {os.getpid(), os.getppid()}
    ended = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid not in mine and _names_dir(proc, marker):
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
            except OSError:
                pass
    if ended and announce:
        logging.getLogger(__name__).warning("ended %d Ray process(es) left by an earlier run of this directory", len(ended))
    return ended


def run_simulation(cfg: RunConfig, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run ``cfg`` with one virtual SuperNode per client; returns the summary (``quiet``: Flower logs warnings only)."""
    if quiet:
        _quiet_flower()
    out = Path(cfg.out)
    with run_lock(out, RAY_LOCK):  # one simulation of a directory at a time: its Ray files and processes are its own
        return _simulate(cfg, out, resume)


def _simulate(cfg: RunConfig, out: Path, resume: bool) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from .client_app import app as client_app
    from .server_app import serve

    ray_dir = _prepare_run_directory(out)
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result.update(serve(grid, cfg, resume=resume))

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"_temp_dir": str(ray_dir), "include_dashboard": False, "log_to_driver": False},
    }
    try:
        flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=_node_count(cfg), backend_config=backend)
        return result or _finished_summary(out)
    finally:
        _drop_sibling_ray_dir(ray_dir)


def _drop_sibling_ray_dir(ray_dir: Path) -> None:
    """Ray's temp files of a run whose --out is too deep for Ray's sockets live in a sibling under /tmp, not with the
    run: removed when the simulation returns (under its directory's simulation lock, so no other simulation of it is
    using them; its Ray processes ended first), so they do not pile up there (108 had, from the test suite alone). A run
    killed outright leaves them to the next start of its directory (end_stale_ray). Only a sibling this module named
    is removed, never a directory inside the run (or wherever a symlink there points)."""
    import shutil

    if ray_dir.parent == Path(SIBLING_ROOT) and ray_dir.name.startswith(SIBLING_PREFIX) and not ray_dir.is_symlink():
        end_stale_ray(ray_dir, announce=False)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _quiet_flower() -> None:
    """Flower logs warnings only: this process's logger, and (by the variable Flower reads at import) every Ray actor's."""
    os.environ["FLWR_LOG_LEVEL"] = "WARNING"
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)


def _prepare_run_directory(out: Path) -> Path:
    """The run directory, Flower's home and Ray's temp files inside it (stale Ray processes of an earlier run of it
    ended, under the run lock); returns Ray's temp directory."""
    out.mkdir(parents=True, exist_ok=True)
    # Never let Flower sync dependencies at run time (uv would pull a CUDA torch), and
    # keep Flower's home and Ray's temp files with the run.
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ.setdefault("FLWR_HOME", str((out / ".flwr").resolve()))
    ray_dir = _ray_temp_dir(out)
    with run_lock(out):  # a live run of this directory refuses here, before its Ray processes could be touched
        end_stale_ray(ray_dir)
    ray_dir.mkdir(parents=True, exist_ok=True)
    return ray_dir


def _node_count(cfg: RunConfig) -> int:
    """One virtual SuperNode per registered client (client_pool honoured)."""
    from ..data import load_data
    from ..device.host import registered_clients
    from ..models.loading import load_tokenizer

    data = load_data(cfg.data, load_tokenizer(cfg.model), **cfg.data_options())
    return len(registered_clients(data.client_ids, cfg))


def _finished_summary(out: Path) -> dict[str, Any]:
    """The summary a finished run wrote (what the ServerApp returns when its process is not this one)."""
    summary = out / "summary.json"
    if not summary.is_file():
        raise RuntimeError("the Flower simulation ended without finishing the run; see the log above")
    return json.loads(summary.read_text())
