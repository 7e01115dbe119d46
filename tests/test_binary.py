"""xent.binary against torch.nn.functional, float64 references and gradcheck."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import assert_close, assert_error_floor, assert_rounded_once

from xent.binary import binary_cross_entropy, binary_cross_entropy_with_logits

SHAPES = [(), (5,), (9, 7, 41), (0,), (4, 0, 3)]
REDUCTIONS = ["mean", "sum", "none"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
HALF_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _broadcast_shape(kind: str | None, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A ``weight``/``pos_weight`` shape that broadcasts to ``shape``."""
    if kind is None:
        return None
    if kind == "full" or not shape:
        return shape
    if kind == "last":  # along the class dimension
        return shape[-1:]
    return (shape[0],) + (1,) * (len(shape) - 1)  # "lead": one value per sample


def _probs(shape, gen, dtype=torch.float64) -> torch.Tensor:
    return (0.02 + 0.96 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _targets(shape, gen, dtype=torch.float64) -> torch.Tensor:
    y = torch.rand(shape, generator=gen, dtype=torch.float64)
    y.view(-1)[::4] = 1.0
    y.view(-1)[1::4] = 0.0
    return y.to(dtype)


def _value_and_grads(fn, x, y, upstream, **kwargs):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    out = fn(x, y, **kwargs)
    gx, gy = torch.autograd.grad(out, (x, y), upstream.to(out.dtype))
    return out.detach(), gx, gy


# ---------------------------------------------------------------------------------------------
# Values and gradients against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "weight_kind"),
    list(
        itertools.product(
            SHAPES, [torch.float64, torch.float32], REDUCTIONS, [None, "full", "last", "lead"]
        )
    ),
)
def test_bce_matches_torch(shape, dtype, reduction, weight_kind):
    gen = torch.Generator().manual_seed(0)
    p, y = _probs(shape, gen, dtype), _targets(shape, gen, dtype)
    wshape = _broadcast_shape(weight_kind, shape)
    weight = None if wshape is None else torch.rand(wshape, generator=gen, dtype=dtype) - 0.2
    out_shape = shape if reduction == "none" else ()
    upstream = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    kwargs = dict(weight=weight, reduction=reduction)
    ours = _value_and_grads(binary_cross_entropy, p, y, upstream, **kwargs)
    ref = _value_and_grads(F.binary_cross_entropy, p, y, upstream, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, TOL[dtype])
    if reduction == "mean" and not p.numel():
        assert torch.isnan(ours[0])
    if reduction == "sum" and not p.numel():
        assert ours[0].item() == 0.0


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "weight_kind", "pos_weight_kind"),
    list(
        itertools.product(
            SHAPES,
            [torch.float64, torch.float32],
            REDUCTIONS,
            [None, "full", "lead"],
            [None, "last", "full"],
        )
    ),
)
def test_bce_with_logits_matches_torch(shape, dtype, reduction, weight_kind, pos_weight_kind):
    gen = torch.Generator().manual_seed(1)
    z = (4 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    y = _targets(shape, gen, dtype)
    wshape = _broadcast_shape(weight_kind, shape)
    pshape = _broadcast_shape(pos_weight_kind, shape)
    weight = None if wshape is None else torch.rand(wshape, generator=gen, dtype=dtype) + 0.1
    pos_weight = None if pshape is None else 3 * torch.rand(pshape, generator=gen, dtype=dtype)
    out_shape = shape if reduction == "none" else ()
    upstream = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    kwargs = dict(weight=weight, reduction=reduction, pos_weight=pos_weight)
    ours = _value_and_grads(binary_cross_entropy_with_logits, z, y, upstream, **kwargs)
    ref = _value_and_grads(F.binary_cross_entropy_with_logits, z, y, upstream, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, TOL[dtype])


def test_every_option_at_once_odd_shape():
    gen = torch.Generator().manual_seed(2)
    z = 5 * torch.randn(9, 7, 41, generator=gen, dtype=torch.float64)
    y = _targets((9, 7, 41), gen)
    weight = torch.rand(9, 1, 41, generator=gen, dtype=torch.float64)
    pos_weight = torch.rand(41, generator=gen, dtype=torch.float64) * 4
    kwargs = dict(weight=weight, pos_weight=pos_weight, reduction="mean")
    upstream = torch.tensor(1.3, dtype=torch.float64)
    ours = _value_and_grads(binary_cross_entropy_with_logits, z, y, upstream, **kwargs)
    ref = _value_and_grads(F.binary_cross_entropy_with_logits, z, y, upstream, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-13)
    p = torch.sigmoid(z).clamp(1e-6, 1 - 1e-6)
    kwargs = dict(weight=weight, reduction="sum")
    ours = _value_and_grads(binary_cross_entropy, p, y, upstream, **kwargs)
    ref = _value_and_grads(F.binary_cross_entropy, p, y, upstream, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True])
