"""xent.regression.huber_loss against torch.nn.functional and float64 references."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import assert_close, assert_rounded_once

from xent.regression import huber_loss

SHAPES = [(), (5,), (9, 7, 41), (0,), (4, 0, 3)]
REDUCTIONS = ["mean", "sum", "none"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
HALF_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _run(fn, x, y, upstream, weight=None, **kwargs):
    """Value and gradients with respect to input, target and (when given) weight."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, y)]
    if weight is not None:
        leaves.append(weight.detach().clone().requires_grad_())
        kwargs["weight"] = leaves[2]
    out = fn(leaves[0], leaves[1], **kwargs)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return (out.detach(), *grads)


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "delta", "weighted"),
    list(
        itertools.product(
            SHAPES, [torch.float64, torch.float32], REDUCTIONS, [0.3, 1.0, 2.5], [False, True]
        )
    ),
)
def test_huber_matches_torch(shape, dtype, reduction, delta, weighted):
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    y = torch.randn(shape, generator=gen, dtype=dtype)
    weight = torch.rand(shape, generator=gen, dtype=dtype) - 0.2 if weighted else None
    upstream = torch.randn(shape if reduction == "none" else (), generator=gen, dtype=dtype)
    kwargs = dict(reduction=reduction, delta=delta)
    ours = _run(huber_loss, x, y, upstream, weight, **kwargs)
    ref = _run(F.huber_loss, x, y, upstream, weight, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, TOL[dtype])
    if not x.numel():
        assert torch.isnan(ours[0]) if reduction == "mean" else ours[0].sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huber_half_precision_error_floor(dtype, reduction):
    gen = torch.Generator().manual_seed(1)
    shape = (9, 7, 41)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    y = torch.randn(shape, generator=gen).to(dtype)
    upstream = torch.ones(shape if reduction == "none" else (), dtype=torch.float64)
    ours = _run(huber_loss, x, y, upstream, reduction=reduction, delta=0.7)
    theirs = _run(F.huber_loss, x, y, upstream, reduction=reduction, delta=0.7)
    ref = _run(F.huber_loss, x.double(), y.double(), upstream, reduction=reduction, delta=0.7)
    assert ours[0].dtype == dtype
    for a, b, r in zip(ours, theirs, ref, strict=True):
        err_ours = (a.double() - r).abs()
        err_theirs = (b.double() - r).abs()
        floor = 1e-6 * r.abs().max()
        assert (err_ours <= err_theirs + HALF_RTOL[dtype] * (r.abs() + floor)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_huber_half_precision_is_computed_in_fp32_and_rounded_once(dtype):
    # Within half an ulp (plus fp32's own error) of the exact answer for the half inputs.
    gen = torch.Generator().manual_seed(3)
    shape = (9, 7, 41)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    y = torch.randn(shape, generator=gen).to(dtype)
    upstream = torch.ones(shape, dtype=torch.float64)
    ours = _run(huber_loss, x, y, upstream, reduction="none", delta=0.7)
    ref = _run(F.huber_loss, x.double(), y.double(), upstream, reduction="none", delta=0.7)
    assert_rounded_once(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_huber_half_precision_over_many_elements(dtype):
    n = 100_000
    x = torch.zeros(n, dtype=dtype)
    y = torch.full((n,), 0.3, dtype=dtype)
    d = y[0].double().item()  # 0.3 as the half dtype holds it
    for reduction, exact in [("mean", 0.5 * d * d), ("sum", n * 0.5 * d * d)]:
        out = huber_loss(x, y, reduction=reduction)
        assert out.dtype == dtype
        # The only error is the final rounding to the half dtype.
        assert abs(out.item() - exact) <= torch.finfo(dtype).eps * exact


def test_huber_non_finite_and_boundary_residuals_follow_torch():
    inf, nan = math.inf, math.nan
    x = torch.tensor([0.0, 0.7, -0.7, 2.0, inf, -inf, nan, inf, 0.0, 1e30], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, inf, nan, 0.0], dtype=torch.float64)
    upstream = torch.ones(10, dtype=torch.float64)
    ours = _run(huber_loss, x, y, upstream, reduction="none", delta=0.7)
    ref = _run(F.huber_loss, x, y, upstream, reduction="none", delta=0.7)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 0)
    loss, gx, _ = ours
    assert loss[4].item() == loss[5].item() == inf
    assert gx[4].item() == 0.7 and gx[5].item() == -0.7  # finite slope at d = ±inf
    assert gx[1].item() == 0.7 and loss[1].item() == pytest.approx(0.5 * 0.7**2)


