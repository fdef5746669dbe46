"""Rounds and comparisons the method tests share (the adapters themselves come from tests.helpers)."""

import torch

from hetlora import METHODS, ClientUpdate
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.helpers import SHAPES, make_update, product

LORA_METHODS = [m for m in METHODS if m != "fft"]


def assert_close(actual, expected, **kw):
    """Global adapters are fp32 whatever the clients sent; compare at fp32 precision."""
    assert actual.dtype == torch.float32 and not actual.requires_grad
    kw = {"rtol": 1e-5, "atol": 1e-5} | kw
    torch.testing.assert_close(actual, expected.to(torch.float32), **kw)


def mixed_round():
    return [make_update(r, seed=s, n=n) for s, (r, n) in enumerate([(2, 10), (5, 30), (3, 20), (6, 5)])]


def low_rank_round():
    return [make_update(r, seed=10 + s, n=n) for s, (r, n) in enumerate([(2, 10), (3, 30), (1, 20), (3, 5)])]


def dense_average(updates, weights):
    return {m: sum(w * product(u.adapter, m) for w, u in zip(weights, updates)) for m in SHAPES}


def q_weights(updates):
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


# one module "m" with hand-written factors (float64)
M = "m"
T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


def update(b, a, n, cid):
    return ClientUpdate({M + B_SUFFIX: T(b), M + A_SUFFIX: T(a)}, n, cid)


def prod(adapter):
    return adapter[M + B_SUFFIX].double() @ adapter[M + A_SUFFIX].double()
