"""rbla: each rank slice averaged over the clients that have it."""

import torch

from hetlora import ClientUpdate, aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.methods.helpers import assert_close


def test_rbla_averages_each_slice_over_its_owners_hand_computed():
    b1, a1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, 2.0]])
    b2, a2 = torch.tensor([[5.0, 7.0], [6.0, 8.0]]), torch.tensor([[3.0, 4.0, 6.0], [1.0, 1.0, 1.0]])
    u1 = ClientUpdate({"m" + B_SUFFIX: b1, "m" + A_SUFFIX: a1}, 1, "a")
    u2 = ClientUpdate({"m" + B_SUFFIX: b2, "m" + A_SUFFIX: a2}, 3, "b")
    g = aggregate("rbla", [u1, u2], r_max=3)
    assert_close(g["m" + B_SUFFIX], torch.tensor([[4.0, 7.0, 0.0], [5.0, 8.0, 0.0]]))
    assert_close(g["m" + A_SUFFIX], torch.tensor([[2.5, 3.0, 5.0], [1.0, 1.0, 1.0], [0, 0, 0.0]]))
    prev = {"m" + B_SUFFIX: torch.full((2, 3), 9.0), "m" + A_SUFFIX: torch.full((3, 3), 9.0)}
    g2 = aggregate("rbla", [u1, u2], r_max=3, previous=prev)
    assert torch.all(g2["m" + B_SUFFIX][:, 2] == 9) and torch.all(g2["m" + A_SUFFIX][2] == 9)
