"""DP-FedAvg as a wrapper: it stands in only for a zero-padded weighted sum, and keeps the wrapped method's own step on
the aggregate (docs/algorithm.md §6)."""

import pytest
import torch

from hetlora import METHODS
from hetlora.config import RunConfig
from hetlora.core.rank_health import refactor_by_svd
from hetlora.methods import aggregate_round
from hetlora.methods.base import AggregationContext
from hetlora.methods.dp import DPFedAvg
from tests.helpers import SHAPES, make_adapter, make_update, product

R_MAX = 8
# the rules DP-FedAvg's clipped, equally weighted sum of zero-padded changes can stand for, listed by hand
STANDS_FOR = {"hetlora", "hetlora-naive", "fedavg", "hetlora-svd", "hetlora-revive", "hetlora-svd-revive"}


def ctx():
    return AggregationContext(r_max=R_MAX, previous=make_adapter(R_MAX, seed=99), shapes=SHAPES, generator=torch.Generator().manual_seed(3))


def updates():
    return [make_update(r, seed=s, n=10 + s) for s, r in enumerate([2, 8, 5, 3])]


def test_dp_wraps_exactly_the_zero_padded_weighted_sums_and_refuses_a_rule_it_would_silently_replace():
    assert {name for name, m in METHODS.items() if m.dp_capable} == STANDS_FOR
    for name in sorted(set(METHODS) - STANDS_FOR):
        with pytest.raises(ValueError, match="stands in only for"):
            DPFedAvg(METHODS[name], clip_norm=1.0, noise_multiplier=1.0, expected_clients=4)
        with pytest.raises(ValueError, match=f"{name}'s is not, and would be silently replaced"):
            RunConfig(method=name, dp_clip=1.0, dp_noise=1.0, model="tiny").validate()


@pytest.mark.parametrize("name", ["hetlora-svd", "hetlora-svd-revive"])
def test_a_wrapped_methods_own_step_runs_on_the_release(name):
    """hetlora-svd under DP: the same noised release as hetlora's (same generator), then re-factored by SVD — the
    global ΔW unchanged, its factors ordered by energy (post-processing: nothing of any client is read)."""
    plain, _ = aggregate_round(DPFedAvg(METHODS["hetlora"], 0.5, 0.7, 4), updates(), ctx())
    wrapped, _ = aggregate_round(DPFedAvg(METHODS[name], 0.5, 0.7, 4), updates(), ctx())
    for module in SHAPES:
        torch.testing.assert_close(product(wrapped, module), product(plain, module), rtol=1e-4, atol=1e-5)
        b, a = refactor_by_svd(plain[module + ".lora_B.weight"], plain[module + ".lora_A.weight"])
        if name == "hetlora-svd":
            torch.testing.assert_close(wrapped[module + ".lora_B.weight"], b, rtol=1e-4, atol=1e-5)
        energy = wrapped[module + ".lora_B.weight"].norm(dim=0) * wrapped[module + ".lora_A.weight"].norm(dim=1)
        live = energy[energy > 1e-6]
        assert torch.all(live[:-1] >= live[1:] - 1e-5)  # components in decreasing energy, as SVD orders them
