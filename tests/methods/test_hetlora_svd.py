"""hetlora-svd / hetlora-revive / hetlora-svd-revive: HetLoRA's global model, with its rank health restored."""

import pytest
import torch

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.rank_health import live_rank, refactor_by_svd, revive, trainable_rank
from tests.helpers import SHAPES, product
from tests.methods.helpers import low_rank_round, mixed_round


def test_the_svd_refactoring_keeps_the_product_and_truncates_optimally():
    """B'A' = BA (≤ 1e-6 relative) and every truncation B'[:, :r] A'[:r] is the best rank-r approximation of BA
    (Eckart–Young: its error is the dense SVD's tail), for out < in, out > in, and a product of lower rank."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, r, true_rank in ((7, 11, 5, 5), (12, 6, 5, 5), (9, 8, 6, 3)):
        b = torch.randn(out_f, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g)
        a = torch.randn(r, in_f, generator=g)
        new_b, new_a = refactor_by_svd(b, a)
        dense = b.double() @ a.double()
        assert float((new_b.double() @ new_a.double() - dense).norm() / dense.norm()) <= 1e-6
        sigma = torch.linalg.svdvals(dense)
        for k in range(1, r + 1):
            error = float((new_b[:, :k].double() @ new_a[:k].double() - dense).norm())
            assert error == pytest.approx(float(sigma[k:].pow(2).sum().sqrt()), abs=1e-5 * float(sigma[0]))
        assert live_rank({"m" + B_SUFFIX: new_b, "m" + A_SUFFIX: new_a}) == true_rank  # the rest come out zero


def test_revive_gives_dead_components_an_a_row_and_leaves_the_product_exactly():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(7, 6, generator=g), torch.randn(6, 5, generator=g)
    b[:, 3:] = 0
    a[4:] = 0  # components 4, 5 dead; 3 has an A row (trainable, not live)
    new_b, new_a, count = revive(b, a, torch.Generator().manual_seed(2))
    assert count == 2 and torch.equal(new_b @ new_a, b @ a) and torch.equal(new_a[:4], a[:4])
    assert bool((new_a[4:].abs() > 0).all()) and float(new_a[4:].abs().max()) <= 1 / 5**0.5
    # the revived components receive a gradient on B: d/dB of a loss through B A x
    b_param = new_b.clone().requires_grad_(True)
    (torch.randn(3, 7, generator=g) * (torch.randn(3, 5, generator=g) @ (b_param @ new_a).T)).sum().backward()
    assert bool((b_param.grad[:, 4:].abs().sum(0) > 0).all())
    assert revive(b, a, torch.Generator().manual_seed(2))[1].equal(new_a)  # seeded


@pytest.mark.parametrize("method", ["hetlora-svd", "hetlora-revive", "hetlora-svd-revive"])
def test_the_variants_give_hetloras_global_model(method):
    for updates in (mixed_round(), low_rank_round()):
        het = aggregate("hetlora", updates, r_max=8)
        var = aggregate(method, updates, r_max=8, previous=None)
        for module in SHAPES:
            torch.testing.assert_close(product(var, module).double(), product(het, module).double(), rtol=1e-5, atol=1e-6)
        if "revive" in method:
            assert trainable_rank(var) == 8  # every component trainable after every round
        else:
            assert trainable_rank(var) <= max(u.adapter[next(iter(SHAPES)) + A_SUFFIX].shape[0] for u in updates)
