"""Exported GGUF adapters in a real llama.cpp agree with PEFT on the same base weights.

Needs the optional extra ``pip install -e ".[llamacpp]"`` (llama-cpp-python, built from source:
cmake and a C++ compiler); skipped without it. The base is SmolLM2's Q4_1 GGUF dequantised to
F32 (exactly the weights transformers loads from it), so both sides run the same model; the
adapter's effect on the next-token logits (with minus without) must agree within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory):
    from hetlora.export.gguf import dequantised_copy
    from hetlora.models.gguf_cache import smollm2_gguf_path

    return dequantised_copy(smollm2_gguf_path(), tmp_path_factory.mktemp("base") / "smollm2-f32.gguf")


@pytest.fixture(scope="module")
def smollm2():
    from hetlora.models.loading import load_base_model

    model, tok = load_base_model("smollm2")
    model.eval()
    return model, tok


def random_adapter(model, rank: int, seed: int):
    from hetlora.config import DEFAULT_TARGETS
    from hetlora.device.lora import lora_init, target_shapes

    g = torch.Generator().manual_seed(seed)
    init = lora_init(target_shapes(model, DEFAULT_TARGETS), rank, seed)
    return {k: v if k.endswith("lora_A.weight") else 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()}


def llamacpp_logits(base, ids, adapter_path=None):
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter_path) if adapter_path else None, lora_scale=1.0,
                          n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    llm.close()
    return logits


@pytest.mark.parametrize("rank", [5, 50])
def test_llamacpp_applies_our_adapter_as_peft_does(smollm2, f32_base, tmp_path, rank):
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    from hetlora.config import DEFAULT_TARGETS
    from hetlora.export.gguf import GGUFNames, write_adapter
    from hetlora.device.lora import lora_config

    model, tok = smollm2
    adapter = random_adapter(model, rank, seed=rank)
    path = tmp_path / f"adapter-r{rank}.gguf"
    write_adapter(path, adapter, GGUFNames(model.config), scale=2.0)

    messages = [{"role": "user", "content": "How was your weekend? Did you go hiking?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
        peft_model = get_peft_model(model, lora_config(rank, 2.0, DEFAULT_TARGETS))
        set_peft_model_state_dict(peft_model, adapter)
        adapted = peft_model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
        peft_model.unload()
    assert not isinstance(model, PeftModel)
    base_cpp, lora_cpp = llamacpp_logits(f32_base, ids), llamacpp_logits(f32_base, ids, path)
    ours, theirs = adapted - plain, lora_cpp - base_cpp
    assert np.abs(ours).max() > 0.05  # the adapter does something
    assert np.abs(base_cpp - plain).max() < 1e-2  # same base weights
    diff = np.abs(theirs - ours).max()
    print(f"rank {rank}: adapter effect max |PEFT| {np.abs(ours).max():.4f}, max |llama.cpp - PEFT| {diff:.2e}, "
          f"base logits max |llama.cpp - torch| {np.abs(base_cpp - plain).max():.2e}")
    assert diff <= 1e-3, diff


ARCH_CASES = [("llama", "F32"), ("qwen2", "F32"), ("gemma3", "F32"), ("qwen2", "Q8_0"), ("gemma3", "Q8_0")]


@pytest.mark.parametrize("arch, type_name", ARCH_CASES, ids=[f"{a}-{t}" for a, t in ARCH_CASES])
def test_llamacpp_applies_our_adapter_on_each_exported_architecture_over_the_same_gguf(arch, type_name, tmp_path, monkeypatch):
    """Llama (q/k rows permuted), Qwen2 and Gemma 3 (not permuted), each written as a GGUF by the test
    (tests/models/gguf_files.py); hetlora's model is the GGUF's own blocks (base weights gguf) — the very file
    llama.cpp runs — and the adapter's effect on the last logits must agree."""
    from gguf import GGMLQuantizationType

    from hetlora.device.lora import LoRABank
    from hetlora.config import DEFAULT_TARGETS
    from hetlora.export.gguf import GGUFNames, write_adapter
    from hetlora.models.gguf_model import load_gguf_model
    from tests.models.gguf_files import tiny_hf_model, write_gguf

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    base = write_gguf(tiny_hf_model(arch), arch, tmp_path / f"{arch}.gguf", int(GGMLQuantizationType[type_name]))
    model = load_gguf_model(base, "gguf")
    adapter = random_adapter(model, 4, seed=3)
    path = tmp_path / "adapter.gguf"
    write_adapter(path, adapter, GGUFNames(model.config), scale=2.0)
    ids = [1, 200, 31, 415, 77, 9, 630, 12, 88, 5]
    bank = LoRABank(model, DEFAULT_TARGETS, slots=1, rank=4, scale=2.0)
    bank.load(0, adapter)
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
        with bank.use(1):
            adapted = model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
    base_cpp, lora_cpp = llamacpp_logits(base, ids), llamacpp_logits(base, ids, path)
    ours, theirs = adapted - plain, lora_cpp - base_cpp
    base_gap = np.abs(base_cpp - plain).max()
    print(f"{arch} {type_name}: adapter effect max {np.abs(ours).max():.4f}, |llama.cpp - ours| {np.abs(theirs - ours).max():.2e}, "
          f"base {base_gap:.2e}")
    assert np.abs(ours).max() > 0.05
    # llama.cpp multiplies Q8_0 weights by Q8_0-quantised activations: its base is close to ours, not equal, and the
    # adapter's effect must agree as well as the base does (a wrong layout would miss by the effect's own size)
    assert base_gap < (1e-3 if type_name == "F32" else 5e-2)
    assert np.abs(theirs - ours).max() <= (1e-3 if type_name == "F32" else max(1e-3, 3 * base_gap))
