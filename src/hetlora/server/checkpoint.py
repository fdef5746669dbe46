"""Crash-safe checkpoints: safetensors + JSON, atomic rename, SHA-256 manifest written last.

Each round goes to ``checkpoint/round-NNNNN/``: files are written into a temporary
directory and fsynced, ``manifest.json`` (their SHA-256) is written last, the directory
is renamed into place and its parent fsynced. Loading verifies the manifest and falls
back to the newest earlier round that verifies. The last ``keep`` rounds are kept.
Rounds are ordered by their number, not their name (``round-100000`` comes after
``round-99999``). A manifest records the ``run_id`` of the run that wrote it: a
checkpoint of another run found in the directory is skipped with a warning, never
loaded, and never counted among (or deleted as) this run's own.
Payloads are read only as safetensors and JSON — never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import fsync_dir, fsync_file, sha256

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class CorruptCheckpoint(RuntimeError):
    pass


def round_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every ``round-N`` directory, in round order."""
    out = []
    for path in root.glob("round-*"):
        number = path.name[len("round-"):]
        if number.isdigit():
            out.append((int(number), path))
    return sorted(out)


def manifest_run_id(path: Path) -> str | None:
    try:
        value = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value.get("run_id") if isinstance(value, dict) else None


def set_aside_foreign(path: Path, run_id: str | None) -> None:
    """Clear ``path`` for this run's checkpoint of that round: this run's own (a resumed round written again)
    is replaced; anything else — a planted or foreign directory named like it — is moved aside to
    ``<name>.foreign-N``, never deleted (it is not the run's to delete)."""
    if run_id is not None and path.is_dir() and manifest_run_id(path) == run_id:
        shutil.rmtree(path)
        return
    n = 1
    while path.with_name(f"{path.name}.foreign-{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.foreign-{n}")
    os.rename(path, aside)
    log.warning("%s was not this run's checkpoint; moved aside to %s", path, aside.name)


def save_checkpoint(
    root: Path, round_index: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], keep: int = 2,
    run_id: str | None = None,
) -> Path:
    """Save ``tensors`` (file stem -> tensor dict) and ``state`` (JSON) for ``round_index``; ``run_id`` goes in the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_index:05d}"
    tmp = root / f".tmp-round-{round_index:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for stem, tensor_dict in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(path))
        fsync_file(path)
        files[path.name] = sha256(path)
    state_path = tmp / "state.json"
    state_path.write_text(json.dumps(state, indent=1, sort_keys=True))
    fsync_file(state_path)
    files[state_path.name] = sha256(state_path)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"round": round_index, "files": files} | ({"run_id": run_id} if run_id else {}), indent=1, sort_keys=True))
    fsync_file(manifest)
    fsync_dir(tmp)
    if final.exists():
        set_aside_foreign(final, run_id)
    os.rename(tmp, final)
    fsync_dir(root)
    own = [path for _, path in round_dirs(root) if run_id is None or manifest_run_id(path) == run_id]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path, required: tuple[str, ...] = ("global",), allowed: tuple[str, ...] = ("global",)) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest; raise CorruptCheckpoint naming the problem.

    The manifest must list ``state.json`` and the tensor files ``required`` (stems), may list
    the ``allowed`` ones, and nothing else; every listed file must match its SHA-256, and
    the directory must hold no file the manifest does not list (it would not be loaded,
    and its presence means the directory was tampered with or mixed).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{path}: no manifest (partial checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("round"), int):
        raise CorruptCheckpoint(f"{path}: the manifest is not an object with 'round' and 'files'")
    files = manifest["files"]
    expected = {"state.json"} | {f"{stem}.safetensors" for stem in required}
    permitted = expected | {f"{stem}.safetensors" for stem in allowed}
    if not expected <= files.keys():
        raise CorruptCheckpoint(f"{path}: the manifest does not list {sorted(expected - files.keys())}")
    if not files.keys() <= permitted:
        raise CorruptCheckpoint(f"{path}: the manifest lists unexpected file(s) {sorted(files.keys() - permitted)}")
    stray = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if stray:
        raise CorruptCheckpoint(f"{path}: file(s) {stray} are not in the manifest")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if sha256(f) != digest:
            raise CorruptCheckpoint(f"{path}: {name} does not match its SHA-256 in the manifest")
    return manifest


def load_latest(
    root: Path, required: tuple[str, ...] = ("global",), allowed: tuple[str, ...] = ("global",), run_id: str | None = None,
) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """The newest checkpoint that verifies: ``(round, tensors, state)``, or None if there is none.

    Loads exactly the files its manifest lists (see :func:`verify`). With ``run_id``, a
    checkpoint whose manifest names another run (or none) is skipped with a warning.
    """
    for _, path in reversed(round_dirs(root)):
        try:
            manifest = verify(path, required, allowed)
            if run_id is not None and manifest.get("run_id") != run_id:
                log.warning("skipping checkpoint %s: it belongs to another run (run id %s, this run is %s)",
                            path, manifest.get("run_id"), run_id)
                continue
            tensors = {name[: -len(".safetensors")]: load_file(str(path / name)) for name in manifest["files"] if name.endswith(".safetensors")}
            state = json.loads((path / "state.json").read_text())
        except CorruptCheckpoint as err:
            log.warning("skipping corrupt checkpoint: %s", err)
            continue
        except (OSError, ValueError) as err:  # safetensors or JSON that verify passed but cannot be parsed
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        return int(manifest["round"]), tensors, state
    return None
