"""Where a bounded streamed round's updates wait for their second pass: safetensors files in a temporary
directory (docs/algorithm.md §7.2), so the server's memory holds one update at a time.

Each update is written once as it arrives and read back once, then its file is deleted; the directory goes
when the round ends, whatever happened. ``TMPDIR`` chooses the disk (it needs the round's upload bytes).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..core.adapter import ClientUpdate


class SpillStore:
    """A :class:`hetlora.methods.streaming.ReplyStore` on disk; use it as a context manager."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._meta: dict[int, ClientUpdate] = {}

    def __enter__(self) -> "SpillStore":
        self.directory = Path(tempfile.mkdtemp(prefix="hetlora-spill-"))
        return self

    def __exit__(self, *exc) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        self._meta.clear()

    def _path(self, index: int) -> Path:
        if self.directory is None:
            raise RuntimeError("a SpillStore is used inside its with-block")
        return self.directory / f"{index:06d}.safetensors"

    def put(self, index: int, update: ClientUpdate) -> None:
        save_file({k: v.contiguous() for k, v in update.adapter.items()}, str(self._path(index)))
        self._meta[index] = replace(update, adapter={})

    def take(self, index: int) -> ClientUpdate:
        path = self._path(index)
        adapter = load_file(str(path))
        path.unlink()
        return replace(self._meta.pop(index), adapter=adapter)
