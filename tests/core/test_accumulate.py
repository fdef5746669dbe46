"""One padded accumulation (docs/algorithm.md §2.3): the weighted sum and the slice average by hand, float64
accumulation whatever the order updates arrive in, and a sketch's scattered components."""

import itertools

import pytest
import torch

from hetlora.core.accumulate import PaddedSum
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX


def factors(rank, value):
    return {"m" + B_SUFFIX: torch.full((3, rank), float(value)), "m" + A_SUFFIX: torch.full((rank, 2), float(value))}


def test_the_weighted_sum_and_the_slice_average_by_hand():
    acc = PaddedSum(4)
    acc.add(factors(1, 2.0), 0.5)  # component 0: 0.5·2
    acc.add(factors(3, 10.0), 0.25)  # components 0-2: 0.25·10
    total = acc.total()
    assert total["m" + B_SUFFIX].dtype == torch.float32
    assert torch.equal(total["m" + A_SUFFIX][:, 0], torch.tensor([3.5, 2.5, 2.5, 0.0]))
    assert torch.equal(total["m" + B_SUFFIX][0], torch.tensor([3.5, 2.5, 2.5, 0.0]))
    previous = {k: torch.full_like(v, -1.0) for k, v in total.items()}
    avg = acc.slice_average(previous)  # component 0: 3.5 / 0.75; 1-2: 2.5 / 0.25; 3: nobody → previous
    assert avg["m" + A_SUFFIX][:, 1].tolist() == pytest.approx([3.5 / 0.75, 10.0, 10.0, -1.0])
    assert avg["m" + B_SUFFIX][2].tolist() == pytest.approx([3.5 / 0.75, 10.0, 10.0, -1.0])


def test_the_sum_does_not_depend_on_the_order_updates_arrive_in():
    """What a streaming server needs: each update folded in as it arrives, the same result in any order: the
    float64 sums agree to 1e-15 relative, so their fp32 results differ by at most one rounding (1 ulp)."""
    g = torch.Generator().manual_seed(0)
    updates = [({"m" + B_SUFFIX: torch.randn(64, r, generator=g) * 10 ** e, "m" + A_SUFFIX: torch.randn(r, 32, generator=g)}, w)
               for r, e, w in [(2, 3, 0.3), (4, -3, 0.9), (3, 0, 0.1), (4, 2, 0.7)]]
    sums = []
    for order in itertools.permutations(updates):
        acc = PaddedSum(4)
        for adapter, w in order:
            acc.add(adapter, w)
        sums.append(acc)
    first = sums[0].total(torch.float64)
    for acc in sums:
        for key, value in acc.total(torch.float64).items():
            assert torch.allclose(value, first[key], rtol=1e-15, atol=1e-15 * float(first[key].abs().max()))
            ulp = torch.finfo(torch.float32).eps * first[key].float().abs()
            assert bool(((acc.total()[key] - first[key].float()).abs() <= ulp).all())
    batch = PaddedSum(4)
    batch.add_all([a for a, _ in updates], [w for _, w in updates])
    assert all(torch.equal(batch.total()[k], sums[0].total()[k]) for k in first)  # the same order: the same bits


def test_a_sketch_lands_on_its_own_components():
    acc = PaddedSum(5)
    acc.add(factors(2, 1.0), 1.0, indices=[1, 3])
    acc.add(factors(1, 4.0), 1.0, indices=[3])
    a = acc.total()["m" + A_SUFFIX][:, 0]
    assert a.tolist() == [0.0, 1.0, 0.0, 5.0, 0.0]
    assert acc.mass("m").tolist() == [0.0, 1.0, 0.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="nothing was added"):
        PaddedSum(3).total()


def test_an_update_without_one_rank_that_fits_is_refused_and_leaves_the_sum_as_it_was():
    acc = PaddedSum(3)
    acc.add(factors(2, 1.0), 1.0)
    before = acc.total()
    mixed = {"m" + B_SUFFIX: torch.ones(3, 2), "m" + A_SUFFIX: torch.ones(3, 2), "n" + B_SUFFIX: torch.ones(3, 2),
             "n" + A_SUFFIX: torch.ones(2, 2)}
    with pytest.raises(ValueError, match="share one rank"):
        acc.add(mixed, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        acc.add(factors(4, 1.0), 1.0)
    after = acc.total()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert acc.count == 1 and acc.mass("m").tolist() == [1.0, 1.0, 0.0]


def test_an_a_weight_of_its_own_is_the_scaled_copy_added():
    """B × w_b and A × w_a folded in (a bounded update's scales) is the sum of the scaled copy, component by component."""
    from hetlora.core.accumulate import PaddedSum
    from hetlora.core.adapter import scale_adapter
    from tests.helpers import make_adapter

    x, y = make_adapter(3, seed=1), make_adapter(5, seed=2)
    by_factor, by_copy = PaddedSum(6), PaddedSum(6)
    by_factor.add(x, 0.7, a_weight=-2.5)
    by_factor.add(y, 1.5)
    by_copy.add(scale_adapter(x, b_scale=0.7, a_scale=-2.5))
    by_copy.add(y, 1.5)
    got, expected = by_factor.total(torch.float64), by_copy.total(torch.float64)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-15, atol=0) for k in expected)
    assert by_factor.count == 2


def test_a_spent_sum_gives_the_same_numbers_and_can_be_used_no_more():
    """``total(spend=True)`` (a streamed round's end: each float64 accumulator scaled in place and let go) gives
    the bits the non-spending total gives; afterwards the sum refuses to be added to or read, rather than read
    accumulators it no longer holds."""
    g = torch.Generator().manual_seed(3)
    updates = [({"m" + B_SUFFIX: torch.randn(5, r, generator=g), "m" + A_SUFFIX: torch.randn(r, 4, generator=g)}, w)
               for r, w in [(2, 0.3), (4, 1.7), (1, 0.05)]]
    for scale in (1.0, 1.0 / 2.05):
        kept, spent = PaddedSum(4), PaddedSum(4)
        for adapter, w in updates:
            kept.add(adapter, w)
            spent.add(adapter, w)
        expected = kept.total(scale=scale)
        got = spent.total(scale=scale, spend=True)
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
        assert spent.sums == {}
        for use in (lambda: spent.total(), lambda: spent.slice_average(), lambda: spent.add(updates[0][0], 1.0)):
            with pytest.raises(ValueError, match="spent"):
                use()
