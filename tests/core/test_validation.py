import math

import pytest
import torch

from hetlora import ClientUpdate, InvalidUpdate, split_valid, validate_update, validate_updates
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.core.validation import reference_shapes
from tests.helpers import SHAPES, make_adapter, make_update

Q = "layers.0.q_proj"


def bad(mutate, **kw):
    u = make_update(4, seed=1, cid="mallory", **kw)
    mutate(u)
    return u


CASES = {
    "nan": (lambda u: u.adapter[Q + A_SUFFIX].__setitem__((0, 0), math.nan), "NaN or Inf"),
    "inf": (lambda u: u.adapter[Q + B_SUFFIX].__setitem__((1, 1), math.inf), "NaN or Inf"),
    "missing key": (lambda u: u.adapter.pop(Q + B_SUFFIX), "missing"),
    "extra module": (
        lambda u: u.adapter.update({"x.lora_A.weight": torch.zeros(4, 3), "x.lora_B.weight": torch.zeros(3, 4)}),
        "unexpected",
    ),
    "not a lora key": (lambda u: u.adapter.update({"lm_head.weight": torch.zeros(2, 2)}), "not LoRA factors"),
    "transposed A": (lambda u: u.adapter.__setitem__(Q + A_SUFFIX, u.adapter[Q + A_SUFFIX][:, :4].T.clone()), "do not fit"),
    "wrong in-features": (lambda u: u.adapter.__setitem__(Q + A_SUFFIX, torch.zeros(4, 6, dtype=torch.float64)), "do not fit"),
    "A/B rank mismatch": (lambda u: u.adapter.__setitem__(Q + B_SUFFIX, torch.zeros(7, 3, dtype=torch.float64)), "rank 4 but B has rank 3"),
    "ranks differ across modules": (
        lambda u: (u.adapter.__setitem__(Q + A_SUFFIX, torch.zeros(3, 5, dtype=torch.float64)), u.adapter.__setitem__(Q + B_SUFFIX, torch.zeros(7, 3, dtype=torch.float64))),
        "differs from rank",
    ),
    "1-D tensor": (lambda u: u.adapter.__setitem__(Q + A_SUFFIX, torch.zeros(20)), "2-D floating-point"),
    "integer tensor": (lambda u: u.adapter.__setitem__(Q + A_SUFFIX, torch.zeros(4, 5, dtype=torch.int64)), "float16, bfloat16, float32 or float64, got torch.int64"),
    "zero examples": (lambda u: setattr(u, "num_examples", 0), "num_examples"),
    "negative examples": (lambda u: setattr(u, "num_examples", -3), "num_examples"),
    "declared rank lies": (lambda u: setattr(u, "rank", 2), "declares rank 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_update_is_named(case):
    mutate, message = CASES[case]
    u = bad(mutate)
    with pytest.raises(InvalidUpdate, match=message) as err:
        validate_update(u, SHAPES, r_max=8)
    assert err.value.client == "mallory"
    assert "mallory" in str(err.value)


def test_rank_above_r_max_and_above_assigned_rank():
    u = make_update(6, cid="big")
    with pytest.raises(InvalidUpdate, match="exceeds r_max 5"):
        validate_update(u, SHAPES, r_max=5)
    with pytest.raises(InvalidUpdate, match="assigned rank 4"):
        validate_update(u, SHAPES, r_max=8, max_rank=4)


def test_good_update_returns_rank():
    assert validate_update(make_update(3), SHAPES, r_max=8) == 3


def test_majority_reference_survives_a_bad_first_client():
    wrong = {Q: (7, 5), "layers.0.down_proj": (5, 12)}
    updates = [ClientUpdate(make_adapter(2, shapes=wrong), 5, "bad")] + [make_update(r, seed=r) for r in (2, 3, 4)]
    assert reference_shapes(updates) == SHAPES
    with pytest.raises(InvalidUpdate) as err:
        validate_updates(updates, r_max=8)
    assert err.value.client == "bad"


def test_duplicate_client_in_one_round():
    with pytest.raises(InvalidUpdate, match="more than one update"):
        validate_updates([make_update(2, seed=1, cid="a"), make_update(3, seed=2, cid="a")], r_max=8)


def test_split_valid_drops_only_bad_clients():
    good = [make_update(r, seed=r, cid=f"g{r}") for r in (2, 3)]
    nan = make_update(2, seed=9, cid="nan")
    nan.adapter[Q + A_SUFFIX][0, 0] = math.nan
    dup = make_update(3, seed=7, cid="g2")
    stale = make_update(2, seed=8, cid="old")
    stale.round = 3
    big = make_update(5, seed=5, cid="big")
    kept, dropped = split_valid(good + [nan, dup, stale, big], 8, SHAPES, assigned_ranks={"big": 4}, round_index=4)
    assert [u.client_id for u in kept] == ["g2", "g3"]
    reasons = dict(dropped)
    assert set(reasons) == {"nan", "g2", "old", "big"}
    assert "NaN" in reasons["nan"] and "more than one" in reasons["g2"]
    assert "round 3" in reasons["old"] and "assigned rank 4" in reasons["big"]