def test_half_precision_error_floor(dtype, reduction, logits):
    gen = torch.Generator().manual_seed(3)
    shape = (9, 7, 41)
    if logits:
        x = (4 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        fns = (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)
        kwargs = dict(reduction=reduction, pos_weight=torch.rand(41, generator=gen) + 0.5)
    else:
        x = _probs(shape, gen, dtype)
        fns = (binary_cross_entropy, F.binary_cross_entropy)
        kwargs = dict(reduction=reduction, weight=torch.rand(41, generator=gen).to(dtype))
    y = _targets(shape, gen, dtype)
    upstream = torch.ones(shape if reduction == "none" else (), dtype=torch.float64)
    ours = _value_and_grads(fns[0], x, y, upstream, **kwargs)
    theirs = _value_and_grads(fns[1], x, y, upstream, **kwargs)
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref = _value_and_grads(fns[1], x.double(), y.double(), upstream, **ref_kwargs)
    assert ours[0].dtype == dtype
    for a, b, r in zip(ours, theirs, ref, strict=True):
        assert_error_floor(a, b, r, HALF_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logits", [False, True])
def test_half_precision_is_computed_in_fp32_and_rounded_once(dtype, logits):
    # Within half an ulp (plus fp32's own error) of the exact answer for the half inputs.
    gen = torch.Generator().manual_seed(8)
    shape = (9, 7, 41)
    if logits:
        x = (4 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        fns = (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)
    else:
        x = _probs(shape, gen, dtype)
        fns = (binary_cross_entropy, F.binary_cross_entropy)
    y = _targets(shape, gen, dtype)
    upstream = torch.ones(shape, dtype=torch.float64)
    ours = _value_and_grads(fns[0], x, y, upstream, reduction="none")
    ref = _value_and_grads(fns[1], x.double(), y.double(), upstream, reduction="none")
    assert_rounded_once(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mean_over_many_rows_stays_exact(dtype):
    n = 100_000
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(n, generator=gen).to(dtype)
    y = (torch.rand(n, generator=gen) < 0.5).to(dtype)
    ref = F.binary_cross_entropy_with_logits(z.double(), y.double())
    for fn, x in [(binary_cross_entropy_with_logits, z), (binary_cross_entropy, torch.sigmoid(z))]:
        out = fn(x, y)
        assert out.dtype == dtype and torch.isfinite(out)
        exact = fn(x.double(), y.double())
        # Only the final rounding to the half dtype is lost.
        assert abs(out.double() - exact).item() <= torch.finfo(dtype).eps * exact.item()
    assert abs(exact - ref).item() < 5e-3  # sigmoid rounded to the half dtype, then BCE
    # A sum of ~0.8 * 100 000 exceeds fp16's largest value: inf is the right fp16 answer there.
    total = binary_cross_entropy_with_logits(z, y, reduction="sum")
    if dtype == torch.float16:
        assert total.item() == math.inf
    else:
        assert abs(total.double() - n * ref).item() <= torch.finfo(dtype).eps * n * ref.item()


def test_mixed_dtypes_follow_torch():
    p32, y64 = torch.rand(4), torch.rand(4, dtype=torch.float64)
    for x, y in [(p32, y64), (p32.double(), y64.float()), (p32.half(), y64.float())]:
        ours = binary_cross_entropy_with_logits(x, y)
        ref = F.binary_cross_entropy_with_logits(x, y)
        assert ours.dtype == ref.dtype == y.dtype  # PyTorch returns the target's dtype
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    weight = torch.rand(4, dtype=torch.float64)
    for fn, ref_fn in [
        (binary_cross_entropy, F.binary_cross_entropy),
        (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    ]:
        ours, ref = fn(p32, p32.flip(0), weight), ref_fn(p32, p32.flip(0), weight)
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------
# Gradcheck and double backward in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_gradcheck_and_gradgradcheck(reduction):
    gen = torch.Generator().manual_seed(5)
    p = _probs((3, 4), gen).mul(0.8).add(0.1).requires_grad_()
    y = torch.rand(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5

    def f(p, y):
        return binary_cross_entropy(p, y, weight, reduction=reduction)

    assert torch.autograd.gradcheck(f, (p, y))
    assert torch.autograd.gradgradcheck(f, (p, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_pos_weight", [False, True])
def test_bce_with_logits_gradcheck_and_gradgradcheck(reduction, with_pos_weight):
    gen = torch.Generator().manual_seed(6)
    z = 3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    z = z.requires_grad_()
    y = torch.rand(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, 1, generator=gen, dtype=torch.float64) + 0.5
    pos_weight = torch.rand(4, generator=gen, dtype=torch.float64) * 3 if with_pos_weight else None

    def f(z, y):
        return binary_cross_entropy_with_logits(
            z, y, weight, reduction=reduction, pos_weight=pos_weight
        )

    assert torch.autograd.gradcheck(f, (z, y))
    assert torch.autograd.gradgradcheck(f, (z, y))


@pytest.mark.parametrize("logits", [False, True])
def test_double_backward_matches_torch(logits):
    gen = torch.Generator().manual_seed(7)
    if logits:
        x = 2 * torch.randn(5, 6, generator=gen, dtype=torch.float64)
        ours_fn, ref_fn = binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
        kwargs = dict(pos_weight=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    else:
        x = _probs((5, 6), gen)
        ours_fn, ref_fn = binary_cross_entropy, F.binary_cross_entropy
        kwargs = {}
    x = x.requires_grad_()
    y = torch.rand(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v, u = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)

    def second(fn):
        gx, gy = torch.autograd.grad(fn(x, y, reduction="sum", **kwargs), (x, y), create_graph=True)
        return torch.autograd.grad((gx * v).sum() + (gy * u).sum(), (x, y))

    for a, b in zip(second(ours_fn), second(ref_fn), strict=True):
        # PyTorch's BCE double backward adds 1e-12 to p and 1 - p; agreement is to ~1e-10.
        assert_close(a, b, 1e-9)


def test_softplus_derivative_at_zero_is_exact():
    # ∂²l/∂z∂y at z = 0 needs softplus'(0) = 1/2, which autograd through max and |z| gets wrong.
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor(3.0, dtype=torch.float64)
    for fn in (binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        _, gy = torch.autograd.grad(
            fn(z, y, reduction="sum", pos_weight=pos_weight), (z, y), create_graph=True
        )
        (gzy,) = torch.autograd.grad(gy.sum(), z)
        # ∂/∂z (pw softplus(-z) - softplus(z)) = -pw σ(-z) - σ(z) = -(3 + 1) / 2 at z = 0.
        torch.testing.assert_close(gzy, torch.full((3,), -2.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bce_saturated_probabilities_follow_torch(dtype):
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-7, 0.5, 1e-10], dtype=dtype)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.3, 0.0], dtype=dtype)
    upstream = torch.ones(8, dtype=dtype)
    ours = _value_and_grads(binary_cross_entropy, p, y, upstream, reduction="none")
    ref = _value_and_grads(F.binary_cross_entropy, p, y, upstream, reduction="none")
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, TOL[dtype])
    loss, grad_p, grad_y = ours
    assert loss[:4].tolist() == [0.0, 0.0, 100.0, 100.0]  # each log clamped at -100
    # p (1 - p) floored at 1e-12
    assert grad_p[:4].tolist() == pytest.approx([0.0, 0.0, -1e12, 1e12], rel=1e-7)
    assert grad_y[2].item() == math.inf and grad_y[3].item() == -math.inf
    # log(1 - p) as log1p(-p): exact for tiny p.
    assert loss[7].item() == pytest.approx(1e-10, rel=1e-6 if dtype == torch.float64 else 0.1)


def test_bce_with_logits_infinite_logits_give_the_limit():
    # Deviation: PyTorch returns NaN for a matching target at z = ±inf.
    z = torch.tensor([math.inf, -math.inf, math.inf, -math.inf, math.inf, -math.inf])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.25, 0.25])
    pos_weight = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.5, 0.5])
    upstream = torch.ones(6)
    for pw in (None, pos_weight):
        loss, gz, gy = _value_and_grads(
            binary_cross_entropy_with_logits, z, y, upstream, reduction="none", pos_weight=pw
        )
        assert loss.tolist() == [0.0, 0.0, math.inf, math.inf, math.inf, math.inf]
        ref_loss, ref_gz, ref_gy = _value_and_grads(
            F.binary_cross_entropy_with_logits, z, y, upstream, reduction="none", pos_weight=pw
        )
        assert torch.isnan(ref_loss[:2]).all()  # what xent deliberately differs from
        assert_close(gz, ref_gz, 0)  # gradients are finite and PyTorch's
        assert_close(gy, ref_gy, 0)
    assert binary_cross_entropy_with_logits(z[:2], y[:2]).item() == 0.0
    assert binary_cross_entropy_with_logits(z[:2], y[:2], reduction="sum").item() == 0.0


def test_logit_gradient_keeps_full_precision_near_saturation():
    # ∂l/∂z = sigmoid(z) - 1 for y = 1 is -sigmoid(-z), formed without cancellation.
    z = torch.tensor([10.0, 15.0, 30.0, -10.0, -30.0, 12.0])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    pos_weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    zr = z.double().requires_grad_()
    (ours,) = torch.autograd.grad(
        binary_cross_entropy_with_logits(
            z.requires_grad_(), y, reduction="sum", pos_weight=pos_weight
        ),
        z,
    )
    exact = torch.sigmoid(zr.detach()) * (
        1 - y.double()
    ) - pos_weight.double() * y.double() * torch.sigmoid(-zr.detach())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=0)


def test_bce_with_logits_large_and_nan_logits_follow_torch():
    z = torch.tensor([100.0, -100.0, 1e30, -1e30, 20.0, -3e38, math.nan, 1.0])
    y = torch.tensor([0.3, 0.3, 1.0, 0.0, 1.0, 0.0, 1.0, math.nan])
    upstream = torch.ones(8)
    ours = _value_and_grads(binary_cross_entropy_with_logits, z, y, upstream, reduction="none")
    ref = _value_and_grads(F.binary_cross_entropy_with_logits, z, y, upstream, reduction="none")
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-6)
    assert ours[0][:2].tolist() == pytest.approx([70.0, 30.0], rel=1e-6)


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(logits, reduction):
    fn = binary_cross_entropy_with_logits if logits else binary_cross_entropy
    x = torch.rand(0, 3, requires_grad=True)
    y = torch.rand(0, 3, requires_grad=True)
    out = fn(x, y, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(out)
    elif reduction == "sum":
        assert out.item() == 0.0
    else:
        assert out.shape == (0, 3)
    gx, gy = torch.autograd.grad(out.sum(), (x, y))
    assert gx.shape == gy.shape == (0, 3)


def test_weight_requires_grad_refused_like_torch():
    p, y = torch.rand(3), torch.rand(3)
    w = torch.rand(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="with respect to argument 'weight'"):
        binary_cross_entropy(p, y, w)
    with pytest.raises(RuntimeError, match="with respect to argument 'pos_weight'"):
        binary_cross_entropy_with_logits(p, y, pos_weight=w)
    with torch.no_grad():
        torch.testing.assert_close(
            binary_cross_entropy(p, y, w), F.binary_cross_entropy(p, y, w.detach())
        )


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "shown"), [(1.5, "1.5"), (-0.25, "-0.25"), (math.nan, "nan")])
def test_bce_values_outside_unit_interval_raise(bad, shown):
    ok = torch.tensor([0.5, 0.5])
    worse = torch.tensor([0.5, bad])
    with pytest.raises(ValueError, match=rf"input should be between 0 and 1, got {shown}"):
        binary_cross_entropy(worse, ok)
    with pytest.raises(ValueError, match=rf"target should be between 0 and 1, got {shown}"):
        binary_cross_entropy(ok, worse)
    with pytest.raises(RuntimeError):  # PyTorch refuses the same values
        F.binary_cross_entropy(worse, ok)


