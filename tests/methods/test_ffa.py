"""ffa: A frozen and shared, B averaged: exact under mixed ranks."""

import pytest
import torch

from hetlora import ClientUpdate, aggregate, truncate_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.helpers import SHAPES, make_adapter, product
from tests.methods.helpers import assert_close, dense_average, q_weights


def test_ffa_is_exact_under_mixed_ranks():
    shared = make_adapter(6, seed=99)
    updates = []
    for s, (r, n) in enumerate([(2, 10), (5, 30), (6, 5)]):
        ad = truncate_adapter(shared, r)
        for m in SHAPES:  # train B only
            ad[m + B_SUFFIX] = torch.randn(SHAPES[m][0], r, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        updates.append(ClientUpdate(ad, n, f"c{s}"))
    g = aggregate("ffa", updates, r_max=6, previous=shared)
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        assert torch.equal(g[m + A_SUFFIX], shared[m + A_SUFFIX].float())
        assert_close(product(g, m), target[m])
    g2 = aggregate("ffa", updates, r_max=6)  # rebuilt from the rank-6 client
    for k in g:
        assert_close(g[k], g2[k])
    with pytest.raises(ValueError, match="no client covers"):
        aggregate("ffa", updates[:2], r_max=6)
