import pytest
import torch

from hetlora import truncate_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, adapter_rank
from hetlora.lora import AdapterMismatch, adapter_state, attach_lora, detach_lora, init_global_adapter, load_adapter_strict


def test_global_init_is_seeded_peft_default_with_zero_b(tiny):
    model, _ = tiny
    g1 = init_global_adapter(model, 8, seed=3)
    g2 = init_global_adapter(model, 8, seed=3)
    g3 = init_global_adapter(model, 8, seed=4)
    assert adapter_rank(g1) == 8 and len(g1) == 2 * 7 * 2  # 2 layers x 7 modules x (A, B)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert any(not torch.equal(g1[k], g3[k]) for k in g1 if k.endswith(A_SUFFIX))
    assert all(torch.all(v == 0) for k, v in g1.items() if k.endswith(B_SUFFIX))
    assert not any("lora" in n for n, _ in model.named_modules())  # detached again


def test_lora_alpha_gives_same_scaling_at_every_rank(tiny):
    model, _ = tiny
    for r in (2, 5):
        peft_model = attach_lora(model, r, scale=2.0)
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(2.0)
        detach_lora(peft_model)


def test_strict_load_round_trip_and_rejections(tiny):
    model, _ = tiny
    g = init_global_adapter(model, 8, seed=0)
    g = {k: v + 0.01 for k, v in g.items()}
    start = truncate_adapter(g, 3)
    peft_model = attach_lora(model, 3)
    try:
        load_adapter_strict(peft_model, start)
        back = adapter_state(peft_model)
        assert all(torch.equal(back[k], start[k]) for k in start)
        extra = dict(start) | {"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(3, 64)}
        with pytest.raises(AdapterMismatch, match="unexpected"):
            load_adapter_strict(peft_model, extra)
        missing = dict(start)
        missing.pop(next(iter(missing)))
        with pytest.raises(AdapterMismatch, match="not provided"):
            load_adapter_strict(peft_model, missing)
        with pytest.raises(Exception):
            load_adapter_strict(peft_model, truncate_adapter(g, 2))  # wrong rank
    finally:
        detach_lora(peft_model)
