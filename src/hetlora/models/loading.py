"""Base models and tokenizers: SmolLM2-135M-Instruct (from its GGUF cache), a tiny test model, any GGUF file
(``PATH.gguf``), a fetched packaged GGUF (:data:`hetlora.models.packaged.PACKAGED`), or any local HF model.

A model from a GGUF loads with its frozen weights dense or in the GGUF's own blocks (``base``, docs/algorithm.md
§7.1). Nothing downloads unless ``HETLORA_ALLOW_DOWNLOAD=1``; every loaded model's eos is checked against its
tokenizer's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .gguf_cache import cached_tokenizer, smollm2_dir, smollm2_gguf_path, smollm2_tokenizer_dir
from .gguf_model import load_gguf_model, load_gguf_tokenizer
from .packaged import PACKAGED, packaged_path

TINY_SEED = 1234  # the tiny test model's weights: the same for every call
#: the attribute load_base_model sets on a model loaded from safetensors files: (the files, each parameter as loaded)
WEIGHTS_FILES = "hetlora_weights_files"


def local_only() -> bool:
    """Never reach for a model hub (it would retry for most of a minute offline) unless allowed."""
    return os.environ.get("HETLORA_ALLOW_DOWNLOAD") != "1"


def gguf_source(name: str) -> Path | None:
    """The GGUF file a model name comes from (None: not from a GGUF): smollm2's packaged file, a
    ``.gguf`` path, or a fetched packaged model (an unfetched one is an error saying how to fetch it)."""
    if name == "smollm2":
        return smollm2_gguf_path()
    if name in PACKAGED:
        return packaged_path(name)
    if name.endswith(".gguf"):
        return Path(name)
    return None


def from_gguf(name: str) -> bool:
    """Whether ``name`` is a model that comes from a GGUF file (without looking for the file)."""
    return name == "smollm2" or name in PACKAGED or name.endswith(".gguf")


def load_tokenizer(name: str = "smollm2"):
    from transformers import AutoTokenizer

    if name != "smollm2" and from_gguf(name):
        tokenizer = load_gguf_tokenizer(gguf_source(name))
    elif name == "smollm2":
        tokenizer = cached_tokenizer(smollm2_dir())
    elif name == "tiny":
        tokenizer = cached_tokenizer(smollm2_tokenizer_dir())
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only())
        except OSError as err:
            raise ValueError(
                f"cannot load the tokenizer of {name!r}: not a local model directory and not in the local Hugging Face "
                f"cache ({err.__class__.__name__}); hetlora does not download models unless HETLORA_ALLOW_DOWNLOAD=1"
            ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(vocab_size: int, pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None):
    """A 2-layer random-initialised Llama, identical for every call (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(config)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def check_special_tokens(model, tokenizer, name: str) -> None:
    """The tokenizer's eos must be the model's eos (config and generation config), for any model.

    A mismatch silently trains and scores the wrong end of turn, so it is an error.
    """
    eos = tokenizer.eos_token_id
    for where, config in (("config", model.config), ("generation_config", getattr(model, "generation_config", None))):
        ids = _ids(getattr(config, "eos_token_id", None)) if config is not None else set()
        if ids and eos not in ids:
            raise ValueError(
                f"model {name!r}: the tokenizer's eos token {tokenizer.eos_token!r} (id {eos}) is not the model "
                f"{where}'s eos_token_id {sorted(ids)}; fix the tokenizer or the model config before training"
            )


def load_base_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, tokenizer=None, base: str = "dense"):
    """``(model, tokenizer)`` for ``smollm2`` (default), ``tiny``, a GGUF (path or packaged name), or an HF model id /
    local path. ``base``: ``dense`` frozen weights, or ``gguf`` — kept in the GGUF's own blocks (a model from a GGUF only).

    Pass ``tokenizer`` (from :func:`load_tokenizer`) when you already have it.
    """
    if base not in ("dense", "gguf"):
        raise ValueError(f"base weights {base!r}: choose dense or gguf")
    if base == "gguf" and not from_gguf(name):
        raise ValueError(f"base weights gguf need a model from a GGUF file (smollm2, a .gguf path or one of "
                         f"{', '.join(PACKAGED)}); {name!r} is not one")
    tokenizer = tokenizer or load_tokenizer(name)
    if name == "tiny":
        model = tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id).to(dtype)
    elif name == "smollm2" and base == "dense":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype)
        _note_weights_files(model, smollm2_dir())
    elif from_gguf(name):
        model = load_gguf_model(gguf_source(name), base, dtype)
    else:
        model = _hub_model(name, dtype)
    check_special_tokens(model, tokenizer, name)
    model.config.use_cache = False
    return model, tokenizer


def _hub_model(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only())
    except OSError as err:
        raise ValueError(
            f"cannot load model {name!r}: not smollm2/tiny, not a GGUF, not a local model directory, "
            f"and not in the local Hugging Face cache ({err.__class__.__name__}); hetlora does not download "
            f"models unless HETLORA_ALLOW_DOWNLOAD=1"
        ) from err
    if Path(name).is_dir():
        _note_weights_files(model, Path(name))
    return model


def _note_weights_files(model, directory: Path) -> None:
    """Remember the safetensors files ``model`` was just loaded from, and each parameter as loaded (storage and
    version counter), so :func:`read_weights` reads only parameters nobody changed since. A quantised checkpoint
    (its file values are not the parameters') is not noted."""
    if getattr(model.config, "quantization_config", None) is not None:
        return
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        return
    setattr(model, WEIGHTS_FILES, (files, {n: _as_loaded(p) for n, p in model.named_parameters()}))


def _as_loaded(parameter: torch.Tensor) -> tuple[int, int]:
    return parameter.data_ptr(), parameter._version


def read_weights(model, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parameters ``names`` of ``model`` read afresh from the safetensors files it was loaded from, each cast
    to ``dtype`` as it is read ({} for a model not loaded from such files by :func:`load_base_model`).

    Why (docs/algorithm.md §7.1): ``from_pretrained`` maps the files into memory and reads pages only when
    touched. Converting the mapped fp32 weights to bf16 in memory touched every page, and the mapping stayed
    resident beside the bf16 copies, held by the embedding (SmolLM2: +405 MB). Read with ``pread``, one tensor
    at a time, the bf16 weights cost their own size and the map's pages are never touched. Only parameters still
    as loaded (same storage, no in-place change since) are read; a name, or a shape, the files lack is left out.
    """
    from safetensors import safe_open

    files, loaded = getattr(model, WEIGHTS_FILES, ([], {}))
    parameters = dict(model.named_parameters())
    wanted = {n for n in names if n in parameters and loaded.get(n) == _as_loaded(parameters[n])}
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as reader:
            for key in wanted & set(reader.keys()):
                found[key] = reader.get_tensor(key).to(dtype)
    return {k: v for k, v in found.items() if v.shape == parameters[k].shape}
