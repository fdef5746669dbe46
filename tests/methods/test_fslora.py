"""fslora against the authors' worked example; its sketches."""

import numpy as np
import pytest
import torch

from hetlora import METHODS, ClientUpdate, aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.methods.helpers import M, T, update

B0 = [[1, 0, 2], [0, 1, -1]]


A0 = [[1, 0, 0, 1], [0, 1, 1, 0], [1, -1, 0, 0]]


def test_fslora_server_step_matches_the_authors_worked_example(monkeypatch):
    """r = 3, sketches I_1 = {1} (m=1), I_2 = {0, 2} (m=2), server SGD η = 1 over K = 2 clients:
    component 1 was drawn by one client and is still divided by K (as in their code)."""
    from hetlora.methods import fslora

    sketches = {"c1": [1], "c2": [0, 2]}
    seen = []
    monkeypatch.setattr(fslora, "sketch_indices", lambda seed, t, cid, m, r: seen.append((seed, t)) or sketches[cid])
    c1 = update([[0.3], [0.4]], [[0, 0.4, 1, -0.3]], 10, "c1")
    c2 = update([[0.85, 2.15], [-0.15, -1.15]], [[1, -0.15, 0, 0.85], [1.15, -1.3, 0.15, -0.3]], 99, "c2")
    previous = {M + B_SUFFIX: T(B0).float(), M + A_SUFFIX: T(A0).float()}
    with pytest.raises(ValueError, match="'fslora' re-derives what the server sent .* pass seed= and round_index="):
        aggregate("fslora", [c1, c2], r_max=3, previous=previous)  # would silently have used round 0's sketches
    g = aggregate("fslora", [c1, c2], r_max=3, previous=previous, seed=7, round_index=4)
    assert set(seen) == {(7, 4)}  # the sketches of the round asked for
    torch.testing.assert_close(g[M + B_SUFFIX].double(), T([[0.925, 0.15, 2.075], [-0.075, 0.7, -1.075]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g[M + A_SUFFIX].double(), T([[1, -0.075, 0, 0.925], [0, 0.7, 1, -0.15], [1.075, -1.15, 0.075, -0.15]]), atol=1e-6, rtol=0)


def test_fslora_sketches_are_seeded_uniform_and_sized_by_the_budget():
    from hetlora.core.sketch import sketch_indices

    s = sketch_indices(0, 3, "client", 4, 10)
    assert s == sketch_indices(0, 3, "client", 4, 10) and len(set(s)) == 4 and all(0 <= i < 10 for i in s)
    assert s != sketch_indices(0, 4, "client", 4, 10) or s != sketch_indices(1, 3, "client", 4, 10)
    counts = np.zeros(10)
    for t in range(2000):
        counts[sketch_indices(0, t, "c", 3, 10)] += 1
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600  # each component drawn ~ m/r of the time


def fslora_round(ranks_sent, sizes, seed=3):
    """Clients that trained their sketch (a small change on what they were sent); ``sizes``: ranks they return."""
    from hetlora.core.sketch import gather, sketch_indices

    g = torch.Generator().manual_seed(seed)
    previous = {M + B_SUFFIX: torch.randn(4, 6, generator=g), M + A_SUFFIX: torch.randn(6, 5, generator=g)}
    ups = []
    for k, (sent, size) in enumerate(zip(ranks_sent, sizes)):
        sketch = gather(previous, sketch_indices(0, 0, f"c{k}", sent, 6))
        change = {key: 0.01 * torch.randn(v.shape, generator=g) for key, v in sketch.items()}
        adapter = {key: (sketch[key] + change[key])[..., :size] if key.endswith(B_SUFFIX) else (sketch[key] + change[key])[:size]
                   for key in sketch}
        ups.append(ClientUpdate(adapter, 10, client_id=f"c{k}", rank=size, round=0))
    return previous, ups


def test_a_short_fslora_update_is_refused_not_applied_to_other_components():
    from hetlora.core.validation import InvalidUpdate
    from hetlora.methods import AggregationContext, aggregate_round

    previous, ups = fslora_round([3, 3], [3, 2])
    ctx = AggregationContext(r_max=6, previous=previous, ranks={"c0": 3, "c1": 3})
    with pytest.raises(InvalidUpdate, match="sent a sketch of 2 components, but was sent 3"):
        aggregate_round(METHODS["fslora"], ups, ctx)
    kept, dropped = METHODS["fslora"].split_valid(ups, ctx, assigned_ranks={"c0": 3, "c1": 3}, round_index=0, exact_rank=True)
    assert [u.client_id for u in kept] == ["c0"] and "not the rank 3 it was sent" in dropped[0][1]


def test_the_fslora_bound_scales_the_change_not_the_sketch():
    """A client whose change is inflated is brought to the median change; honest clients are untouched,
    so with the bound on an honest round aggregates exactly as with it off."""
    from hetlora.methods import AggregationContext, aggregate_round

    previous, ups = fslora_round([3, 3, 3], [3, 3, 3])
    ctx = dict(r_max=6, previous=previous, ranks={"c0": 3, "c1": 3, "c2": 3})
    honest_on, _ = aggregate_round(METHODS["fslora"], ups, AggregationContext(norm_bound=1.5, **ctx))
    honest_off, _ = aggregate_round(METHODS["fslora"], ups, AggregationContext(norm_bound=None, **ctx))
    for k in honest_on:
        torch.testing.assert_close(honest_on[k], honest_off[k])
    huge = [ClientUpdate({k: v * 1e30 for k, v in ups[0].adapter.items()}, 10, client_id="c0", rank=3, round=0)] + ups[1:]
    bounded, _ = aggregate_round(METHODS["fslora"], huge, AggregationContext(norm_bound=1.5, **ctx))
    assert all(torch.isfinite(v).all() and float((v - previous[k]).abs().max()) < 10 for k, v in bounded.items())
