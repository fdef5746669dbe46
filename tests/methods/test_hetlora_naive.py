"""hetlora-naive: zero-pad and average with data weights (equals fedavg when ranks agree)."""

from hetlora import aggregate, zero_pad_adapter
from tests.helpers import make_update
from tests.methods.helpers import assert_close, mixed_round, q_weights


def test_homogeneous_naive_equals_fedavg_equals_hand_average():
    updates = [make_update(4, seed=s, n=n) for s, n in enumerate((1, 2, 5))]
    naive = aggregate("hetlora-naive", updates, r_max=4)
    fed = aggregate("fedavg", updates, r_max=4)
    q = q_weights(updates)
    for k in fed:
        assert_close(naive[k], fed[k])
        assert_close(fed[k], sum(w * u.adapter[k] for w, u in zip(q, updates)))


def test_naive_zero_pads_mixed_ranks():
    updates = mixed_round()
    g = aggregate("hetlora-naive", updates, r_max=6)
    q = q_weights(updates)
    for k in g:
        assert_close(g[k], sum(w * zero_pad_adapter(u.adapter, 6)[k] for w, u in zip(q, updates)))
