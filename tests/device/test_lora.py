import math

import pytest
import torch

from hetlora import truncate_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, adapter_rank
from hetlora.device.lora import AdapterMismatch, LoRABank, find_targets, lora_config, lora_init, target_shapes

IDS = torch.tensor([[1, 5, 9, 42, 7, 3], [8, 2, 77, 4, 4, 19]])


def random_adapter(model, rank, seed):
    """A non-trivial adapter (A and B both random) in PEFT format."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_init(target_shapes(model, ["q_proj", "v_proj", "down_proj"]), rank, 0).items()}


def peft_logits(model, adapter, rank, targets, ids):
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, lora_config(rank, 2.0, targets))
    try:
        set_peft_model_state_dict(peft_model, adapter)
        with torch.no_grad():
            return peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()


def test_bank_forward_equals_peft(tiny):
    model, _ = tiny
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = random_adapter(model, 3, seed=1)
    expected = peft_logits(model, adapter, 3, targets, IDS)
    bank = LoRABank(model, targets, slots=2, rank=5)
    try:
        bank.load(0, adapter)
        with torch.no_grad(), bank.use(1):
            got = model(input_ids=IDS).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            plain = model(input_ids=IDS).logits  # outside use(): the base model
    finally:
        bank.remove()
    with torch.no_grad():
        torch.testing.assert_close(plain, model(input_ids=IDS).logits)
    assert not torch.allclose(plain, expected)


def test_two_slots_are_two_independent_loras(tiny):
    """Rows 0 and 1 of a batch go through slot 0 and slot 1: each equals its own PEFT model."""
    model, _ = tiny
    targets = ["q_proj", "v_proj", "down_proj"]
    a1, a2 = random_adapter(model, 2, seed=2), random_adapter(model, 4, seed=3)
    bank = LoRABank(model, targets, slots=2, rank=4)
    try:
        bank.load(0, a1)
        bank.load(1, a2)
        with torch.no_grad(), bank.use(2):
            got = model(input_ids=IDS).logits
    finally:
        bank.remove()
    torch.testing.assert_close(got[:1], peft_logits(model, a1, 2, targets, IDS[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], peft_logits(model, a2, 4, targets, IDS[1:]), rtol=1e-5, atol=1e-5)


def test_load_read_round_trip_and_rejections(tiny):
    model, _ = tiny
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = random_adapter(model, 3, seed=4)
    bank = LoRABank(model, targets, slots=1, rank=6)
    try:
        assert bank.load(0, adapter) == 3
        back = bank.read(0, 3)
        assert all(torch.equal(back[k], adapter[k]) for k in adapter)
        padded = bank.read(0, 6)  # components 3..5 are zero in both factors
        assert all(float(v[3:].abs().sum() if k.endswith(A_SUFFIX) else v[:, 3:].abs().sum()) == 0 for k, v in padded.items())
        extra = dict(adapter) | {"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(3, 64)}
        with pytest.raises(AdapterMismatch, match="unexpected"):
            bank.load(0, extra)
        missing = dict(adapter)
        missing.pop(next(iter(missing)))
        with pytest.raises(AdapterMismatch, match="not provided"):
            bank.load(0, missing)
        with pytest.raises(AdapterMismatch, match="ranks"):
            bank.load(0, random_adapter(model, 7, seed=5))  # above the bank's rank
        transposed = {k: v.T.contiguous() if k.endswith(B_SUFFIX) else v for k, v in adapter.items()}
        with pytest.raises(AdapterMismatch):
            bank.load(0, transposed)
    finally:
        bank.remove()


def test_masked_components_get_zero_gradient_and_stay_zero(tiny):
    model, _ = tiny
    bank = LoRABank(model, ["q_proj", "v_proj"], slots=1, rank=6)
    try:
        bank.load(0, {k: v + 0.1 for k, v in lora_init(target_shapes(model, ["q_proj", "v_proj"]), 2, 0).items()})
        params = bank.factors()
        for p in params:
            p.requires_grad_(True)
        with bank.use(1):
            model(input_ids=IDS).logits.square().mean().backward()
        for a, b in zip(bank.A, bank.B):
            assert a.grad[0, :2].abs().sum() > 0 and b.grad[0, :, :2].abs().sum() > 0
            assert a.grad[0, 2:].abs().sum() == 0 and b.grad[0, :, 2:].abs().sum() == 0
    finally:
        bank.remove()


def test_lora_init_is_peft_default_seeded_and_independent_of_global_rng(tiny):
    model, _ = tiny
    shapes = target_shapes(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    g1 = lora_init(shapes, 8, seed=3)
    torch.manual_seed(99)
    g2 = lora_init(shapes, 8, seed=3)
    g3 = lora_init(shapes, 8, seed=4)
    assert adapter_rank(g1) == 8 and len(g1) == 2 * 7 * 2
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert any(not torch.equal(g1[k], g3[k]) for k in g1 if k.endswith(A_SUFFIX))
    assert all(torch.all(v == 0) for k, v in g1.items() if k.endswith(B_SUFFIX))
    # PEFT's default: kaiming_uniform(a=√5) on A [r, in], i.e. U(±1/√in)
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(8))
    try:
        peft_a = {k: v for k, v in peft_model.state_dict().items() if "lora_A" in k}
    finally:
        peft_model.unload()
    for key, a in g1.items():
        if key.endswith(A_SUFFIX):
            bound = 1 / math.sqrt(a.shape[1])
            assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
            (peft,) = [v for k, v in peft_a.items() if k.startswith(key[: -len(A_SUFFIX)])]
            assert peft.shape == a.shape and peft.abs().max() <= bound + 1e-7


def test_scale_is_the_same_at_every_rank(tiny):
    model, _ = tiny
    for r in (2, 5):
        assert lora_config(r, scale=2.0).lora_alpha / r == pytest.approx(2.0)


def test_unknown_target_module_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"\['bogus_proj'\] not found"):
        find_targets(model, ["q_proj", "bogus_proj"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        find_targets(model, ["mlp"])


def test_truncation_of_a_loaded_slot_is_the_truncated_adapter(tiny):
    model, _ = tiny
    adapter = random_adapter(model, 5, seed=6)
    bank = LoRABank(model, ["q_proj", "v_proj", "down_proj"], slots=1, rank=5)
    try:
        bank.load(0, adapter)
        with torch.no_grad(), bank.use(1, rank=2):
            got = model(input_ids=IDS).logits
        bank.load(0, truncate_adapter(adapter, 2))
        with torch.no_grad(), bank.use(1):
            expected = model(input_ids=IDS).logits
    finally:
        bank.remove()
    torch.testing.assert_close(got, expected)


def test_the_lora_scale_stays_fp32_under_bf16_autocast():
    """FSLoRA scales the forward by s·r/m = 2·50/7 = 14.2857; a bf16 scale tensor made it 14.3125 (+0.19 %). Under
    bf16 autocast each product is rounded, but without bias: the least-squares gain of the LoRA output against the
    exact fp64 one must be 1 within rounding noise, at one slot and at two slots of different factors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    torch.nn.init.zeros_(model[0].weight)  # the output is the LoRA term alone
    bank = LoRABank(model, ["0"], slots=2, rank=8, scale=2.0)
    with torch.no_grad():
        for p in (bank.A[0], bank.B[0]):
            p.normal_()
    x = torch.randn(2 * 256, 64)
    for factors in ([50 / 7, 50 / 7], [50 / 7, 25 / 3]):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), bank.use(2, 8, factors):
            y = model(x).double().reshape(2, 256, 48)
        for k, f in enumerate(factors):
            exact = 2.0 * f * (x.reshape(2, 256, 64)[k].double() @ bank.A[0][k].detach().double().T @ bank.B[0][k].detach().double().T)
            gain = float((y[k] * exact).sum() / (exact * exact).sum())
            assert abs(gain - 1) < 4e-4, (factors, k, gain)


def test_a_prefix_mask_is_the_truncated_adapter_and_stops_the_tails_gradient(tiny):
    """use_prefixes([3]) on a rank-6 slot: the forward is the rank-3 truncation's, and components 3..5 get no gradient."""
    model, _ = tiny
    adapter = random_adapter(model, 6, seed=4)
    bank = LoRABank(model, ["q_proj", "v_proj", "down_proj"], slots=1, rank=6)
    try:
        bank.load(0, truncate_adapter(adapter, 3))
        with torch.no_grad(), bank.use(1):
            truncated = model(input_ids=IDS).logits
        bank.load(0, adapter)
        for p in bank.parameters():
            p.requires_grad_(True)
        with bank.use(1):
            bank.use_prefixes([3])
            masked = model(input_ids=IDS).logits
            masked.sum().backward()
        torch.testing.assert_close(masked.detach(), truncated, rtol=1e-5, atol=1e-5)
        assert all(float(p.grad[0, 3:].abs().max()) == 0 and float(p.grad[0, :3].abs().max()) > 0 for p in bank.A)
        assert bank.prefix_mask is None  # the mask ends with the block
    finally:
        bank.remove()
