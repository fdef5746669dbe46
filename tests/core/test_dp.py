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


def test_rdp_accountant_matches_published_value():
    from hetlora.privacy import epsilon

    # noise 1.5, sampling rate 0.04, 2,250 steps, delta 1e-5 -> eps ~ 7.329 (RDP accountant)
    assert epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.329, abs=0.01)
    assert epsilon(1.5, 0.04, 0, 1e-5) == 0.0
    assert epsilon(1.5, 0.04, 100, 1e-5) < epsilon(1.5, 0.04, 200, 1e-5)
