"""Any GGUF model as a transformers model, its frozen weights in the GGUF's own blocks or dense (docs/algorithm.md §7.1).

``base="gguf"``: every linear layer and the embedding table whose tensor is of a block type
(:data:`hetlora.models.quantised.SUPPORTED`) stays in those blocks (:class:`QuantisedLinear`,
:class:`QuantisedEmbedding`), so the process holds the model at the GGUF's size, not dense; a tied LM head
shares the embedding's blocks. ``base="dense"``: the same blocks dequantised by the same code, so both bases
compute the same function (tested). Norms, biases and float tensors are dense in either.

The architecture comes from the GGUF's metadata; transformers builds its config (``AutoConfig`` with
``gguf_file``), the model skeleton is made without allocating its weights, and transformers' own
name map and tensor processors (llama's Q/K rows, which llama.cpp stores permuted for its rope; Gemma's
norms stored +1) put each GGUF tensor where transformers expects it. A row permutation moves whole rows of
blocks, so it applies to blocks as to dense rows. Architectures other than :data:`ARCHITECTURES` are refused.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .gguf_cache import cache_dir, cached_tokenizer, ensure_cache, gguf_tokenizer
from .quantised import SUPPORTED, QuantisedEmbedding, QuantisedLinear, dequantise

ARCHITECTURES = ("llama", "qwen2", "gemma3")  # built, trained and exported here (tested on written GGUFs)
BASES = ("dense", "gguf")
FLOAT_TYPES = {0: np.float32, 1: np.float16}  # GGML_TYPE_F32, F16; BF16 (30) is read as raw bits below
BF16 = 30
TENSOR_INDEX = "gguf-tensors.json"
PREPARED_FILES = ("config.json", TENSOR_INDEX, "tokenizer.json", "tokenizer_config.json")


def prepared(path: Path) -> Path:
    """The GGUF's cache directory: transformers' config, the tokenizer (special tokens from the metadata) and
    an index of the tensors (name, type, shape, byte offset), built once per file (verified by its SHA-256).

    Reading a GGUF's metadata costs what its tokenizer costs: for Qwen2.5 (151,936 tokens) the gguf package's
    reader took 16 s and 520 MB, transformers' config reader 24 s and 0.7 GB more. A device client reads the
    index instead and maps the tensors straight from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    target, _ = ensure_cache(cache_dir() / f"gguf-{path.stem}-{tag}", path, partial(_build, path), PREPARED_FILES)
    return target


def _build(gguf: Path, tmp: Path, special: dict) -> None:
    from gguf import GGUFReader
    from transformers import AutoConfig

    reader = GGUFReader(gguf)
    field = reader.fields.get("general.architecture")
    arch = str(field.contents()) if field is not None else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf.name}: GGUF architecture {arch!r} is not one hetlora can build and export "
                         f"({', '.join(ARCHITECTURES)})")
    index = {"architecture": arch, "tensors": [
        {"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape.tolist()],
         "offset": int(t.data_offset), "bytes": int(t.n_bytes), "rows": list(t.data.shape)}
        for t in reader.tensors]}
    del reader
    (tmp / TENSOR_INDEX).write_text(json.dumps(index))
    AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    gguf_tokenizer(gguf, special).save_pretrained(tmp)


def load_gguf_tokenizer(path: Path):
    return cached_tokenizer(prepared(path))


