"""A frozen linear layer over a GGUF's own blocks (hetlora.models.quantised): every block type dequantises to the
values of the gguf package's reference dequantiser, the layer computes the dense layer's function and input gradient,
and autograd keeps no dense weight."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hetlora.models import quantised as blocks_module
from ..helpers import lora_logits_and_grads
from hetlora.models.quantised import BLOCKS, NAMES, QuantisedLinear, dequantise, row_bytes

SIMPLE = [blocks_module.Q4_0, blocks_module.Q4_1, blocks_module.Q5_0, blocks_module.Q5_1, blocks_module.Q8_0]  # gguf can quantise these
K_QUANTS = [blocks_module.Q2_K, blocks_module.Q3_K, blocks_module.Q4_K, blocks_module.Q5_K, blocks_module.Q6_K]
SCALE_OFFSETS = {blocks_module.Q2_K: [80, 82], blocks_module.Q3_K: [108], blocks_module.Q4_K: [0, 2], blocks_module.Q5_K: [0, 2],
                 blocks_module.Q6_K: [208]}  # where each K block keeps its fp16 super-scales


def quantised(ggml_type: int, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Blocks of a random weight: quantised by the gguf package where it can, else random bytes with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    if ggml_type in SIMPLE:
        weight = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05
        return quants.quantize(weight, GGMLQuantizationType(ggml_type))
    per_block, size = BLOCKS[ggml_type]
    blocks = rng.integers(0, 256, (out_features * in_features // per_block, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[ggml_type]:
        blocks[:, offset : offset + 2] = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(out_features, -1)


def reference(blocks: np.ndarray, ggml_type: int) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType(ggml_type)).astype(np.float32))


@pytest.mark.parametrize("ggml_type", SIMPLE + K_QUANTS, ids=lambda t: NAMES[t])
def test_every_block_type_dequantises_to_the_gguf_reference(ggml_type):
    in_features = 2 * BLOCKS[ggml_type][0]
    blocks = quantised(ggml_type, 6, in_features)
    assert blocks.shape == (6, row_bytes(ggml_type, in_features))
    ours = dequantise(torch.from_numpy(blocks), ggml_type, in_features)
    expected = reference(blocks, ggml_type)
    assert ours.shape == expected.shape == (6, in_features) and expected.abs().max() > 0
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-7), float((ours - expected).abs().max())


@pytest.mark.parametrize("ggml_type", [blocks_module.Q4_0, blocks_module.Q5_0, blocks_module.Q8_0, blocks_module.Q4_K, blocks_module.Q6_K],
                         ids=lambda t: NAMES[t])
def test_the_layer_is_the_dense_layer_in_its_output_and_its_input_gradient(ggml_type, monkeypatch):
    monkeypatch.setattr(blocks_module, "CHUNK_VALUES", 3 * 256)  # several row chunks, as in a big layer
    in_features, out_features = 256, 10
    blocks = quantised(ggml_type, out_features, in_features, seed=1)
    bias = torch.randn(out_features)
    layer = QuantisedLinear(torch.from_numpy(blocks), ggml_type, in_features, bias)
    dense = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.copy_(reference(blocks, ggml_type))
        dense.bias.copy_(bias)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, in_features, generator=g).requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    probe = torch.randn(2, 3, out_features, generator=g)
    (layer(x) * probe).sum().backward()
    (dense(x_dense) * probe).sum().backward()
    # fp32 sums in another order (a chunk of rows at a time): within a few ulps of the sum of |terms|
    w = dense.weight.detach().abs()
    out_scale, grad_scale = float((x.detach().abs() @ w.T).max()), float((probe.abs() @ w).max())
    assert torch.allclose(layer(x), dense(x_dense), rtol=0, atol=1e-6 * out_scale)
    assert torch.allclose(x.grad, x_dense.grad, rtol=0, atol=1e-6 * grad_scale)
    assert torch.equal(layer.dense_weight(), dense.weight.detach())
    assert not any(p.requires_grad for p in layer.parameters()) and layer.blocks.dtype == torch.uint8


def test_lora_over_the_blocks_gets_the_gradients_lora_over_the_dense_layer_gets():
    """What training needs: a LoRA branch beside the frozen quantised layer learns exactly as beside the dense one."""
    in_features, out_features, rank = 64, 32, 4
    blocks = torch.from_numpy(quantised(blocks_module.Q4_1, out_features, in_features, seed=2))
    layer = QuantisedLinear(blocks, blocks_module.Q4_1, in_features)
    weight = layer.dense_weight()
    g = torch.Generator().manual_seed(3)
    a0, b0 = torch.randn(rank, in_features, generator=g) * 0.1, torch.randn(out_features, rank, generator=g) * 0.1
    x = torch.randn(5, in_features, generator=g)
    grads = []
    for base in (layer, lambda t: t @ weight.T):
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        hidden = base(x) + (x @ a.T) @ b.T
        (hidden.tanh() @ torch.ones(out_features)).sum().backward()
        grads.append((a.grad, b.grad))
    for ours, dense in zip(*grads):
        assert torch.allclose(ours, dense, rtol=1e-5, atol=1e-7)


def test_autograd_keeps_the_blocks_not_a_dense_weight():
    in_features, out_features = 256, 48
    layer = QuantisedLinear(torch.from_numpy(quantised(blocks_module.Q4_K, out_features, in_features)), blocks_module.Q4_K, in_features)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, in_features, requires_grad=True)).sum()
    assert saved and all(t.dtype == torch.uint8 or t.numel() < out_features * in_features for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < out_features * in_features  # < 1 byte a weight


@pytest.mark.parametrize("blocks, ggml_type, in_features, message", [
    (torch.zeros(4, 18, dtype=torch.uint8), 99, 32, "not a supported base type"),
    (torch.zeros(4, 18, dtype=torch.uint8), blocks_module.Q4_0, 48, "multiples of 32"),
    (torch.zeros(4, 20, dtype=torch.uint8), blocks_module.Q4_0, 32, "take 18 bytes"),
    (torch.zeros(4, 18), blocks_module.Q4_0, 32, "uint8"),
])
def test_blocks_that_cannot_be_a_layer_are_one_clear_error(blocks, ggml_type, in_features, message):
    with pytest.raises(ValueError, match=message):
        QuantisedLinear(blocks, ggml_type, in_features)


def test_the_lora_bank_trains_over_quantised_layers_as_over_their_dequantised_weights():
    """A model whose target layers are in Q8_0 blocks: the LoRA bank attaches to them, and the logits and one step's
    LoRA gradients are those of the same model with the dequantised weights as dense layers."""
    from hetlora.device.lora import find_targets, lora_init, target_shapes
    from hetlora.models.loading import load_base_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    quantised_model, _ = load_base_model("tiny")
    dense_model, _ = load_base_model("tiny")
    for path, linear in find_targets(quantised_model, targets).items():
        parent, name = path.rsplit(".", 1)
        layer = QuantisedLinear.from_linear(linear, blocks_module.Q8_0)
        setattr(quantised_model.get_submodule(parent), name, layer)
        with torch.no_grad():
            dense_model.get_submodule(path).weight.copy_(layer.dense_weight())
    assert all(isinstance(m, QuantisedLinear) for m in find_targets(quantised_model, targets).values())
    g = torch.Generator().manual_seed(5)
    adapter = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lora_init(target_shapes(dense_model, targets), 3, 0).items()}
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    (q_logits, q_grads), (d_logits, d_grads) = (lora_logits_and_grads(m, adapter, ids, targets, 3) for m in (quantised_model, dense_model))
    assert torch.allclose(q_logits, d_logits, rtol=1e-4, atol=1e-5)
    for ours, dense in zip(q_grads, d_grads):
        assert ours.abs().sum() > 0 and torch.allclose(ours, dense, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ggml_type", [blocks_module.Q8_0, blocks_module.Q4_K], ids=lambda t: NAMES[t])
def test_the_cross_entropy_over_a_head_in_blocks_is_the_dense_cross_entropy(ggml_type, monkeypatch):
    """Losses and grad_h of the vocabulary-chunked cross-entropy equal F.cross_entropy over the dense logits, with
    the vocabulary in several chunks (some targets in each, and the log-sum-exp carried across them)."""
    from hetlora.models.quantised import block_cross_entropy

    monkeypatch.setattr(blocks_module, "LOGIT_VALUES", 7 * 40)  # 40 tokens: 7 vocabulary rows a chunk, 12 chunks
    vocab, hidden_size, tokens = 80, 256, 40
    head = QuantisedLinear(torch.from_numpy(quantised(ggml_type, vocab, hidden_size, seed=6)), ggml_type, hidden_size)
    g = torch.Generator().manual_seed(9)
    hidden = (torch.randn(tokens, hidden_size, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    weights = torch.rand(tokens, generator=g)
    ours = block_cross_entropy(head, hidden, labels)
    expected = torch.nn.functional.cross_entropy(reference_hidden @ head.dense_weight().T, labels, reduction="none")
    (ours * weights).sum().backward()
    (expected * weights).sum().backward()
    assert len(blocks_module.vocab_chunks(vocab, hidden_size, tokens)) == 12
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(hidden.grad, reference_hidden.grad, rtol=1e-4, atol=1e-6 * float(reference_hidden.grad.abs().max()))
