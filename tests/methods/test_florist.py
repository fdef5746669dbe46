"""florist against hand-computed cases: the weighted sum's SVD cut at an energy threshold, all of it folded into the base."""

import pytest
import torch

from hetlora import METHODS, aggregate
from hetlora.config import RunConfig
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.base_delta import dense_delta, fold
from hetlora.methods import AggregationContext
from hetlora.methods.florist import energy_rank
from tests.methods.helpers import M, T, mixed_round, prod, q_weights, update

# ΔW = ½(6 E11 + 2 E33) + ½(4 E22) = diag(3, 2, 1) on a 4 × 3 module: σ = 3, 2, 1, energies 9, 4, 1 of 14,
# cumulative 0.643, 0.929, 1; client 0 has rank 2 and client 1 rank 1
DIAGONAL = [update([[6, 0], [0, 0], [0, 2], [0, 0]], [[1, 0, 0], [0, 0, 1]], 10, "c0"),
            update([[0], [4], [0], [0]], [[0, 1, 0]], 10, "c1")]


def E(*diagonal):
    out = torch.zeros(4, 3, dtype=torch.float64)
    for i, value in enumerate(diagonal):
        out[i, i] = value
    return out


@pytest.mark.parametrize("energy, kept", [(0.5, (3,)), (0.64, (3,)), (0.65, (3, 2)), (0.9, (3, 2)), (0.93, (3, 2, 1)), (1.0, (3, 2, 1))])
def test_florist_keeps_the_fewest_components_that_reach_the_energy(energy, kept):
    g = aggregate("florist", DIAGONAL, r_max=4, energy=energy)
    b, a = g[M + B_SUFFIX].double(), g[M + A_SUFFIX].double()
    assert b.shape == (4, len(kept)) and a.shape == (len(kept), 3)  # its rank is chosen by the energy, not r_max
    torch.testing.assert_close(b @ a, E(*kept), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.norm(dim=0), T(list(kept)), atol=1e-6, rtol=0)  # the authors' split: B = U_k Σ_k
    torch.testing.assert_close(a @ a.T, torch.eye(len(kept), dtype=torch.float64), atol=1e-6, rtol=0)  # A = V_kᵀ


def test_florist_folds_all_of_its_update_into_the_base_and_weights_by_examples():
    """Clients start fresh LoRAs (FLoRA's client): the base update is the whole cut aggregate; at τ = 1 it is exactly
    Σ_k q_k B_k A_k with q_k = n_k / Σ n (mixed ranks, unequal n)."""
    ups = mixed_round()
    method, ctx = METHODS["florist"], AggregationContext(r_max=8, options={"energy": 1.0})
    g = aggregate("florist", ups, r_max=8, energy=1.0)
    base = fold(None, method.base_update(ups, g, ctx))
    for module in {k.rsplit(".lora_", 1)[0] for k in g}:
        want = sum(q * u.adapter[module + B_SUFFIX].double() @ u.adapter[module + A_SUFFIX].double() for q, u in zip(q_weights(ups), ups))
        torch.testing.assert_close(dense_delta(base, module).double(), want, rtol=1e-5, atol=1e-5)
    assert METHODS["florist"].client_kind == "flora" and METHODS["florist"].folds_into_base


def test_florist_matches_the_dense_svd_when_the_stack_is_wide():
    """A stacked rank near min(out, in) takes the Gram route: the same cut product as the SVD of the dense sum."""
    g0 = torch.Generator().manual_seed(3)
    ups = [update(torch.randn(12, 4, generator=g0).tolist(), torch.randn(4, 10, generator=g0).tolist(), 5 + k, f"c{k}") for k in range(3)]
    dense = sum(q * prod(u.adapter) for q, u in zip(q_weights(ups), ups))
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = energy_rank(s, 0.8)
    g = aggregate("florist", ups, r_max=4, energy=0.8)
    assert g[M + B_SUFFIX].shape == (12, k)
    torch.testing.assert_close(prod(g), (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-5, atol=1e-5)


def test_energy_rank_by_hand_and_a_zero_update():
    s = T([3, 2, 1, 0])
    assert [energy_rank(s, e) for e in (0.6, 0.7, 0.95, 1.0)] == [1, 2, 3, 3]
    assert energy_rank(T([0, 0]), 0.9) == 1  # nothing to keep: one zero component, not an empty adapter


def test_an_energy_outside_its_range_is_one_clear_error():
    with pytest.raises(ValueError, match=r"energy threshold must be in \(0, 1\]"):
        aggregate("florist", DIAGONAL, r_max=4, energy=0.0)
    with pytest.raises(ValueError, match=r"florist_energy must be in \(0, 1\], got 1.5"):
        RunConfig(method="florist", florist_energy=1.5).validate()


def test_the_run_config_reaches_the_rule():
    """--florist-energy is what the server's round context hands the method."""
    from types import SimpleNamespace

    from hetlora.server.federation import Federation

    server = SimpleNamespace(cfg=RunConfig(method="florist", florist_energy=0.75), method=METHODS["florist"])
    assert Federation._options(server) == {"energy": 0.75}
    assert Federation._options(SimpleNamespace(cfg=RunConfig(method="flora"), method=METHODS["flora"])) == {}
