"""The client host: precision, the one LoRA wrap, frozen bf16 weights, the base delta."""

import math

import pytest
import torch

from hetlora.config import DEFAULT_TARGETS, RunConfig
from hetlora.device.host import ClientHost, resolve_precision
from hetlora.device.lora import lora_init, target_shapes


def host_for(tiny, data, precision, **kw):
    model, tok = tiny
    return ClientHost(RunConfig(model="tiny", device="cpu", precision=precision, **kw), model, tok, data)


def test_auto_precision_follows_the_hardware(monkeypatch):
    import hetlora.device.host

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hetlora.device.host, "native_bf16", lambda device, native=native: native)
        assert resolve_precision("auto", "cpu") == expected


@pytest.fixture
def shared_tiny(tiny):
    """The session's tiny model, put back as it was after the test even when it fails: fp32 weights,
    the same values, no hooks left by a LoRA bank."""
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield tiny
    for m in model.modules():
        m._forward_hooks.clear()
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.float()
    model.load_state_dict(state)


def trained_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_init(target_shapes(model, DEFAULT_TARGETS), 6, 1).items()}


def test_bf16_and_fp32_evaluation_of_one_adapter_agree_within_one_percent(shared_tiny, chitchat_small):
    model, _ = shared_tiny
    adapter = trained_adapter(model)
    losses = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for precision in ("fp32", "bf16"):
        host = host_for(shared_tiny, chitchat_small, precision, r_max=6)
        bank = host.bank()
        bank.load(0, adapter)
        with bank.use(1):
            losses[precision] = host.evaluate_loss()
        bank.remove()
        for m in model.modules():  # the fp32 run must not see the bf16 run's weights, nor the reverse
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.float()
        model.load_state_dict(state)
    assert math.exp(losses["bf16"]) == pytest.approx(math.exp(losses["fp32"]), rel=0.01)


def test_frozen_bf16_weights_give_the_numbers_of_bf16_autocast(shared_tiny, chitchat_small):
    """Storing frozen linear weights in bf16 is what autocast does to them on every forward."""
    from hetlora.data import collate
    from hetlora.device.evaluate import autocast, target_token_loss

    model, tok = shared_tiny
    batch = collate(chitchat_small.eval_examples()[:4], tok.pad_token_id)
    with torch.no_grad(), autocast("cpu", True):
        expected, _ = target_token_loss(model, batch)
    host = host_for(shared_tiny, chitchat_small, "bf16", r_max=6)
    host.bank()  # freezes the linear weights in bf16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.float32
    with torch.no_grad(), autocast("cpu", True):
        got, _ = target_token_loss(model, batch)
    assert float(got) == float(expected)


def test_base_delta_is_applied_to_pristine_weights_and_undone(shared_tiny, chitchat_small):
    from hetlora.core.adapter import A_SUFFIX, B_SUFFIX

    model, _ = shared_tiny
    host = host_for(shared_tiny, chitchat_small, "fp32", r_max=6, method="flora")
    key = next(iter(target_shapes(model, ["q_proj"])))
    w = dict(model.named_modules())[key.removeprefix("base_model.model.")].weight
    w0 = w.detach().clone()
    b, a = torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1])
    host.apply_base_delta({key + B_SUFFIX: b, key + A_SUFFIX: a}, version=1)
    torch.testing.assert_close(w, w0 + 2.0 * (b @ a))
    host.apply_base_delta({key + B_SUFFIX: b, key + A_SUFFIX: a}, version=1)  # same version: no second add
    torch.testing.assert_close(w, w0 + 2.0 * (b @ a))
    host.apply_base_delta({}, version=2)  # an empty delta restores the pristine weights
    torch.testing.assert_close(w, w0)


def test_a_device_client_applies_the_base_delta_in_place_without_pristine_copies(shared_tiny, chitchat_small):
    """A ClientApp host keeps no W0 copies: the first application is bit-identical to the pristine path,
    a second version takes the first off again (float rounding only), an empty delta restores W0."""
    from dataclasses import replace

    from hetlora.core.adapter import A_SUFFIX, B_SUFFIX

    model, tok = shared_tiny
    key = next(iter(target_shapes(model, ["q_proj"])))
    w = dict(model.named_modules())[key.removeprefix("base_model.model.")].weight
    w0 = w.detach().clone()
    g = torch.Generator().manual_seed(0)
    d1 = {key + B_SUFFIX: torch.randn(w.shape[0], 2, generator=g), key + A_SUFFIX: torch.randn(2, w.shape[1], generator=g)}
    d2 = {key + B_SUFFIX: torch.randn(w.shape[0], 3, generator=g), key + A_SUFFIX: torch.randn(3, w.shape[1], generator=g)}
    reference = host_for(shared_tiny, chitchat_small, "fp32", r_max=6, method="flora")
    reference.apply_base_delta(d1, version=1)
    expected = w.detach().clone()
    reference.apply_base_delta({}, version=0)
    assert torch.equal(w, w0)
    cfg = replace(reference.cfg)
    device = ClientHost(cfg, model, tok, chitchat_small, device_client=True)
    try:
        device.apply_base_delta(d1, version=1)
        assert torch.equal(w, expected) and device._pristine == {}
        device.apply_base_delta(d2, version=2)
        torch.testing.assert_close(w, w0 + 2.0 * (d2[key + B_SUFFIX] @ d2[key + A_SUFFIX]), rtol=1e-5, atol=1e-5)
        device.apply_base_delta({}, version=3)
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-5)
    finally:
        with torch.no_grad():
            w.copy_(w0)