def test_huber_second_derivative_matches_torch():
    x = torch.tensor([0.0, 0.3, -2.0, 0.7, -0.7, 5.0], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(6, dtype=torch.float64)
    v = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    hvps = []
    for fn in (huber_loss, F.huber_loss):
        (g,) = torch.autograd.grad(fn(x, y, reduction="sum", delta=0.7), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), x)[0])
    assert_close(hvps[0], hvps[1], 0)
    assert hvps[0].tolist() == [1.0, -2.0, 0.0, 0.0, 0.0, 0.0]  # 1 inside the open zone |d| < δ


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huber_gradcheck_and_gradgradcheck(reduction):
    gen = torch.Generator().manual_seed(2)
    x = (2 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, y, w):
        return huber_loss(x, y, reduction, 0.8, w)

    assert torch.autograd.gradcheck(f, (x, y, w))
    assert torch.autograd.gradgradcheck(f, (x, y, w))


def test_huber_target_broadcasting_warns_like_torch():
    x = torch.randn(3)
    y = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        ref = F.huber_loss(x, y, reduction="none")
    with pytest.warns(UserWarning, match=r"target size \(torch.Size\(\[2, 3\]\)\)") as ours:
        out = huber_loss(x, y, reduction="none")
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert ours[0].filename == __file__  # attributed to the caller
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huber_loss(x, x.clone())


def test_huber_dtypes_follow_torch():
    f32, f64, f16 = torch.rand(4), torch.rand(4, dtype=torch.float64), torch.rand(4).half()
    cases = [
        (f32, f64, None),  # the input's dtype wins over the target's
        (f64, f32, None),
        (f16, f32, None),
        (f32, f32, f64),  # the weight promotes
        (f16, f16, f32),
        (f32, torch.ones(4, dtype=torch.long), None),  # an integer target is accepted
    ]
    for x, y, w in cases:
        ours, ref = huber_loss(x, y, weight=w), F.huber_loss(x, y, weight=w)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)


def test_huber_infinite_delta_is_half_the_squared_error():
    x, y = torch.tensor([3.0, -40.0, 0.5]), torch.zeros(3)
    out = huber_loss(x, y, reduction="none", delta=math.inf)
    assert out.tolist() == [4.5, 800.0, 0.125]
    torch.testing.assert_close(out, F.huber_loss(x, y, reduction="none", delta=math.inf))


@pytest.mark.parametrize(("delta", "shown"), [(0.0, "0.0"), (-1.5, "-1.5"), (math.nan, "nan")])
def test_huber_non_positive_delta_raises(delta, shown):
    with pytest.raises(ValueError, match=f"delta must be > 0, got {shown}"):
        huber_loss(torch.zeros(3), torch.ones(3), delta=delta)
    with pytest.raises(RuntimeError):  # PyTorch refuses the same deltas
        F.huber_loss(torch.zeros(3), torch.ones(3), delta=delta)


def test_huber_argument_errors():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        huber_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match=r"weight size \(\(4,\)\).*input size \(\(3, 4\)\)"):
        huber_loss(x, x, weight=torch.ones(4))  # PyTorch also wants exactly the input's shape
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        F.huber_loss(x, x, weight=torch.ones(4))
    with pytest.raises(RuntimeError, match=r"input of shape \(3, 4\) and target of shape \(5,\)"):
        huber_loss(x, torch.zeros(5))
    with pytest.raises(TypeError, match=r"input must have a floating dtype, got torch\.int64"):
        huber_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(
        TypeError, match=r"argument 'target' \(position 2\) must be Tensor, not list"
    ):
        huber_loss(torch.zeros(3), [0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    d=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8),
    delta=st.floats(0.01, 50),
)
def test_huber_is_quadratic_then_linear(d, delta):
    dt = torch.tensor(d, dtype=torch.float64)
    out = huber_loss(dt, torch.zeros_like(dt), reduction="none", delta=delta)
    small = dt.abs() < delta
    torch.testing.assert_close(
        out[small], 0.5 * dt[small] ** 2, atol=torch.finfo(torch.float64).tiny, rtol=1e-15
    )
    torch.testing.assert_close(
        out[~small], delta * (dt[~small].abs() - 0.5 * delta), atol=0, rtol=1e-15
    )
    # Huber with threshold δ is δ times smooth-L1 with β = δ.
    ref = delta * F.smooth_l1_loss(dt, torch.zeros_like(dt), reduction="none", beta=delta)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    x=st.lists(st.floats(-100, 100), min_size=1, max_size=6),
    scale=st.floats(0.1, 10),
)
def test_huber_scales_quadratically(x, scale):
    xt = torch.tensor(x, dtype=torch.float64)
    yt = xt.flip(0) * 0.5
    base = huber_loss(xt, yt, reduction="sum", delta=1.3)
    scaled = huber_loss(scale * xt, scale * yt, reduction="sum", delta=1.3 * scale)
    assert scaled.item() == pytest.approx(scale**2 * base.item(), rel=1e-12, abs=1e-12)
