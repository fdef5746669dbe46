"""flexlora: recon-svd's product with Σ split evenly between the factors."""

from hetlora import aggregate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.helpers import SHAPES, product
from tests.methods.helpers import assert_close, low_rank_round


def test_flexlora_same_product_as_recon_svd_balanced_factors():
    updates = low_rank_round()
    g = aggregate("flexlora", updates, r_max=3)
    r = aggregate("recon-svd", updates, r_max=3)
    for m in SHAPES:
        assert_close(product(g, m), product(r, m))
        b_norms = g[m + B_SUFFIX].norm(dim=0)
        a_norms = g[m + A_SUFFIX].norm(dim=1)
        assert_close(b_norms, a_norms)  # √Σ on each side
