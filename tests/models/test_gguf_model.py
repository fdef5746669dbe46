"""Any GGUF model (hetlora.models.gguf_model), on GGUFs the tests write themselves (tests/models/gguf_files.py):
a float GGUF loads as the very model it was written from (names, llama's Q/K permutation, Gemma's norms, tied heads);
for every block type, the base kept in blocks and the dense base compute the same logits and the same LoRA
gradients, and the dense base holds the gguf package's own dequantisation of the blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hetlora.device.lora import find_targets, lora_init, target_shapes
from hetlora.models.gguf_model import load_gguf_model
from hetlora.models.loading import load_base_model, load_tokenizer
from hetlora.models.quantised import QuantisedEmbedding, QuantisedLinear

from ..helpers import lora_logits_and_grads
from .gguf_files import smollm2_tokenizer_fields, tiny_hf_model, write_gguf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 300, 410, 17, 9, 220, 31, 8], [42, 7, 7, 1000, 12, 5, 600, 90]])


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False), ("gemma3", True)])
def test_a_float_gguf_loads_as_the_model_it_was_written_from(arch, tied, tmp_path):
    original = tiny_hf_model(arch, tied=tied)
    path = write_gguf(original, arch, tmp_path / f"{arch}.gguf")
    for base in ("dense", "gguf"):  # F32 tensors are dense in either
        loaded = load_gguf_model(path, base)
        ours, theirs = loaded.state_dict(), original.state_dict()
        assert set(ours) == set(theirs)
        for name, value in theirs.items():
            assert torch.allclose(ours[name], value, rtol=0, atol=1e-6), name
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=IDS).logits, original(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


CASES = [("llama", t, 64) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")] + [
    ("llama", "Q4_K", 256), ("qwen2", "Q6_K", 256), ("qwen2", "Q5_0", 64), ("gemma3", "Q8_0", 64), ("gemma3", "Q2_K", 256),
    ("qwen2", "Q3_K", 256), ("llama", "Q5_K", 256)]


@pytest.mark.parametrize("arch, type_name, hidden", CASES, ids=[f"{a}-{t}" for a, t, _ in CASES])
def test_the_block_base_and_the_dense_base_compute_the_same_function(arch, type_name, hidden, tmp_path):
    ggml_type = int(GGMLQuantizationType[type_name])
    path = write_gguf(tiny_hf_model(arch, hidden=hidden, inter=hidden), arch, tmp_path / "m.gguf", ggml_type)
    blocks_model, dense_model = load_gguf_model(path, "gguf"), load_gguf_model(path, "dense")
    assert all(isinstance(m, QuantisedLinear) for m in find_targets(blocks_model, TARGETS).values())
    assert isinstance(blocks_model.get_input_embeddings(), QuantisedEmbedding)
    assert isinstance(blocks_model.get_output_embeddings(), QuantisedLinear)
    assert not any(isinstance(m, (QuantisedLinear, QuantisedEmbedding)) for m in dense_model.modules())
    g = torch.Generator().manual_seed(11)
    adapter = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lora_init(target_shapes(dense_model, TARGETS), 3, 0).items()}
    (q_logits, q_grads), (d_logits, d_grads) = (lora_logits_and_grads(m, adapter, IDS, TARGETS, 3) for m in (blocks_model, dense_model))
    scale = float(d_logits.abs().max())
    assert scale > 0 and torch.allclose(q_logits, d_logits, rtol=0, atol=2e-6 * scale)
    for ours, dense in zip(q_grads, d_grads):
        assert float(dense.abs().max()) > 0
        assert torch.allclose(ours, dense, rtol=0, atol=2e-5 * float(dense.abs().max()))


def test_the_dense_base_holds_the_gguf_packages_dequantisation_of_the_blocks(tmp_path):
    """Independent of the loader: quantisation is per row, so llama's row permutation commutes with it, and the
    loaded q_proj must be the gguf package's dequantise(quantise(W)) of the original weight in transformers' order."""
    original = tiny_hf_model("llama")
    path = write_gguf(original, "llama", tmp_path / "q8.gguf", int(GGMLQuantizationType.Q8_0))
    loaded = load_gguf_model(path, "dense")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        weight = original.get_parameter(name).detach().numpy()
        expected = quants.dequantize(quants.quantize(weight, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        assert torch.equal(loaded.get_parameter(name), torch.from_numpy(expected.astype(np.float32))), name


def test_a_gguf_model_name_loads_with_the_tokenizer_its_metadata_names(tmp_path):
    path = write_gguf(tiny_hf_model("qwen2"), "qwen2", tmp_path / "tok.gguf", int(GGMLQuantizationType.Q8_0))
    tokenizer = load_tokenizer(str(path))
    fields = smollm2_tokenizer_fields()
    assert tokenizer.eos_token_id == fields["eos"] and tokenizer.eos_token == fields["tokens"][fields["eos"]]
    model, tok = load_base_model(str(path), base="gguf", tokenizer=tokenizer)
    assert model.config.eos_token_id == tok.eos_token_id and isinstance(model.get_input_embeddings(), QuantisedEmbedding)
    dense, _ = load_base_model(str(path), base="dense", tokenizer=tokenizer)
    assert isinstance(dense.get_input_embeddings(), torch.nn.Embedding)


def test_a_gguf_of_another_architecture_is_refused_naming_it(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), "llama", tmp_path / "other.gguf", gguf_arch="starcoder2")
    with pytest.raises(ValueError, match="architecture 'starcoder2' is not one hetlora can build"):
        load_gguf_model(path)


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path):
    model = tiny_hf_model("llama")
    model.config.intermediate_size = 128  # the metadata will say 128; the tensors are 96 wide
    path = write_gguf(model, "llama", tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match=r"tensor 'blk\.\d\.ffn_\w+\.weight' has shape"):
        load_gguf_model(path)


def test_what_is_not_a_gguf_or_not_from_one_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError):
        load_gguf_model(junk)
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="base weights gguf need a model from a GGUF file"):
        load_base_model("tiny", base="gguf")
    with pytest.raises(ValueError, match="choose one of dense, gguf"):
        load_gguf_model(junk, "int4")
