"""Live rank and rank energy of a global adapter (docs/algorithm.md §3), against dense computations."""

import pytest
import torch

from hetlora.core.adapter import zero_pad_adapter
from hetlora.core.rank_health import live_rank, rank_energy, slice_energy, trainable_rank


def adapter(rank, out=7, inn=5, seed=0, layers=2):
    g = torch.Generator().manual_seed(seed)
    return {
        **{f"m{i}.lora_A.weight": torch.randn(rank, inn, generator=g) for i in range(layers)},
        **{f"m{i}.lora_B.weight": torch.randn(out, rank, generator=g) for i in range(layers)},
    }


def test_live_rank_counts_components_alive_in_any_layer():
    a = adapter(6)
    a["m0.lora_B.weight"][:, 4:] = 0  # components 4, 5 dead in layer 0 ...
    a["m1.lora_A.weight"][5] = 0  # ... and component 5 dead in layer 1: 4 stays alive through layer 1
    assert live_rank(a) == 5
    a["m0.lora_A.weight"][2] = 0  # a dead A row in one layer only: component 2 lives on in layer 1
    assert live_rank(a) == 5
    assert live_rank(zero_pad_adapter(adapter(3), 8)) == 3


def test_slice_energy_is_the_dense_norm_of_the_slice():
    a = adapter(6, seed=1)
    dense = sum(float((a[f"m{i}.lora_B.weight"][:, 1:4].double() @ a[f"m{i}.lora_A.weight"][1:4].double()).square().sum())
                for i in range(2))
    assert slice_energy(a, 1, 4) == pytest.approx(dense, rel=1e-6)  # fp32 Gram matrices, a float64 reduction


def test_rank_energy_shares_add_up_and_sit_where_the_energy_is():
    a = adapter(6, seed=2)
    shares = rank_energy(a, 2, 4, 6)
    assert shares["low"] + shares["mid"] + shares["high"] == pytest.approx(1.0)
    a = zero_pad_adapter(adapter(2, seed=3), 6)  # all energy in the first two components
    shares = rank_energy(a, 2, 4, 6)
    assert (shares["low"], shares["mid"], shares["high"]) == (pytest.approx(1.0), 0.0, 0.0)
    assert shares["bounds"] == [2, 4, 6]


def test_trainable_rank_counts_components_with_either_factor_alive():
    """LoRA's own init (B = 0) is trainable at full rank and live at 0; a component is lost only when its B
    column and A row are zero in every layer (zero padding does that)."""
    from hetlora.device.lora import lora_init

    fresh = lora_init({"m0": (7, 5), "m1": (3, 5)}, 6, seed=0)
    assert trainable_rank(fresh) == 6 and live_rank(fresh) == 0
    a = adapter(6)
    a["m0.lora_B.weight"][:, 4:] = 0
    a["m1.lora_B.weight"][:, 4:] = 0  # components 4, 5: B zero everywhere, A still non-zero → trainable, not live
    assert trainable_rank(a) == 6 and live_rank(a) == 4
    a["m0.lora_A.weight"][5] = 0
    a["m1.lora_A.weight"][5] = 0  # component 5: both factors zero in every layer → lost
    assert trainable_rank(a) == 5
    assert trainable_rank(zero_pad_adapter(adapter(3), 8)) == 3
