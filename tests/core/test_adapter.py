import pytest
import torch

from hetlora import adapter_rank, product_norm_sq, truncate_adapter, update_norm, zero_pad_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, module_names
from tests.helpers import SHAPES, make_adapter, product


def test_truncate_keeps_leading_components_hand_computed():
    a = torch.arange(12.0).reshape(4, 3)  # r=4, in=3
    b = torch.arange(20.0).reshape(5, 4)  # out=5, r=4
    out = truncate_adapter({"m" + A_SUFFIX: a, "m" + B_SUFFIX: b}, 2)
    assert out["m" + A_SUFFIX].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["m" + B_SUFFIX].tolist() == [[0, 1], [4, 5], [8, 9], [12, 13], [16, 17]]


def test_truncated_product_is_sum_of_leading_rank_one_terms():
    ad = make_adapter(6, seed=1)
    t = truncate_adapter(ad, 4)
    for m in SHAPES:
        b, a = ad[m + B_SUFFIX], ad[m + A_SUFFIX]
        expected = sum(torch.outer(b[:, i], a[i]) for i in range(4))
        torch.testing.assert_close(product(t, m), expected)


def test_truncate_does_not_alias_input():
    ad = make_adapter(3)
    t = truncate_adapter(ad, 2)
    t["layers.0.q_proj" + A_SUFFIX].zero_()
    assert ad["layers.0.q_proj" + A_SUFFIX].abs().sum() > 0


def test_truncate_beyond_rank_raises():
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_adapter(make_adapter(3), 4)


def test_zero_pad_is_zeros_and_keeps_product():
    ad = make_adapter(3, seed=2)
    p = zero_pad_adapter(ad, 8)
    assert adapter_rank(p) == 8
    for m in SHAPES:
        assert torch.all(p[m + A_SUFFIX][3:] == 0) and torch.all(p[m + B_SUFFIX][:, 3:] == 0)
        torch.testing.assert_close(product(p, m), product(ad, m))
    back = truncate_adapter(p, 3)
    for k in ad:
        assert torch.equal(back[k], ad[k])


def test_zero_pad_to_smaller_rank_raises():
    with pytest.raises(ValueError, match="cannot zero-pad"):
        zero_pad_adapter(make_adapter(4), 3)


def test_product_norm_matches_dense_frobenius():
    ad = make_adapter(4, seed=3)
    total = 0.0
    for m in SHAPES:
        b, a = ad[m + B_SUFFIX], ad[m + A_SUFFIX]
        dense = torch.linalg.matrix_norm(b @ a) ** 2
        torch.testing.assert_close(product_norm_sq(b, a), dense)
        total += float(dense)
    assert update_norm(ad) == pytest.approx(total**0.5)


def test_product_norm_hand_computed():
    # B = [[1, 0], [0, 2], [0, 0]] (3x2), A = [[1, 1, 1, 1], [0, 1, 0, 0]] (2x4)
    # BA = [[1,1,1,1],[0,2,0,0],[0,0,0,0]] -> ||BA||^2 = 4 + 4 = 8
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    assert float(product_norm_sq(b, a)) == pytest.approx(8.0)


def test_module_names_and_rank():
    ad = make_adapter(5)
    assert module_names(ad) == sorted(SHAPES)
    assert adapter_rank(ad) == 5


def test_product_norm_does_not_overflow_for_huge_finite_factors():
    """‖BA‖² is formed in float64: fp32 Gram matrices overflow for |B| ~ 1e20 and fp16 far sooner."""
    from hetlora.core.adapter import product_norm_sq

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    huge = product_norm_sq(b * 1e20, a)
    assert torch.isfinite(huge)
    assert float(huge) == pytest.approx(float(((b * 1e20).double() @ a.double()).square().sum()), rel=1e-9)


def test_mixed_precision_factors_give_the_fp32_norm():
    from hetlora.core.adapter import product_norm_sq

    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(9, 4, generator=g), (100 * torch.randn(4, 6, generator=g)).half()
    expected = float((b.double() @ a.double()).square().sum())
    assert float(product_norm_sq(b, a)) == pytest.approx(expected, rel=1e-6)


def test_the_product_norm_is_the_dense_norm_to_fp32_gram_precision_and_exact_for_huge_factors():
    """fp32 Gram matrices with a float64 reduction: within 1e-6 of the dense ‖BA‖²; factors so large that fp32 Grams
    overflow (|B| ~ 1e20) are formed again in float64, so the norm stays finite and right."""
    import math

    from hetlora.core.adapter import product_norm_sq, update_norm

    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
    dense = float((b.double() @ a.double()).square().sum())
    assert float(product_norm_sq(b, a)) == pytest.approx(dense, rel=1e-6)
    huge = b * 1e20
    assert float(product_norm_sq(huge, a)) == pytest.approx(dense * 1e40, rel=1e-6)
    adapter = {"m.lora_B.weight": huge, "m.lora_A.weight": a, "n.lora_B.weight": b, "n.lora_A.weight": a}
    assert update_norm(adapter) == pytest.approx(math.sqrt(dense * 1e40 + dense), rel=1e-6)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.float64, 1.0), (torch.float32, 1e20)])
def test_gram_norms_are_the_factor_and_product_norms(dtype, scale):
    """One pass over the Grams gives ‖B‖, ‖A‖ (dense norms, to fp32 Gram precision) and update_norm's own ‖BA‖
    (the same number); fp32 Grams that overflow (|B| ~ 1e20) are formed again in float64."""
    from hetlora.core.adapter import gram_norms

    adapter = {k: (v * scale if k.endswith(B_SUFFIX) else v).to(dtype) for k, v in make_adapter(5, seed=3).items()}
    nb, na, np_ = gram_norms(adapter)
    dense_b = sum(float(v.double().square().sum()) for k, v in adapter.items() if k.endswith(B_SUFFIX)) ** 0.5
    dense_a = sum(float(v.double().square().sum()) for k, v in adapter.items() if k.endswith(A_SUFFIX)) ** 0.5
    dense_p = sum(float((adapter[m + B_SUFFIX].double() @ adapter[m + A_SUFFIX].double()).square().sum()) for m in SHAPES) ** 0.5
    rel = 1e-12 if dtype == torch.float64 or scale != 1.0 else 1e-6
    assert nb == pytest.approx(dense_b, rel=rel) and na == pytest.approx(dense_a, rel=rel) and np_ == pytest.approx(dense_p, rel=max(rel, 1e-6))
    assert np_ == update_norm(adapter)


def test_the_norms_sum_each_modules_float64_term_exactly_rounded():
    """update_norm and gram_norms read every module's term back at once: the result is still math.fsum of the
    per-module float64 terms, each formed as product_norm_sq forms it (the same bits), and 0 for no module."""
    import math

    from hetlora.core.adapter import gram_norms, lora_pairs

    adapter = make_adapter(3, seed=11)
    terms = [float(product_norm_sq(b, a)) for _, b, a in lora_pairs(adapter)]
    assert update_norm(adapter) == math.sqrt(math.fsum(terms))
    assert gram_norms(adapter)[2] == update_norm(adapter)
    b_sq = math.fsum(float((b.T @ b).diagonal().sum(dtype=torch.float64)) for _, b, _ in lora_pairs(adapter))
    assert gram_norms(adapter)[0] == math.sqrt(b_sq)
    assert update_norm({}) == 0.0 and gram_norms({}) == (0.0, 0.0, 0.0)
