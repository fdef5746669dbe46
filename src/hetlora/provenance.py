"""Where a result came from: commit, device, library versions, the end-of-turn token, wall time.

Every summary.json (and every study file) carries this record, so a figure can be traced to
the code and environment that made it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """The commit of the source tree hetlora was imported from (with ``-dirty`` for local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def environment(device: str) -> dict[str, Any]:
    """Commit, device and library versions: the record every result file carries (benchmarks too)."""
    return {"commit": git_commit(), "device": device_name(device), **library_versions(), "python": platform.python_version()}


def provenance(host) -> dict[str, Any]:
    """The record for results made with ``host`` (a :class:`hetlora.device.host.ClientHost`)."""
    tok = host.tokenizer
    end = host.data.end_id
    return {
        **environment(host.device),
        "precision": host.precision,
        "data_split": host.data.split_version,
        "eos_token": {"token": tok.eos_token, "id": tok.eos_token_id},
        "end_of_turn_token": {"token": tok.convert_ids_to_tokens(end) if end is not None else None, "id": end},
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a converted model or a result (for provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
