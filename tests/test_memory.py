import pytest
import torch

from hetlora import memory, truncate_adapter
from tests.helpers import train
from hetlora.data.federated import collate
from hetlora.evaluate import target_token_loss
from hetlora.config import DEFAULT_TARGETS
from hetlora.lora import LoRABank, lora_init, target_shapes
from hetlora.memory import rss_mb


@pytest.fixture(scope="module")
def client_data(chitchat_small):
    cid = chitchat_small.client_ids[1]
    return cid, chitchat_small.train_examples(cid)[:16]


def test_release_free_heap_returns_holes_in_the_middle_of_the_heap():
    if not memory.release_free_heap():
        pytest.skip("no malloc_trim (not glibc)")
    # 64 KiB blocks (under glibc's mmap threshold: they live on the heap); freeing every other
    # one leaves holes between kept blocks, which free() cannot give back by shrinking the heap.
    blocks = [torch.ones(16384) for _ in range(6000)]
    before_free = rss_mb()
    del blocks[1::2]
    held = rss_mb()
    memory.release_free_heap()
    after = rss_mb()
    freed = 3000 * 64 / 1024  # MB
    assert held > before_free - 0.5 * freed  # free() alone kept most of it resident
    assert held - after > 0.6 * freed
    del blocks


def _lora_forward_backward(model, tok, examples):
    batch = collate(examples[:4], tok.pad_token_id)
    loss, n = target_token_loss(model, batch)
    (loss / n).backward()


def test_lean_memory_releases_every_kth_layer_forward_and_backward_then_unhooks(tiny, client_data, monkeypatch):
    model, tok = tiny
    _, examples = client_data
    calls = []
    monkeypatch.setattr(memory, "release_free_heap", lambda: calls.append(1) or True)
    bank = LoRABank(model, DEFAULT_TARGETS, slots=1, rank=4)
    bank.load(0, lora_init(target_shapes(model, DEFAULT_TARGETS), 4, 0))
    for p in bank.factors():
        p.requires_grad_(True)
    peft_model = model
    try:
        bank.active = 1
        assert len(memory.decoder_layers(peft_model)) == 2
        with memory.lean_memory(peft_model, release_every=1):
            _lora_forward_backward(peft_model, tok, examples)
        assert len(calls) == 4  # 2 layers × (forward + backward)
        calls.clear()
        with memory.lean_memory(peft_model, release_every=2):
            _lora_forward_backward(peft_model, tok, examples)
        assert len(calls) == 2  # layer 2 only
        calls.clear()
        _lora_forward_backward(peft_model, tok, examples)
        assert calls == []
    finally:
        bank.remove()


def _saved_bytes(model, tok, examples) -> int:
    """Bytes the decoder keeps for backward, weights not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = collate(examples[:8], tok.pad_token_id)
    decoder = model.get_decoder()  # no LM head: its logits would dwarf the layers
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    hidden.square().mean().backward()
    return sum(seen.values())


def test_checkpointing_saves_fewer_activations_and_is_undone(tiny, client_data):
    model, tok = tiny
    _, examples = client_data
    bank = LoRABank(model, DEFAULT_TARGETS, slots=1, rank=4)
    for p in bank.factors():
        p.requires_grad_(True)
    peft_model = model
    bank.active = 1
    peft_model.train()
    try:
        plain = _saved_bytes(peft_model, tok, examples)
        with memory.lean_memory(peft_model, release_every=None, checkpointing=True):
            assert all(layer.gradient_checkpointing for layer in memory.decoder_layers(peft_model))
            checkpointed = _saved_bytes(peft_model, tok, examples)
        assert checkpointed < 0.5 * plain
        assert not any(layer.gradient_checkpointing for layer in memory.decoder_layers(peft_model))
        assert _saved_bytes(peft_model, tok, examples) == plain
    finally:
        bank.remove()
        model.eval()


def test_checkpointing_and_release_give_the_same_lora_update(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    start = truncate_adapter(lora_init(target_shapes(model, DEFAULT_TARGETS), 6, 3), 6)
    updates = []
    for checkpointing, release in ((False, None), (True, None), (False, 1), (True, 1)):
        host = make_host(seed=7, local_steps=3, batch_size=4, lr=1e-2, grad_checkpointing=checkpointing, release_memory_every=release)
        updates.append(train(host, "lora", cid, start, 6, prune=True))
    for u in updates[1:]:
        assert u.rank == updates[0].rank
        for k, v in updates[0].adapter.items():
            torch.testing.assert_close(u.adapter[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(updates[0].adapter[k], start[k]) for k in start)


def test_checkpointing_gives_the_same_fft_update(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    original = {k: v.clone() for k, v in model.named_parameters()}
    outs = []
    try:
        for checkpointing in (False, True):
            host = make_host(seed=1, local_steps=2, batch_size=4, grad_checkpointing=checkpointing)
            outs.append(train(host, "fft", cid, original, 0).adapter)
    finally:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(original[k])
    for k, v in outs[0].items():
        torch.testing.assert_close(outs[1][k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(outs[0][k], original[k]) for k in original)
