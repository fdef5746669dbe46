import pytest
import torch

from hetlora import ClientUpdate, truncate_adapter
from hetlora.core.dp import client_delta, clip_to_norm, dp_aggregate, flat_norm
from tests.helpers import make_adapter


def test_clip_bounds_every_update_and_keeps_small_ones():
    big = make_adapter(4, seed=1, b_scale=100.0)
    clipped = clip_to_norm(big, 2.0)
    assert flat_norm(clipped) == pytest.approx(2.0)
    small = {k: v * 1e-3 for k, v in make_adapter(4, seed=2).items()}
    same = clip_to_norm(small, 2.0)
    assert all(torch.equal(same[k], small[k]) for k in small)


def test_delta_is_on_the_clients_slice_only():
    g = make_adapter(6, seed=3)
    client = truncate_adapter(g, 3)
    key = next(iter(client))
    client[key] = client[key] + 1.0
    d = client_delta(ClientUpdate(client, 5, "a"), g, 6)
    assert flat_norm(d) == pytest.approx(client[key].numel() ** 0.5)


def test_without_noise_dp_aggregate_is_mean_of_clipped_deltas():
    g = make_adapter(4, seed=4)
    updates = []
    for s in range(3):
        ad = {k: v + 0.01 * (s + 1) for k, v in truncate_adapter(g, 2 + s % 3).items()}
        updates.append(ClientUpdate(ad, 7, f"c{s}"))
    out = dp_aggregate(g, updates, 4, clip_norm=1e6, noise_multiplier=0.0, expected_clients=3, generator=torch.Generator())
    expected = {k: g[k] + sum(client_delta(u, g, 4)[k] for u in updates) / 3 for k in g}
    for k in g:
        torch.testing.assert_close(out[k], expected[k])


def test_noise_has_the_configured_scale():
    g = {"m.lora_A.weight": torch.zeros(200, 300), "m.lora_B.weight": torch.zeros(300, 200)}
    u = ClientUpdate({k: v.clone() for k, v in g.items()}, 1, "a")  # zero delta
    out = dp_aggregate(g, [u], 200, clip_norm=0.5, noise_multiplier=1.2, expected_clients=4, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([t.flatten() for t in out.values()])
    expected_std = 1.2 * 0.5 / 4
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.01)
    assert abs(float(noise.mean())) < 0.01 * expected_std * 10


def test_epsilon_accounts_for_fixed_size_sampling_without_replacement():
    """ε is dp-accounting's for the sampler hetlora uses: K of N clients without replacement,
    replace-one neighbours, so σC noise on a sum of sensitivity 2C is a Gaussian of multiplier σ/2."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant

    from hetlora.server.privacy import epsilon

    def reference(event, steps):
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        acc.compose(event, steps)
        return acc.get_epsilon(1e-5)

    sampled = reference(dp_event.SampledWithoutReplacementDpEvent(100, 4, dp_event.GaussianDpEvent(0.75)), 30)
    assert epsilon(1.5, 4, 100, 30, 1e-5) == pytest.approx(sampled, rel=1e-9)
    # everybody every round: no amplification, T compositions of the Gaussian mechanism
    full = reference(dp_event.GaussianDpEvent(0.75), 30)
    assert epsilon(1.5, 100, 100, 30, 1e-5) == pytest.approx(full, rel=1e-6)
    # sampling 4 of 100 amplifies privacy; Poisson at the same rate is a different (cheaper) event
    assert epsilon(1.5, 4, 100, 30, 1e-5) < full
    assert epsilon(1.5, 4, 100, 0, 1e-5) == 0.0
    assert epsilon(1.5, 4, 100, 10, 1e-5) < epsilon(1.5, 4, 100, 20, 1e-5)
    with pytest.raises(ValueError, match="clients_per_round"):
        epsilon(1.5, 8, 5, 3, 1e-5)