def test_a_device_client_of_a_gguf_model_trains_over_its_blocks_as_over_the_dense_weights(gguf_model_file):
    """auto: a device client (a ClientApp) holds the GGUF's blocks, an in-process host the dense weights; one client's
    round on either base gives the same adapter within 1e-4 of its largest entry: the same weights, with fp32 sums in
    another order (chunked dequantisation, the chunked loss) that three Adam steps amplify. It held within 1e-5 on the
    AVX2 machines; an AVX512 EPYC, whose kernels order their sums otherwise, gave 2.7e-5 (layer 1's q_proj B)."""
    from hetlora.clients import Job, get_kind
    from hetlora.models.quantised import QuantisedLinear

    cfg = RunConfig(model=str(gguf_model_file), device="cpu", precision="fp32", r_max=8, r_min=2, min_examples=400,
                    max_length=48, eval_size=12, local_steps=3, batch_size=4)
    device = ClientHost(cfg, device_client=True)
    in_process = ClientHost(cfg, data=device.data, tokenizer=device.tokenizer)
    assert (device.base, in_process.base) == ("gguf", "dense")
    assert isinstance(device.model.get_submodule("model.layers.0.self_attn.q_proj"), QuantisedLinear)
    assert isinstance(in_process.model.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)
    g = torch.Generator().manual_seed(2)
    shapes = target_shapes(in_process.model, DEFAULT_TARGETS)
    adapter = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in lora_init(shapes, 8, 0).items()}
    cid = device.client_ids[0]
    updates = [get_kind("lora").train(host, [Job(cid, 8, 1, adapter)], prune=False)[0] for host in (device, in_process)]
    for key, dense in updates[1].adapter.items():
        assert not torch.equal(dense, adapter[key])  # it trained
        assert torch.allclose(updates[0].adapter[key], dense, rtol=0, atol=1e-4 * float(dense.abs().max())), key


def test_base_weights_gguf_is_refused_where_the_base_is_not_frozen_or_not_from_a_gguf():
    with pytest.raises(ValueError, match="base_weights gguf keeps the frozen weights in GGUF blocks, but fft trains them"):
        RunConfig(method="fft", base_weights="gguf").validate()
    with pytest.raises(ValueError, match="base_weights must be auto, dense or gguf"):
        RunConfig(base_weights="int4").validate()
    folding = next(name for name, m in __import__("hetlora.methods", fromlist=["METHODS"]).METHODS.items() if m.folds_into_base)
    assert RunConfig(method=folding).base_for(device_client=True, model_from_gguf=True) == "dense"
    assert RunConfig().base_for(device_client=True, model_from_gguf=False) == "dense"
    assert RunConfig().base_for(device_client=True, model_from_gguf=True) == "gguf"


def _mapped_kb(path, field: str = "Rss:") -> int:
    """kB of this process's memory maps of ``path`` (/proc/self/smaps): resident (``Rss:``) or mapped (``Size:``)."""
    total, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == field and current == str(path):
                total += int(fields[1])
    return total


def test_a_bf16_client_reads_its_frozen_weights_from_the_file_without_touching_the_fp32_map(tmp_path, tiny, chitchat_small):
    """from_pretrained memory-maps the fp32 file; converting the mapped weights in memory made every page resident
    (SmolLM2: +405 MB beside the bf16 copies). Read from the file instead, the weights are the same bf16 values and
    the map's resident size does not grow by the weights' size."""
    import safetensors.torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetlora.models.loading import load_base_model

    _, tok = tiny
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # fp32 safetensors, 2 × 12 MB of linear weights
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path))
    file = tmp_path / "model.safetensors"
    expected = {n: v.to(torch.bfloat16) for n, v in safetensors.torch.load(file.read_bytes()).items() if "proj" in n}  # no map
    assert _mapped_kb(file, "Size:") >= file.stat().st_size // 1024  # from_pretrained maps the file (else nothing to test)
    before = _mapped_kb(file)
    host = ClientHost(RunConfig(model=str(tmp_path), device="cpu", precision="bf16", r_max=6), model, tokenizer, chitchat_small)
    host.bank()
    weights = dict(model.named_parameters())
    assert len(expected) == 14 and all(torch.equal(weights[n], v) for n, v in expected.items())
    linear_kb = sum(v.numel() * 4 for v in expected.values()) // 1024
    assert _mapped_kb(file) - before < linear_kb / 10, (before, _mapped_kb(file), linear_kb)


def test_a_weight_changed_after_loading_is_not_read_back_from_the_file(tmp_path, tiny):
    """The file holds the weights as loaded: one changed since (in place, or replaced) is converted as it is now."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetlora.models.loading import load_base_model, read_weights

    _, tok = tiny
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_base_model(str(tmp_path))
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    weights = dict(model.named_parameters())
    with torch.no_grad():
        weights[names[0]].add_(1.0)  # in place
        weights[names[1]].data = weights[names[1]].data * 2  # replaced
    assert sorted(read_weights(model, names, torch.bfloat16)) == [names[2]]