def load_gguf_model(path: Path, base: str = "gguf", dtype: torch.dtype = torch.float32):
    """The GGUF at ``path`` as a transformers causal LM (eval mode, no grads), its frozen weights per ``base``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if base not in BASES:
        raise ValueError(f"base weights {base!r}: choose one of {', '.join(BASES)}")
    path = Path(path)
    directory = prepared(path)
    index = json.loads((directory / TENSOR_INDEX).read_text())
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):  # parameters on "meta"; rope tables etc. computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    dense, blocks = _read_tensors(path, index, model, modules, base, dtype)
    _place_blocks(model, modules, blocks, dense, dtype)
    model.load_state_dict(dense, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise ValueError(f"{path.name}: the GGUF holds no tensor for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    model.requires_grad_(False)
    return model.eval()


def _read_tensors(path: Path, index: dict, model, modules: dict, base: str, dtype: torch.dtype):
    """``(dense, blocks)``: each GGUF tensor checked against the skeleton's shape, placed by transformers' name map
    and processor, and kept dense (parameter name -> values) or in blocks (module path -> (blocks, type))."""
    names, processor = _name_map(model, index["architecture"], model.config)
    dense: dict[str, torch.Tensor] = {}
    blocks: dict[str, tuple[torch.Tensor, int]] = {}
    for tensor in index["tensors"]:
        if tensor["name"] not in names:
            raise ValueError(f"{path.name}: tensor {tensor['name']!r} has no place in a transformers {index['architecture']} model")
        hf_name = names[tensor["name"]]
        expected = tuple(model.get_parameter(hf_name).shape)
        if tuple(reversed(tensor["shape"])) != expected:
            raise ValueError(f"{path.name}: tensor {tensor['name']!r} has shape {tuple(reversed(tensor['shape']))}, "
                             f"a transformers {index['architecture']} model with this config expects {expected}")
        owner, leaf = hf_name.rsplit(".", 1)
        kind = tensor["type"]
        rows = processor.process(_read(path, tensor), tensor["name"]).weights
        if base == "gguf" and leaf == "weight" and kind in SUPPORTED and isinstance(modules[owner], (nn.Linear, nn.Embedding)):
            blocks[owner] = (torch.from_numpy(np.ascontiguousarray(rows)), kind)
        else:
            dense[hf_name] = _dense(rows, kind, tensor["shape"], dtype)
    return dense, blocks


def _read(path: Path, tensor: dict) -> np.ndarray:
    """One tensor's data copied out of the file: ``[rows, bytes per row]`` blocks, or values in numpy's order."""
    raw = np.fromfile(path, dtype=np.uint8, count=tensor["bytes"], offset=tensor["offset"])
    if tensor["type"] in FLOAT_TYPES:
        raw = raw.view(FLOAT_TYPES[tensor["type"]])
    elif tensor["type"] == BF16:
        raw = raw.view(np.int16)
    return raw.reshape(tensor["rows"])


def _name_map(model, arch: str, config) -> tuple[dict[str, str], object]:
    """GGUF tensor name -> transformers parameter name, and transformers' tensor processor for ``arch``."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    return get_gguf_hf_weights_map(model, processor), processor


def _dense(rows: np.ndarray, kind: int, ggml_shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor as dense values of ``dtype`` in transformers' shape (ggml lists dimensions innermost first)."""
    shape = tuple(reversed(ggml_shape))
    if kind in SUPPORTED:
        values = dequantise(torch.from_numpy(np.ascontiguousarray(rows)), kind, shape[-1], torch.float32)
    elif kind in FLOAT_TYPES:
        values = torch.from_numpy(np.ascontiguousarray(rows).astype(np.float32))
    elif kind == BF16:
        values = torch.from_numpy(np.ascontiguousarray(rows).view(np.int16)).view(torch.bfloat16).float()
    else:
        from gguf import GGMLQuantizationType, dequantize

        values = torch.from_numpy(dequantize(rows, GGMLQuantizationType(kind)).astype(np.float32))
    return values.reshape(shape).to(dtype)


def _place_blocks(model, modules: dict, blocks: dict, dense: dict, dtype: torch.dtype) -> None:
    """Swap each block-stored layer for its quantised module; a tied head shares the embedding's blocks."""
    for owner, (data, kind) in blocks.items():
        old = modules[owner]
        if isinstance(old, nn.Embedding):
            new = QuantisedEmbedding(data, kind, old.embedding_dim, float(getattr(old, "scalar_embed_scale", 1.0)), dtype)
        else:
            new = QuantisedLinear(data, kind, old.in_features, dense.pop(owner + ".bias", None))
        _set_module(model, owner, new)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, QuantisedEmbedding) and head is not None and getattr(head, "weight", None) is not None and head.weight.is_meta:
        model.set_output_embeddings(embedding.head())  # tied: logits = h Eᵀ over the same blocks
        model.config.tie_word_embeddings = False  # nothing left to tie; a later tie_weights() must not try


def _set_module(model, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
