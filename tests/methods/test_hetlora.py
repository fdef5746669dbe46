"""hetlora: sparsity weights ∝ ‖B_k A_k‖_F (per client or per layer) against hand-computed cases."""

import torch

from hetlora import ClientUpdate, aggregate, zero_pad_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from tests.helpers import SHAPES, product
from tests.methods.helpers import assert_close, mixed_round


def test_hetlora_sparsity_weighted_hand_computed():
    # client 1: rank 1, ||B1 A1|| = 5 ; client 2: rank 2, ||B2 A2|| = 2 -> p = (5/7, 2/7); data size ignored
    u1 = ClientUpdate({"m" + B_SUFFIX: torch.tensor([[1.0], [0.0], [0.0]]), "m" + A_SUFFIX: torch.tensor([[3.0, 4.0]])}, 1, "one")
    u2 = ClientUpdate(
        {"m" + B_SUFFIX: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), "m" + A_SUFFIX: torch.tensor([[0.0, 1.0], [1.0, 1.0]])},
        100,
        "two",
    )
    g = aggregate("hetlora", [u1, u2], r_max=3)
    assert_close(g["m" + B_SUFFIX], torch.tensor([[5 / 7, 0, 0], [4 / 7, 0, 0], [0, 0, 0.0]]))
    assert_close(g["m" + A_SUFFIX], torch.tensor([[15 / 7, 22 / 7], [2 / 7, 2 / 7], [0, 0.0]]))


def test_hetlora_falls_back_to_data_weights_when_all_norms_zero():
    updates = mixed_round()
    for u in updates:
        for m in SHAPES:
            u.adapter[m + B_SUFFIX].zero_()
    g = aggregate("hetlora", updates, r_max=6)
    naive = aggregate("hetlora-naive", updates, r_max=6)
    for k in g:
        assert_close(g[k], naive[k])


def test_hetlora_per_layer_weights_differ_from_per_client():
    updates = mixed_round()
    g1 = aggregate("hetlora", updates, r_max=6)
    g2 = aggregate("hetlora", updates, r_max=6, per_layer=True)
    # per-layer: module m's A^g = Σ p_{k,m} pad(A_k) with p_{k,m} ∝ ||B_k A_k||_m
    for m in SHAPES:
        norms = [float(torch.linalg.matrix_norm(product(u.adapter, m))) for u in updates]
        p = [n / sum(norms) for n in norms]
        expected = sum(w * zero_pad_adapter(u.adapter, 6)[m + A_SUFFIX] for w, u in zip(p, updates))
        assert_close(g2[m + A_SUFFIX], expected)
    assert not torch.allclose(g1["layers.0.q_proj" + A_SUFFIX], g2["layers.0.q_proj" + A_SUFFIX])
