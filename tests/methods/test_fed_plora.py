"""fed-plora (Select-N-Fold) against hand-computed cases: each rank-1 module averaged over the clients that trained
it, an untrained one kept; the client folds what it did not select and so starts from exactly the global model."""

import math

import pytest
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.sketch import complement, selected_modules, sketch_indices
from hetlora.core.validation import InvalidUpdate
from tests.methods.helpers import M, update

R = 6  # the clients below train 5 modules in all: at least one is untrained
SEED, ROUND = 3, 2


def test_a_selection_is_seeded_uniform_and_not_fslora_s_sketch():
    picks = selected_modules(SEED, ROUND, "c0", 2, R)
    assert picks == selected_modules(SEED, ROUND, "c0", 2, R) and len(set(picks)) == 2 and picks == sorted(picks)
    assert complement(picks, R) == [j for j in range(R) if j not in picks]
    draws = [tuple(selected_modules(s, 0, "c", 2, 6)) for s in range(60)]
    assert draws != [tuple(sketch_indices(s, 0, "c", 2, 6)) for s in range(60)]  # an independent stream
    counts = [sum(j in d for d in draws) for j in range(6)]  # uniform: each module in ~1/3 of the draws (20 of 60)
    assert all(8 <= c <= 32 for c in counts), counts


def test_each_module_is_the_example_weighted_mean_of_the_clients_that_trained_it_by_hand():
    """Module j ← Σ_{k: j ∈ K_k} n_k x_{k,j} / Σ_{k: j ∈ K_k} n_k; a module nobody trained keeps its value."""
    ranks, n = {"c0": 2, "c1": 1, "c2": 2}, {"c0": 10, "c1": 30, "c2": 20}
    picks = {c: selected_modules(SEED, ROUND, c, r, R) for c, r in ranks.items()}
    # client c's trained module j: B column = (value, 0), A row = (0, 0, value) with value = 100·(index of c) + j
    value = {c: {j: 100.0 * i + j for j in picks[c]} for i, c in enumerate(ranks)}
    updates = [update([[value[c][j] for j in picks[c]], [0.0] * len(picks[c])], [[0.0, 0.0, value[c][j]] for j in picks[c]], n[c], c)
               for c in ranks]
    previous = {M + B_SUFFIX: torch.full((2, R), -1.0), M + A_SUFFIX: torch.full((R, 3), -2.0)}
    g = aggregate("fed-plora", updates, r_max=R, previous=previous, seed=SEED, round_index=ROUND, ranks=ranks)
    assert any(not any(j in picks[c] for c in ranks) for j in range(R))
    for j in range(R):
        trained = [c for c in ranks if j in picks[c]]
        if not trained:
            assert g[M + B_SUFFIX][0, j] == -1.0 and g[M + A_SUFFIX][j, 2] == -2.0
            continue
        mean = sum(n[c] * value[c][j] for c in trained) / sum(n[c] for c in trained)
        assert math.isclose(float(g[M + B_SUFFIX][0, j]), mean, rel_tol=1e-6)
        assert math.isclose(float(g[M + A_SUFFIX][j, 2]), mean, rel_tol=1e-6)
        assert float(g[M + B_SUFFIX][1, j]) == 0.0 and float(g[M + A_SUFFIX][j, 0]) == 0.0


def test_an_update_of_another_size_than_asked_is_refused_by_name():
    updates = [update([[1.0, 2.0], [0.0, 0.0]], [[1.0, 0, 0], [0, 1.0, 0]], 10, "c0")]
    with pytest.raises(InvalidUpdate, match="c0.*asked to train 3"):
        aggregate("fed-plora", updates, r_max=R, seed=SEED, round_index=ROUND, ranks={"c0": 3})


def test_a_plora_client_folds_what_it_did_not_select_and_starts_from_the_global_model(tiny, chitchat_small):
    """W0 + s·Σ_{j∉K} B_j A_j as frozen weights plus the selected modules as the LoRA is the global model (held-out
    loss equal within fp32 rounding); training one client leaves the global model's evaluation where it was."""
    from hetlora.clients import Job, get_kind
    from hetlora.clients.plora import PLoRAClient
    from hetlora.config import RunConfig
    from hetlora.device.host import ClientHost
    from hetlora.device.lora import lora_init, target_shapes

    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        host = ClientHost(RunConfig(model="tiny", device="cpu", precision="fp32", method="fed-plora", r_min=2, r_max=6,
                                    local_steps=1, batch_size=2), model, tok, chitchat_small)
        g = torch.Generator().manual_seed(0)
        global_adapter = {k: v + 0.05 * torch.randn(v.shape, generator=g)
                          for k, v in lora_init(target_shapes(model, host.local.targets), 6, 1).items()}
        kind = get_kind("plora")
        evaluate = lambda: kind.evaluate({"global": global_adapter}, host, [6], 0)[6]  # noqa: E731
        reference = evaluate()
        job = Job(host.client_ids[0], 2, 1, kind.payload({"global": global_adapter}, host.client_ids[0], 2, 1, host.seed))
        (own,), (start,) = PLoRAClient.client_start(job, host.seed)
        host.apply_base_delta(own.base, own.base_version)
        bank = host.bank(1, 2)
        bank.load(0, start)
        with bank.use(1, 2):
            started = host.evaluate_loss()
        assert started == pytest.approx(reference, rel=1e-5)
        (trained,) = kind.train(host, [job], prune=True)
        assert trained.rank == 2 and trained.metrics["rank_out"] == 2  # no self-pruning
        assert evaluate() == pytest.approx(reference, rel=1e-6)  # the client's fold was taken off again
    finally:
        for m in model.modules():
            m._forward_hooks.clear()
        model.load_state_dict(state)
