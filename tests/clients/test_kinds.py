import pytest
import torch

from hetlora import truncate_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, adapter_rank
from hetlora.device.evaluate import evaluate_loss
from hetlora.config import DEFAULT_TARGETS
from hetlora.device.lora import lora_init, target_shapes
from hetlora.device.training import batches
from tests.helpers import train


@pytest.fixture(scope="module")
def client_data(tiny, chitchat_small):
    cid = chitchat_small.client_ids[0]
    return cid, chitchat_small.train_examples(cid)[:32]


def init_global_adapter(model, r, seed=0):
    return lora_init(target_shapes(model, DEFAULT_TARGETS), r, seed)


def nonzero_global(model, r, seed=0):
    g = init_global_adapter(model, r, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if k.endswith(B_SUFFIX) else v for k, v in g.items()}


def test_pruning_event_cuts_the_tail(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    start = truncate_adapter(nonzero_global(model, 8), 8)
    host = make_host(local_steps=3, batch_size=4, lr=1e-2, gamma=0.5, lam=1.0, r_min=2)
    u = train(host, "lora", cid, start, 8, prune=True)
    m = u.metrics
    assert m["p_before"] > 0 and m["p_after"] < m["p_before"]
    assert u.rank == m["rank_out"] == 4 == adapter_rank(u.adapter)  # c = floor(0.5 * 8)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not any(p.requires_grad for p in model.parameters()) and host.bank().active == 0


def test_first_visit_cannot_prune_and_no_prune_keeps_rank(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    zero_b = truncate_adapter(init_global_adapter(model, 6, seed=0), 6)
    host = make_host(local_steps=2, batch_size=4, lr=1e-2, gamma=0.5, lam=1.0, r_min=2)
    u = train(host, "lora", cid, zero_b, 6, prune=True)
    assert u.metrics["p_before"] == 0.0 and u.rank == 6
    u2 = train(host, "lora", cid, truncate_adapter(nonzero_global(model, 6), 6), 6, prune=False)
    assert u2.rank == 6


def test_training_lowers_client_loss_and_is_seeded(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    start = truncate_adapter(init_global_adapter(model, 4, seed=1), 4)
    host = make_host(seed=5, local_steps=6, batch_size=8, lr=2e-2)
    u1 = train(host, "lora", cid, start, 4)
    u2 = train(host, "lora", cid, start, 4)
    assert all(torch.equal(u1.adapter[k], u2.adapter[k]) for k in u1.adapter)
    before = evaluate_loss(model, examples, tok.pad_token_id)
    bank = host.bank()
    bank.load(0, u1.adapter)
    with bank.use(1):
        after = evaluate_loss(model, examples, tok.pad_token_id)
    assert after < before


def test_ffa_client_keeps_a_frozen(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    start = truncate_adapter(init_global_adapter(model, 8, seed=2), 5)
    u = train(make_host(local_steps=2, batch_size=4), "ffa", cid, start, 5)
    for k in start:
        if k.endswith(A_SUFFIX):
            assert torch.equal(u.adapter[k], start[k])
    assert any(not torch.equal(u.adapter[k], start[k]) for k in start if k.endswith(B_SUFFIX))


def test_fft_client_trains_every_weight(tiny, client_data, make_host):
    model, tok = tiny
    cid, examples = client_data
    original = {k: v.clone() for k, v in model.named_parameters()}
    u = train(make_host(local_steps=1, batch_size=4), "fft", cid, original, 0)
    changed = sum(not torch.equal(u.adapter[k], original[k]) for k in original)
    assert changed == len(original)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(original[k])


def test_batches_walk_permutations():
    seen = [x for b in batches(list(range(10)), 4, 5, torch.Generator().manual_seed(0)) for x in b]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def _jobs(model, cids, ranks, round_index=0):
    from hetlora.clients import Job

    g = nonzero_global(model, 8, seed=4)
    return [Job(c, r, round_index, truncate_adapter(g, r)) for c, r in zip(cids, ranks)]


@pytest.mark.parametrize("kind,prune", [("lora", True), ("ffa", False), ("flora", False)])
def test_clients_trained_together_equal_clients_trained_in_turn(tiny, chitchat_small, make_host, kind, prune):
    """K clients in the slots of one bank give each client's sequential update, loss and prune decision."""
    from hetlora.clients import get_kind

    model, _ = tiny
    cids = chitchat_small.client_ids[:3]
    host = make_host(seed=3, local_steps=3, batch_size=4, lr=1e-2, gamma=0.5, lam=1.0, r_min=2)
    jobs = _jobs(model, cids, [8, 3, 5])
    together = get_kind(kind).train(host, jobs, prune=prune)
    in_turn = [get_kind(kind).train(host, [job], prune=prune)[0] for job in jobs]
    for a, b in zip(together, in_turn):
        assert a.client_id == b.client_id and a.rank == b.rank and a.metrics["rank_out"] == b.metrics["rank_out"]
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-4)
        for k in b.adapter:
            torch.testing.assert_close(a.adapter[k], b.adapter[k], rtol=1e-4, atol=1e-6)
    if prune:
        assert [u.rank for u in together] == [4, 2, 2]  # c = floor(0.5 r), at least r_min = 2


def test_a_failing_lora_client_leaves_the_shared_model_untouched(tiny, chitchat_small, make_host, monkeypatch):
    from hetlora.clients import lora as lora_client

    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    host = make_host(local_steps=2, batch_size=4)
    monkeypatch.setattr(lora_client, "optimise", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        train(host, "lora", chitchat_small.client_ids[0], truncate_adapter(nonzero_global(model, 6), 6), 6)
    assert host.bank().active == 0 and not any(p.requires_grad for p in host.bank().parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failing_fft_client_restores_requires_grad(tiny, chitchat_small, make_host, monkeypatch):
    from hetlora.clients import fft as fft_client

    model, _ = tiny
    original = {k: v.clone() for k, v in model.named_parameters()}
    host = make_host(local_steps=1, batch_size=4)
    monkeypatch.setattr(fft_client, "optimise", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        train(host, "fft", chitchat_small.client_ids[0], original, 0)
    assert not any(p.requires_grad for p in model.parameters())


def test_ordered_dropout_prefixes_are_seeded_and_in_range():
    from hetlora.clients.job import Job
    from hetlora.clients.lora import prefix_ranks

    job = Job("c1", 8, 3, {})
    p = prefix_ranks(0, job, 8, 2, 400)
    assert p == prefix_ranks(0, job, 8, 2, 400) and p != prefix_ranks(1, job, 8, 2, 400)
    assert min(p) == 2 and max(p) == 8  # uniform over [r_min, r_k], both ends reached
    assert prefix_ranks(0, job, 3, 5, 50) == [3] * 50  # r_k below r_min: always the whole adapter


def test_ordered_dropout_trains_prefixes_and_reduces_to_plain_training(tiny, client_data, make_host):
    """With r_min = r_k every prefix is the whole adapter: the same update as plain training, bit for bit.
    With r_min = 1 the prefixes vary and the update differs (components past a step's prefix got no gradient then)."""
    model, _ = tiny
    cid, _ = client_data
    start = truncate_adapter(nonzero_global(model, 6), 6)
    plain = train(make_host(seed=2, local_steps=3, batch_size=4, lr=1e-2, r_min=6), "lora", cid, start, 6)
    same = train(make_host(seed=2, local_steps=3, batch_size=4, lr=1e-2, r_min=6, ordered_dropout=True), "lora", cid, start, 6)
    assert all(torch.equal(plain.adapter[k], same.adapter[k]) for k in plain.adapter)
    ordered = train(make_host(seed=2, local_steps=3, batch_size=4, lr=1e-2, r_min=1, ordered_dropout=True), "lora", cid, start, 6)
    assert any(not torch.equal(plain.adapter[k], ordered.adapter[k]) for k in plain.adapter)
