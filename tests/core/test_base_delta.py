"""The cumulative base delta: factors while they are smaller, dense after."""

import torch

from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.base_delta import dense_delta, fold
from tests.methods.helpers import M


def test_base_delta_switches_to_dense_when_factors_would_be_larger():
    g0 = torch.Generator().manual_seed(1)
    delta = None
    total = torch.zeros(6, 4, dtype=torch.float64)
    for step in range(4):  # rank grows 1, 2, 3 (3·(6+4) ≥ 24 → dense) ...
        b, a = torch.randn(6, 1, generator=g0), torch.randn(1, 4, generator=g0)
        delta = fold(delta, {M + B_SUFFIX: b, M + A_SUFFIX: a})
        total += b.double() @ a.double()
        torch.testing.assert_close(dense_delta(delta, M).double(), total, rtol=1e-5, atol=1e-6)
    assert M + ".base_delta.weight" in delta and M + B_SUFFIX not in delta
