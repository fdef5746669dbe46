"""fedex-lora against hand-computed cases: averaged factors plus the exact residual folded into the frozen weights."""

import torch

from hetlora import METHODS, ClientUpdate, aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.base_delta import dense_delta, fold
from hetlora.methods import AggregationContext
from tests.methods.helpers import M, T, prod, update

FEDEX = [update([[1, 0], [0, 1], [1, 1]], [[1, 0, 0, 1], [0, 1, 0, 0]], 5, "c0"),
         update([[0, 1], [1, 0], [2, 0]], [[0, 0, 1, 0], [1, 1, 0, 0]], 50, "c1")]


def test_fedex_lora_averages_factors_and_folds_the_exact_residual():
    """The authors' worked example (uniform weights whatever n_k): R = M − B̄Ā is rank one."""
    method, ctx = METHODS["fedex-lora"], AggregationContext(r_max=2)
    g = aggregate("fedex-lora", FEDEX, r_max=2)
    torch.testing.assert_close(g[M + A_SUFFIX].double(), T([[0.5, 0, 0.5, 0.5], [0.5, 1, 0, 0]]))
    torch.testing.assert_close(g[M + B_SUFFIX].double(), T([[0.5, 0.5], [0.5, 0.5], [1.5, 0.5]]))
    residual = dense_delta(fold(None, method.base_update(FEDEX, g, ctx)), M).double()
    torch.testing.assert_close(residual, T([[0.5, 0, -0.25, 0.25], [-0.5, 0, 0.25, -0.25], [-0.5, 0, 0.25, -0.25]]), atol=1e-6, rtol=0)


def test_fedex_lora_is_exact_under_mixed_ranks():
    """Zero-padding extends it: W0 + s(R + B̄Ā) = W0 + s·mean_k B_k A_k, whatever the ranks."""
    g0 = torch.Generator().manual_seed(0)
    ups = [ClientUpdate({M + B_SUFFIX: torch.randn(7, r, generator=g0), M + A_SUFFIX: torch.randn(r, 5, generator=g0)}, 10, f"c{r}")
           for r in (1, 3, 4)]
    ctx = AggregationContext(r_max=4)
    g = aggregate("fedex-lora", ups, r_max=4)
    residual = dense_delta(fold(None, METHODS["fedex-lora"].base_update(ups, g, ctx)), M).double()
    mean = sum(prod(u.adapter) for u in ups) / 3
    torch.testing.assert_close(residual + prod(g), mean, rtol=1e-5, atol=1e-5)


def test_fedex_lora_folds_the_residual_of_the_bounded_updates():
    """The issue's repro: one (6, 5) module, 3 clients of rank 2, client 0's B × 50, bound 1.5. The effective
    update B̄Ā + R must be the mean of the *bounded* products, not of the raw ones."""
    from hetlora.core.robust import bound_updates
    from hetlora.methods import aggregate_round
    from tests.helpers import make_update

    shapes = {M: (6, 5)}
    ups = [make_update(2, seed=41 + k, n=10, cid=f"c{k}", shapes=shapes) for k in range(3)]
    ups[0].adapter[M + B_SUFFIX] = ups[0].adapter[M + B_SUFFIX] * 50
    ctx = AggregationContext(r_max=2, norm_bound=1.5)
    g, base = aggregate_round(METHODS["fedex-lora"], ups, ctx)
    effective = prod(g) + dense_delta(fold(None, base), M).double()
    bounded = sum(prod(u.adapter) for u in bound_updates(ups, 1.5)) / 3
    raw = sum(prod(u.adapter) for u in ups) / 3
    torch.testing.assert_close(effective, bounded, rtol=1e-5, atol=1e-5)
    assert float((effective - raw).abs().max()) > 1.0  # the raw mean is far away: the bound acted
