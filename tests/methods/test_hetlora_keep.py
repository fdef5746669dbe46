"""hetlora-keep: per-slice renormalised sparsity weights; uncovered components kept."""

import pytest
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.methods.helpers import M, update


def test_hetlora_keep_renormalises_per_slice_and_keeps_uncovered_components():
    """p = (5/7, 2/7) from ‖B_k A_k‖ = (5, 2); component 0: both clients; component 1: only client two
    (weight renormalised to 1); component 2: nobody, so the previous global value stays."""
    u1 = update([[1.0], [0.0], [0.0]], [[3.0, 4.0]], 1, "one")
    u2 = update([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]], 100, "two")
    previous = {M + B_SUFFIX: torch.full((3, 3), 7.0), M + A_SUFFIX: torch.full((3, 2), 9.0)}
    g = aggregate("hetlora-keep", [u1, u2], r_max=3, previous=previous)
    torch.testing.assert_close(g[M + B_SUFFIX], torch.tensor([[5 / 7, 0, 7], [4 / 7, 0, 7], [0, 0, 7.0]]))
    torch.testing.assert_close(g[M + A_SUFFIX], torch.tensor([[15 / 7, 22 / 7], [1.0, 1.0], [9.0, 9.0]]))
    plain = aggregate("hetlora", [u1, u2], r_max=3)  # zero-padding: components 1 and 2 shrink or die
    assert float(plain[M + A_SUFFIX][2].abs().sum()) == 0 and float(plain[M + A_SUFFIX][1, 0]) == pytest.approx(2 / 7)
