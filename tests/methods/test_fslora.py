"""fslora against the authors' worked example; its sketches."""

import numpy as np
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.methods.helpers import M, T, update

B0 = [[1, 0, 2], [0, 1, -1]]


A0 = [[1, 0, 0, 1], [0, 1, 1, 0], [1, -1, 0, 0]]


def test_fslora_server_step_matches_the_authors_worked_example(monkeypatch):
    """r = 3, sketches I_1 = {1} (m=1), I_2 = {0, 2} (m=2), server SGD η = 1 over K = 2 clients:
    component 1 was drawn by one client and is still divided by K (as in their code)."""
    from hetlora.methods import fslora

    sketches = {"c1": [1], "c2": [0, 2]}
    monkeypatch.setattr(fslora, "sketch_indices", lambda seed, t, cid, m, r: sketches[cid])
    c1 = update([[0.3], [0.4]], [[0, 0.4, 1, -0.3]], 10, "c1")
    c2 = update([[0.85, 2.15], [-0.15, -1.15]], [[1, -0.15, 0, 0.85], [1.15, -1.3, 0.15, -0.3]], 99, "c2")
    previous = {M + B_SUFFIX: T(B0).float(), M + A_SUFFIX: T(A0).float()}
    g = aggregate("fslora", [c1, c2], r_max=3, previous=previous)
    torch.testing.assert_close(g[M + B_SUFFIX].double(), T([[0.925, 0.15, 2.075], [-0.075, 0.7, -1.075]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g[M + A_SUFFIX].double(), T([[1, -0.075, 0, 0.925], [0, 0.7, 1, -0.15], [1.075, -1.15, 0.075, -0.15]]), atol=1e-6, rtol=0)


def test_fslora_sketches_are_seeded_uniform_and_sized_by_the_budget():
    from hetlora.methods.fslora import sketch_indices

    s = sketch_indices(0, 3, "client", 4, 10)
    assert s == sketch_indices(0, 3, "client", 4, 10) and len(set(s)) == 4 and all(0 <= i < 10 for i in s)
    assert s != sketch_indices(0, 4, "client", 4, 10) or s != sketch_indices(1, 3, "client", 4, 10)
    counts = np.zeros(10)
    for t in range(2000):
        counts[sketch_indices(0, t, "c", 3, 10)] += 1
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600  # each component drawn ~ m/r of the time
