import pytest
import torch

from hetlora import prune_rank, tail_penalty, tail_start


@pytest.mark.parametrize(
    "rank,gamma,expected",
    [(5, 0.99, 4), (50, 0.99, 49), (10, 0.5, 5), (7, 0.3, 2), (1, 0.99, 0), (4, 1.0, 3), (9, 0.95, 8)],
)
def test_tail_start_uses_floor_and_never_empty_tail(rank, gamma, expected):
    assert tail_start(rank, gamma) == expected


def test_tail_start_rejects_bad_inputs():
    with pytest.raises(ValueError):
        tail_start(0, 0.9)
    with pytest.raises(ValueError):
        tail_start(4, 0.0)


def test_tail_penalty_hand_computed():
    # B tail (cols 2:) = [[3],[4]] -> ||.|| = 5 ; A tail (rows 2:) = [[1, 2, 2]] -> 3 ; product 15
    b1 = torch.tensor([[9.0, 9.0, 3.0], [9.0, 9.0, 4.0]])
    a1 = torch.tensor([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0], [1.0, 2.0, 2.0]])
    # second module: B tail norm 1, A tail norm 2 -> 2
    b2 = torch.tensor([[0.0, 0.0, 1.0]])
    a2 = torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.0, 2.0]])
    assert float(tail_penalty([(b1, a1), (b2, a2)], start=2)) == pytest.approx(17.0)


def test_tail_penalty_gradient_is_finite_at_zero_b():
    b = torch.zeros(6, 4, requires_grad=True)
    a = torch.randn(4, 3, requires_grad=True)
    p = tail_penalty([(b, a)], start=3)
    p.backward()
    assert torch.isfinite(b.grad).all() and torch.isfinite(a.grad).all()


def test_tail_penalty_gradient_only_touches_tail():
    b = torch.randn(6, 4, requires_grad=True)
    a = torch.randn(4, 3, requires_grad=True)
    tail_penalty([(b, a)], start=3).backward()
    assert torch.all(b.grad[:, :3] == 0) and torch.all(a.grad[:3] == 0)
    assert b.grad[:, 3:].abs().sum() > 0 and a.grad[3:].abs().sum() > 0


def test_prune_rule():
    assert prune_rank(1.0, 0.5, rank=10, gamma=0.99, r_min=5) == 9
    assert prune_rank(1.0, 1.0, rank=10, gamma=0.99, r_min=5) == 10  # not lower: keep
    assert prune_rank(1.0, 2.0, rank=10, gamma=0.99, r_min=5) == 10
    assert prune_rank(1.0, 0.5, rank=10, gamma=0.5, r_min=3) == 5
    assert prune_rank(1.0, 0.5, rank=10, gamma=0.5, r_min=7) == 7  # floor at r_min
    assert prune_rank(1.0, 0.5, rank=5, gamma=0.99, r_min=5) == 5  # never below r_min
    assert prune_rank(1.0, 0.5, rank=3, gamma=0.99, r_min=5) == 3  # never grows
    assert prune_rank(0.0, 0.0, rank=10, gamma=0.99, r_min=5) == 10  # first visit: B = 0
