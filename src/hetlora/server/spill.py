"""Where a bounded streamed round's or a module-wise round's updates wait for their second pass: safetensors files
in a temporary directory (docs/algorithm.md §7.2), so the server's memory holds one update, or one module, at a time.

Each update is written once as it arrives. A weighted-sum round reads it back once and deletes its file; a
module-wise round reads one module of every update at a time (``pread``, no memory map: pages of a mapped file
would stay resident). The directory goes when the round ends, whatever happened. ``TMPDIR`` chooses the disk (it
needs the round's upload bytes).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.adapter import ClientUpdate

MAX_OPEN_READERS = 512  # files a module-wise round keeps open (reading a module costs 0.05 ms open, 0.7 ms to open),
# and never more than a quarter of the process's file limit (Flower's sockets need theirs)


def _open_reader_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN_READERS if soft == resource.RLIM_INFINITY else min(MAX_OPEN_READERS, soft // 4)


class SpillStore:
    """A :class:`hetlora.methods.streaming.ReplyStore` on disk; use it as a context manager."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._meta: dict[int, ClientUpdate] = {}
        self._readers: dict[int, object] = {}
        self._max_readers = _open_reader_limit()  # once: a round reads K × modules times

    def __enter__(self) -> "SpillStore":
        self.directory = Path(tempfile.mkdtemp(prefix="hetlora-spill-"))
        return self

    def __exit__(self, *exc) -> None:
        for reader in self._readers.values():
            reader.__exit__(None, None, None)
        self._readers.clear()
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

    def read(self, index: int, keys: list[str]) -> dict[str, Tensor]:
        """Some of a stored update's tensors; the update stays stored (a module-wise round reads it a module at a time)."""
        reader = self._readers.get(index)
        if reader is not None:
            return {key: reader.get_tensor(key) for key in keys}
        reader = safe_open(str(self._path(index)), framework="pt", device="cpu", backend="pread")
        if len(self._readers) < self._max_readers:
            self._readers[index] = reader
            return {key: reader.get_tensor(key) for key in keys}
        with reader:
            return {key: reader.get_tensor(key) for key in keys}
