"""flora: stacking is exact."""

from hetlora import aggregate
from hetlora.core.adapter import adapter_rank
from tests.helpers import SHAPES, product
from tests.methods.helpers import assert_close, dense_average, mixed_round, q_weights


def test_flora_is_exact_and_stacks():
    updates = mixed_round()
    g = aggregate("flora", updates, r_max=6)
    assert adapter_rank(g) == 2 + 5 + 3 + 6
    target = dense_average(updates, q_weights(updates))
    for m in SHAPES:
        assert_close(product(g, m), target[m])
