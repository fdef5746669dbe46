import pytest
import torch

from hetlora.device import memory
from hetlora import truncate_adapter
from tests.helpers import train
from hetlora.data.federated import collate
from hetlora.device.evaluate import target_token_loss
from hetlora.config import DEFAULT_TARGETS
from hetlora.device.lora import LoRABank, lora_init, target_shapes
from hetlora.device.memory import rss_mb


@pytest.fixture(scope="module")
def client_data(chitchat_small):
    cid = chitchat_small.client_ids[1]
    return cid, chitchat_small.train_examples(cid)[:16]


HOLES = """
import sys, torch
from hetlora.device import memory
if sys.argv[1] == "fixed":
    assert memory.configure_allocator()
big = torch.ones(2**18); del big  # glibc raises its dynamic mmap threshold to 1 MiB when this mapping is freed
blocks = [torch.ones(2**16) for _ in range(1200)]  # 256 KiB each, 300 MB
before = memory.rss_mb()
del blocks[1::2]
print(before - memory.rss_mb())
"""


def test_a_fixed_mmap_threshold_gives_freed_tensors_back_without_trimming():
    """glibc's dynamic threshold puts activation-sized tensors on the heap, where freed holes stay resident;
    configure_allocator's fixed threshold maps each one, so freeing it returns its pages at once."""
    import subprocess
    import sys

    returned = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", HOLES, mode], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"no glibc mallopt here: {out.stderr[-200:]}")
        returned[mode] = float(out.stdout.strip().splitlines()[-1])
    freed = 600 * 256 / 1024  # MB
    assert returned["default"] < 0.3 * freed  # the holes stayed resident
    assert returned["fixed"] > 0.8 * freed


def _lora_forward_backward(model, tok, examples):
    batch = collate(examples[:4], tok.pad_token_id)
    loss, n = target_token_loss(model, batch)
    (loss / n).backward()


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
        with memory.lean_memory(peft_model, checkpointing=True):
            assert all(layer.gradient_checkpointing for layer in memory.decoder_layers(peft_model))
            checkpointed = _saved_bytes(peft_model, tok, examples)
        assert checkpointed < 0.5 * plain
        assert not any(layer.gradient_checkpointing for layer in memory.decoder_layers(peft_model))
        assert _saved_bytes(peft_model, tok, examples) == plain
    finally:
        bank.remove()
        model.eval()


def test_checkpointing_gives_the_same_lora_update_bit_for_bit(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    start = truncate_adapter(lora_init(target_shapes(model, DEFAULT_TARGETS), 6, 3), 6)
    updates = []
    for checkpointing in (False, True):
        host = make_host(seed=7, local_steps=3, batch_size=4, lr=1e-2, grad_checkpointing=checkpointing)
        updates.append(train(host, "lora", cid, start, 6, prune=True))
    # bit-identical: checkpointing is NUMBER_NEUTRAL (a finished run is reused whatever it was)
    assert updates[1].rank == updates[0].rank
    assert all(torch.equal(updates[1].adapter[k], v) for k, v in updates[0].adapter.items())
    assert any(not torch.equal(updates[0].adapter[k], start[k]) for k in start)


RELEASED = """
import hashlib, sys, json
from hetlora.config import RunConfig
from hetlora.server.runner import run
cfg = RunConfig(model="tiny", client_pool=4, clients_per_round=2, rounds=1, local_steps=2, batch_size=2, max_length=32,
                eval_size=4, r_min=2, r_max=6, min_examples=200, seed=0, precision="fp32", tier_eval="off",
                release_memory=sys.argv[1] == "on", out=sys.argv[2])
run(cfg, progress=False)
from hetlora.device import memory
print(json.dumps({"configured": bool(memory._allocator), "adapter": hashlib.sha256(open(sys.argv[2] + "/adapter/adapter_model.safetensors", "rb").read()).hexdigest()}))
"""


def test_release_memory_sets_the_allocator_and_changes_no_number(tmp_path):
    import json
    import subprocess
    import sys

    outs = {}
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, "-c", RELEASED, mode, str(tmp_path / mode)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert outs["off"]["adapter"] == outs["on"]["adapter"]
    assert outs["on"]["configured"] and not outs["off"]["configured"]  # only --release-memory touches the allocator


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
    assert all(torch.equal(outs[1][k], v) for k, v in outs[0].items())
    assert any(not torch.equal(outs[0][k], original[k]) for k in original)


def test_trim_heap_gives_freed_heap_pages_back():
    """Freed heap blocks below a block still in use stay resident (glibc trims only the heap's top) until
    the heap is trimmed: what a device's setup parsed and dropped."""
    import gc

    from hetlora.device.memory import trim_heap

    blocks = [bytearray(2000) for _ in range(100_000)]  # ~200 MB of heap blocks (below the mmap threshold)
    pin = bytearray(2000)  # above them on the heap: a plain free cannot shrink the heap's top
    full = rss_mb()
    del blocks
    gc.collect()
    freed = rss_mb()
    assert freed > full - 50  # freed, but resident
    assert trim_heap()
    assert rss_mb() < freed - 150
    del pin