@pytest.mark.parametrize("fn", [binary_cross_entropy, binary_cross_entropy_with_logits])
def test_argument_errors(fn):
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"target size \(\(3, 5\)\).*input size \(\(3, 4\)\)"):
        fn(x, torch.rand(3, 5))
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        fn(x, x, reduction="avg")
    with pytest.raises(RuntimeError, match=r"weight of shape \(5,\).*shape \(3, 4\)"):
        fn(x, x, weight=torch.rand(5))
    with pytest.raises(RuntimeError, match=r"weight of shape \(2, 3, 4\).*shape \(3, 4\)"):
        fn(x, x, weight=torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match=r"input must have a floating dtype, got torch\.int64"):
        fn(torch.ones(3, 4, dtype=torch.long), x)
    with pytest.raises(
        TypeError, match=r"argument 'target' \(position 2\) must be Tensor, not list"
    ):
        fn(x, [0.5] * 4)


def test_bce_dtype_mismatch_and_pos_weight_shape_errors():
    p = torch.rand(3, 4)
    with pytest.raises(RuntimeError, match=r"found target dtype torch\.float64"):
        binary_cross_entropy(p, p.double())
    with pytest.raises(RuntimeError, match=r"pos_weight of shape \(3,\).*shape \(3, 4\)"):
        binary_cross_entropy_with_logits(p, p, pos_weight=torch.rand(3))
    with pytest.raises(RuntimeError, match=r"pos_weight of shape \(1,\).*shape \(\)"):
        binary_cross_entropy_with_logits(p[0, 0], p[0, 0], pos_weight=torch.rand(1))


