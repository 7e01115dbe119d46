"""xent.divergence (kl_div, entropy) against torch.nn.functional and float64 references."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import assert_close, assert_error_floor, assert_rounded_once

from xent.divergence import MEAN_WARNING, entropy, kl_div

SHAPES = [(), (5,), (9, 7, 41), (0, 3), (3, 0)]
KL_REDUCTIONS = ["none", "mean", "sum", "batchmean"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
HALF_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _log_probs(shape, gen, dtype=torch.float64) -> torch.Tensor:
    x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.log_softmax(-1) if len(shape) else -x.abs()).to(dtype)


def _target(shape, gen, log_target: bool, dtype=torch.float64) -> torch.Tensor:
    """Probabilities with some exact zeros, or finite log-probabilities."""
    y = _log_probs(shape, gen)
    if log_target:
        return y.to(dtype)
    p = y.exp()
    p.view(-1)[::5] = 0.0
    return p.to(dtype)


def _kl_value_and_grads(fn, x, y, upstream, **kwargs):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(x, y, **kwargs)
    gx, gy = torch.autograd.grad(out, (x, y), upstream.to(out.dtype))
    return out.detach(), gx, gy


# ---------------------------------------------------------------------------------------------
# kl_div against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "log_target"),
    list(itertools.product(SHAPES, [torch.float64, torch.float32], KL_REDUCTIONS, [False, True])),
)
def test_kl_div_matches_torch(shape, dtype, reduction, log_target):
    gen = torch.Generator().manual_seed(0)
    x = _log_probs(shape, gen, dtype)
    y = _target(shape, gen, log_target, dtype)
    upstream = torch.randn(shape if reduction == "none" else (), generator=gen, dtype=dtype)
    kwargs = dict(reduction=reduction, log_target=log_target)
    ours = _kl_value_and_grads(kl_div, x, y, upstream, **kwargs)
    ref = _kl_value_and_grads(F.kl_div, x, y, upstream, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, TOL[dtype])


@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize(("x_shape", "y_shape"), [((2, 3), (3,)), ((3,), (2, 3)), ((4, 1), (4, 5))])
def test_kl_div_broadcasts_like_torch(reduction, x_shape, y_shape):
    gen = torch.Generator().manual_seed(1)
    x = _log_probs(x_shape, gen)
    y = _target(y_shape, gen, False)
    out_shape = torch.broadcast_shapes(x_shape, y_shape) if reduction == "none" else ()
    upstream = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    ours = _kl_value_and_grads(kl_div, x, y, upstream, reduction=reduction)
    ref = _kl_value_and_grads(F.kl_div, x, y, upstream, reduction=reduction)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-12)


def test_kl_div_batchmean_divides_by_the_batch_only():
    gen = torch.Generator().manual_seed(2)
    x, y = _log_probs((6, 4), gen), _target((6, 4), gen, False)
    total = kl_div(x, y, reduction="sum")
    assert kl_div(x, y, reduction="batchmean").item() == pytest.approx(total.item() / 6, rel=1e-15)
    with pytest.warns(UserWarning):
        assert kl_div(x, y, reduction="mean").item() == pytest.approx(total.item() / 24, rel=1e-15)
    # 0-d input: batchmean is the sum; an empty batch gives 0 / 0.
    x0, y0 = torch.tensor(-0.5), torch.tensor(0.3)
    assert kl_div(x0, y0, reduction="batchmean").item() == kl_div(x0, y0, reduction="sum").item()
    assert kl_div(x0, y0, reduction="sum").item() == pytest.approx(0.3 * (math.log(0.3) + 0.5))
    assert torch.isnan(kl_div(torch.zeros(0, 3), torch.zeros(0, 3), reduction="batchmean"))
    assert kl_div(torch.zeros(3, 0), torch.zeros(3, 0), reduction="batchmean").item() == 0.0


def test_kl_div_mean_warns_with_torchs_text():
    x, y = torch.log(torch.tensor([0.5, 0.5])), torch.tensor([0.25, 0.75])
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        F.kl_div(x, y, reduction="mean")
    assert [str(w.message) for w in theirs] == [MEAN_WARNING]
    with pytest.warns(UserWarning, match=r"^reduction: 'mean' divides the total loss") as ours:
        kl_div(x, y, reduction="mean")
    assert [str(w.message) for w in ours] == [MEAN_WARNING]
    assert ours[0].filename == __file__  # attributed to the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in ("none", "sum", "batchmean"):
            kl_div(x, y, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_div_non_finite_pattern_matches_torch(dtype):
    inf, nan = math.inf, math.nan
    x = torch.tensor([-1.0, -inf, -inf, 0.0, -1.0, -1.0, nan, -1.0, inf, -1.0, inf], dtype=dtype)
    y = torch.tensor([0.0, 0.0, 0.5, 0.0, -0.5, nan, 0.0, inf, 0.5, -0.0, 0.0], dtype=dtype)
    upstream = torch.ones(11, dtype=dtype)
    ours = _kl_value_and_grads(kl_div, x, y, upstream, reduction="none")
    ref = _kl_value_and_grads(F.kl_div, x, y, upstream, reduction="none")
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 0)
    loss, gx, gy = ours
    assert loss[0].item() == 0.0 and loss[2].item() == inf  # 0 log 0 = 0; log q = -inf costs inf
    assert gx[0].item() == 0.0 and gx[2].item() == -0.5  # ∂/∂x = -y
    assert torch.isnan(gy[0])  # PyTorch's target gradient at y = 0 is NaN
    # log_target: probability 0 is a target of -inf, which PyTorch (and xent) turn into NaN.
    lx = torch.tensor([-1.0, -inf, -1.0, nan, inf], dtype=dtype)
    ly = torch.tensor([-inf, -0.5, nan, -1.0, -1.0], dtype=dtype)
    ours = _kl_value_and_grads(kl_div, lx, ly, upstream[:5], reduction="none", log_target=True)
    ref = _kl_value_and_grads(F.kl_div, lx, ly, upstream[:5], reduction="none", log_target=True)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 0)
    assert torch.isnan(ours[0][0]) and ours[0][1].item() == inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_kl_div_half_precision_error_floor(dtype, reduction):
    gen = torch.Generator().manual_seed(3)
    x = _log_probs((9, 7, 41), gen, dtype)
    y = _target((9, 7, 41), gen, False, dtype)
    upstream = torch.ones((9, 7, 41) if reduction == "none" else (), dtype=torch.float64)
    ours = _kl_value_and_grads(kl_div, x, y, upstream, reduction=reduction)
    theirs = _kl_value_and_grads(F.kl_div, x, y, upstream, reduction=reduction)
    ref = _kl_value_and_grads(F.kl_div, x.double(), y.double(), upstream, reduction=reduction)
    assert ours[0].dtype == dtype
    for a, b, r in zip(ours, theirs, ref, strict=True):
        assert_error_floor(a, b, r, HALF_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_half_precision_is_computed_in_fp32_and_rounded_once(dtype, log_target):
    # Within half an ulp (plus fp32's own error) of the exact answer for the half inputs.
    gen = torch.Generator().manual_seed(6)
    x = _log_probs((9, 7, 41), gen, dtype)
    y = (_log_probs((9, 7, 41), gen) if log_target else torch.rand(9, 7, 41, generator=gen)).to(
        dtype
    )
    upstream = torch.ones(9, 7, 41, dtype=torch.float64)
    kwargs = dict(reduction="none", log_target=log_target)
    ours = _kl_value_and_grads(kl_div, x, y, upstream, **kwargs)
    ref = _kl_value_and_grads(F.kl_div, x.double(), y.double(), upstream, **kwargs)
    assert_rounded_once(ours, ref, dtype)
    p = torch.rand(9, 7, 41, generator=gen).softmax(-1).to(dtype)
    assert_rounded_once([entropy(p)], [-torch.xlogy(p.double(), p.double()).sum(-1)], dtype)


def test_kl_div_half_precision_sum_over_many_elements():
    n = 100_000
    x = torch.full((n,), -1.0, dtype=torch.bfloat16)
    y = torch.full((n,), 0.5, dtype=torch.bfloat16)
    exact = n * 0.5 * (math.log(0.5) + 1.0)
    ours = kl_div(x, y, reduction="sum")
    assert ours.dtype == torch.bfloat16
    # The only error is the final rounding to bfloat16 (8 significant bits).
    assert abs(ours.item() - exact) <= 2**-8 * exact


def test_kl_div_dtype_promotion_follows_torch():
    for a, b in [(torch.float32, torch.float64), (torch.float64, torch.float32)]:
        x, y = torch.tensor([-0.5, -1.0], dtype=a), torch.tensor([0.3, 0.7], dtype=b)
        ours, ref = kl_div(x, y, reduction="sum"), F.kl_div(x, y, reduction="sum")
        assert ours.dtype == ref.dtype == torch.float64
        torch.testing.assert_close(ours, ref)
    x, y = torch.tensor([-0.5], dtype=torch.float16), torch.tensor([0.3])
    assert kl_div(x, y, reduction="sum").dtype == F.kl_div(x, y, reduction="sum").dtype


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_kl_div_gradcheck_and_gradgradcheck(log_target, reduction):
    gen = torch.Generator().manual_seed(4)
    x = _log_probs((3, 4), gen).requires_grad_()
    y = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.05
    y = (y.log() if log_target else y).requires_grad_()

    def f(x, y):
        return kl_div(x, y, reduction=reduction, log_target=log_target)

    assert torch.autograd.gradcheck(f, (x, y))
    assert torch.autograd.gradgradcheck(f, (x, y))


def test_kl_div_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'avg' is not a valid value for reduction.*'batchmean'"):
        kl_div(x, x, reduction="avg")
    with pytest.raises(RuntimeError, match=r"input of shape \(3,\) and target of shape \(4,\)"):
        kl_div(x, torch.zeros(4))
    with pytest.raises(TypeError, match=r"target must have a floating dtype, got torch\.int64"):
        kl_div(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"argument 'input' \(position 1\) must be Tensor, not list"
    ):
        kl_div([0.0], x)


def test_horse_worked_example():
    q = torch.tensor([0.1, 0.12, 0.78], dtype=torch.float64)
    one_hot = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    kl = kl_div(q.log(), one_hot, reduction="sum")
    assert kl.item() == pytest.approx(-math.log(0.78), abs=1e-15)
    assert round(kl.item(), 4) == 0.2485
    # The one-hot truth has zero entropy, so the KL equals the cross-entropy -log q[2].
    assert entropy(one_hot).item() == 0.0
    assert kl_div(q.log(), one_hot.log(), reduction="sum", log_target=True).isnan()


# ---------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "dim"), [((5,), 0), ((9, 7, 41), -1), ((9, 7, 41), 1), ((0, 4), 1)]
)
def test_entropy_matches_xlogy_reference(dtype, shape, dim):
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(dim)
    p.view(-1)[::7] = 0.0
    ref = -torch.xlogy(p, p).sum(dim)
    torch.testing.assert_close(torch.special.entr(p).sum(dim), ref)
    ours = entropy(p.to(dtype), dim)
    assert ours.dtype == dtype and ours.shape == ref.shape
    if dtype in HALF_RTOL:
        q = p.to(dtype)
        err_ours = (ours.double() - -torch.xlogy(q.double(), q.double()).sum(dim)).abs()
        err_theirs = (-torch.xlogy(q, q).sum(dim).double() - ref).abs()
        assert (err_ours <= err_theirs + HALF_RTOL[dtype] * (ref.abs() + 1e-6)).all()
    else:
        torch.testing.assert_close(ours, ref.to(dtype), atol=TOL[dtype], rtol=TOL[dtype])


def test_entropy_known_values_and_non_finite_inputs():
    p = torch.tensor([[0.25] * 4, [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    h = entropy(p)
    assert h.tolist() == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-15)
    assert math.copysign(1.0, h[1].item()) == 1.0  # +0.0, not -0.0
    assert torch.isnan(entropy(torch.tensor([0.5, -0.1, 0.6]))).item()
    assert torch.isnan(entropy(torch.tensor([0.5, math.nan]))).item()
    # Integers are computed in the default dtype, as -torch.xlogy(p, p).sum() does.
    h_int = entropy(torch.tensor([0, 1]))
    assert h_int.dtype == torch.get_default_dtype() and h_int.item() == 0.0


def test_entropy_gradient_and_zero_probabilities():
    p = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(entropy(p), p)
    expected = -(torch.log(p.detach()) + 1)
    expected[1] = 0.0  # finite (0) where p = 0
    assert torch.equal(g, expected)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy, (q,))
    assert torch.autograd.gradgradcheck(entropy, (q,))


def test_entropy_through_a_saturated_softmax_has_a_finite_exact_gradient():
    # p[.., 2] underflows to exactly 0 in fp32; ∂H/∂z_j = -p_j (log p_j + H) is 0 there.
    z = torch.tensor([[1.0, 2.0, -1e4], [0.5, -200.0, 0.0]], requires_grad=True)
    p = torch.softmax(z, -1)
    assert (p == 0).sum().item() == 2
    (g,) = torch.autograd.grad(entropy(p).sum(), z)
    p64 = torch.softmax(z.detach().double(), -1)
    h64 = -torch.xlogy(p64, p64).sum(-1, keepdim=True)
    expected = -(torch.xlogy(p64, p64) + p64 * h64)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


def _distribution(draw_floats, zeros: bool) -> torch.Tensor:
    w = torch.tensor(draw_floats, dtype=torch.float64)
    if zeros:
        w[::3] = 0.0
    return w / w.sum()


@settings(max_examples=60, deadline=None)
@given(
    a=st.lists(st.floats(0.01, 10), min_size=2, max_size=8),
    data=st.data(),
    zeros=st.booleans(),
)
def test_kl_is_cross_entropy_minus_entropy(a, data, zeros):
    b = data.draw(st.lists(st.floats(0.01, 10), min_size=len(a), max_size=len(a)))
    p = _distribution(a, zeros and len(a) > 3)
    q = _distribution(b, False)
    kl = kl_div(q.log(), p, reduction="sum")
    cross_entropy = -(p * q.log()).sum()
    assert kl.item() == pytest.approx((cross_entropy - entropy(p)).item(), abs=1e-12)
    assert kl.item() >= -1e-12  # Gibbs' inequality
    assert kl_div(q.log(), q, reduction="sum").item() == pytest.approx(0.0, abs=1e-12)
    assert kl_div(q.log(), q.log(), reduction="sum", log_target=True).item() == 0.0
