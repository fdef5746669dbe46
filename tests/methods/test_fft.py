"""fft: FedAvg over full weights."""

import math

import pytest
import torch

from hetlora import ClientUpdate, InvalidUpdate, aggregate
from tests.methods.helpers import assert_close


def test_fft_averages_full_weights():
    w1 = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0])}
    w2 = {"w": torch.tensor([[3.0, 6.0]]), "b": torch.tensor([4.0])}
    g = aggregate("fft", [ClientUpdate(w1, 1, "a"), ClientUpdate(w2, 3, "b")], r_max=1)
    assert_close(g["w"], torch.tensor([[2.5, 5.0]]))
    assert_close(g["b"], torch.tensor([3.0]))
    w2["w"][0, 0] = math.inf
    with pytest.raises(InvalidUpdate, match="b"):
        aggregate("fft", [ClientUpdate(w1, 1, "a"), ClientUpdate(w2, 3, "b")], r_max=1)