# ---------------------------------------------------------------------------------------------
# Worked example and identities
# ---------------------------------------------------------------------------------------------


def test_credit_card_worked_example():
    p = torch.tensor([0.7, 0.2], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert binary_cross_entropy(p, y).item() == pytest.approx(0.2899092476264711, abs=1e-15)
    z = torch.log(p / (1 - p))
    assert binary_cross_entropy_with_logits(z, y).item() == pytest.approx(
        0.2899092476264711, abs=1e-15
    )


@settings(max_examples=60, deadline=None)
@given(
    z=st.lists(st.floats(-15, 15), min_size=1, max_size=6),
    data=st.data(),
)
def test_logits_equal_probabilities_away_from_saturation(z, data):
    y = data.draw(st.lists(st.floats(0, 1), min_size=len(z), max_size=len(z)))
    pw = data.draw(st.floats(0.1, 5))
    zt = torch.tensor(z, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    p = torch.sigmoid(zt)
    torch.testing.assert_close(
        binary_cross_entropy_with_logits(zt, yt, reduction="none"),
        binary_cross_entropy(p, yt, reduction="none"),
        atol=1e-9,
        rtol=1e-9,
    )
    # pos_weight scales the positive term only: -(pw y log p + (1 - y) log(1 - p)).
    expected = -(pw * yt * torch.log(p) + (1 - yt) * torch.log1p(-p))
    torch.testing.assert_close(
        binary_cross_entropy_with_logits(
            zt, yt, reduction="none", pos_weight=torch.tensor(pw, dtype=torch.float64)
        ),
        expected,
        atol=1e-9,
        rtol=1e-9,
    )


@settings(max_examples=40, deadline=None)
@given(z=st.floats(-30, 30), y=st.floats(0, 1))
def test_logit_gradient_is_sigmoid_minus_target(z, y):
    zt = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    yt = torch.tensor([y], dtype=torch.float64, requires_grad=True)
    gz, gy = torch.autograd.grad(
        binary_cross_entropy_with_logits(zt, yt, reduction="sum"), (zt, yt)
    )
    assert gz.item() == pytest.approx(torch.sigmoid(zt).item() - y, abs=1e-15)
    assert gy.item() == -z
