"""GGUF files written by the tests themselves: a tiny random llama, qwen2 or gemma3 stored as llama.cpp stores a
model (its tensor names, llama's Q/K rows permuted for rope, Gemma's norms +1), each linear weight in a chosen
block type, the tokenizer copied from SmolLM2's GGUF. The writer is independent of the loader under test: it
uses the gguf package's writer and name tables and llama.cpp's conversion rules, not hetlora's reading code."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, MODEL_ARCH_NAMES, get_tensor_name_map, quants

from hetlora.models.gguf_cache import smollm2_gguf_path

F32 = int(GGMLQuantizationType.F32)
LAYERS, HEADS, KV_HEADS = 2, 4, 2
VOCAB = 1024  # SmolLM2's first 1,024 tokens (its bytes and first merges): every GGUF read costs what its tokenizer costs


@lru_cache(maxsize=1)
def smollm2_tokenizer_fields() -> dict:
    """SmolLM2's tokenizer metadata cut to its first :data:`VOCAB` tokens and the merges among them."""
    reader = GGUFReader(smollm2_gguf_path())
    get = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens = get("tokenizer.ggml.tokens")[:VOCAB]
    known = set(tokens)
    merges = [m for m in get("tokenizer.ggml.merges") if (parts := m.split(" ")) and len(parts) == 2
              and parts[0] in known and parts[1] in known and parts[0] + parts[1] in known]
    return {"model": get("tokenizer.ggml.model"), "pre": get("tokenizer.ggml.pre"), "tokens": tokens,
            "types": get("tokenizer.ggml.token_type")[:VOCAB], "merges": merges,
            "bos": get("tokenizer.ggml.bos_token_id"), "eos": get("tokenizer.ggml.eos_token_id"),
            "pad": get("tokenizer.ggml.padding_token_id"), "template": get("tokenizer.chat_template")}


def tiny_hf_model(arch: str, tied: bool = True, hidden: int = 64, inter: int = 96, seed: int = 7):
    """A random 2-layer model of ``arch`` whose vocabulary is SmolLM2's (every setting a GGUF carries, the rest default).
    K-quant blocks hold 256 values: use ``hidden = inter = 256`` for them."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = smollm2_tokenizer_fields()
    common = dict(vocab_size=len(tok["tokens"]), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, bos_token_id=tok["bos"], eos_token_id=tok["eos"], pad_token_id=tok["pad"])
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM, {}), "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
             "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 256, "sliding_window": 64})}  # head_dim = query_pre_attn_scalar, as llama.cpp assumes
    config_class, model_class, extra = kinds[arch]
    config = config_class(**common, **extra)
    if arch != "gemma3":  # Gemma 3 keeps a rope per attention type (its defaults, full attention's θ in the GGUF)
        config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong placement shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _llamacpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (Q/K rows reordered for its rope)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _blocks(weight: np.ndarray, ggml_type: int, seed: int) -> np.ndarray:
    """``weight`` in ``ggml_type`` blocks: quantised by the gguf package, or for the K types (which it cannot
    write) random blocks with small fp16 super-scales (what matters is that both loader paths read the same blocks)."""
    kind = GGMLQuantizationType(ggml_type)
    try:
        return quants.quantize(weight, kind)
    except NotImplementedError:
        from gguf.constants import GGML_QUANT_SIZES

        per_block, size = GGML_QUANT_SIZES[kind]
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, 256, (weight.size // per_block, size), dtype=np.uint8)
        offsets = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind.name]
        scales = rng.random((blocks.shape[0], 1)) + 0.5
        spread = float(quants.dequantize(_with_scales(blocks, offsets, scales), kind).std())
        return _with_scales(blocks, offsets, scales * 0.05 / spread).reshape(weight.shape[0], -1)  # weights of std ≈ 0.05


def _with_scales(blocks: np.ndarray, offsets: list[int], scales: np.ndarray) -> np.ndarray:
    for offset in offsets:
        blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks


def write_gguf(model, arch: str, path: Path, ggml_type: int = F32, gguf_arch: str | None = None) -> Path:
    """``model`` as llama.cpp would store it, its 2-D linear and embedding weights in ``ggml_type`` blocks."""
    cfg, tok = model.config, smollm2_tokenizer_fields()
    writer = GGUFWriter(path, gguf_arch or arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(tok["bos"])
    writer.add_eos_token_id(tok["eos"])
    writer.add_pad_token_id(tok["pad"])
    writer.add_chat_template(tok["template"])
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for i, (hf_name, tensor) in enumerate(model.state_dict().items()):
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        values = tensor.detach().float().numpy().copy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            values = _llamacpp_permute(values, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values + 1.0
        if values.ndim == 2 and ggml_type != F32:
            writer.add_tensor(name, _blocks(values, ggml_type, seed=i), raw_dtype=GGMLQuantizationType(ggml_type))
        else:
            writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
