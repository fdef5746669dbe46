"""Crash-safe files: fsync, SHA-256, JSON and whole directories written by atomic rename.

What every writer of lasting files uses (checkpoints, run outputs, the model cache, exported adapters): a reader
never sees half a file or half a directory, whatever moment the process dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON through a temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_directory_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory through a temporary sibling and swap it into place (replacing ``target``).

    The old ``target`` is moved aside before the new one moves in, so an interruption leaves
    either the old or the new directory, never none.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=target.name + ".old.", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
