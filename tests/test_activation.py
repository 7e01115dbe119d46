"""xent.softmax, xent.log_softmax and xent.logsumexp against torch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xent


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "dim"), [((7,), 0), ((9, 13), 1), ((3, 5, 4), 1), ((3, 5, 4), -1)]
)
def test_matches_torch(dtype, shape, dim):
    gen = torch.Generator().manual_seed(0)
    x = (5 * torch.randn(shape, generator=gen)).to(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    for ours, ref in [
        (xent.softmax(x, dim), F.softmax(x, dim)),
        (xent.log_softmax(x, dim), F.log_softmax(x, dim)),
        (xent.logsumexp(x, dim), torch.logsumexp(x, dim)),
        (xent.logsumexp(x, dim, keepdim=True), torch.logsumexp(x, dim, keepdim=True)),
    ]:
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=tol[dtype], rtol=tol[dtype])


def test_logsumexp_over_several_dims_and_dtype_argument():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(xent.logsumexp(x, (0, 2)), torch.logsumexp(x, (0, 2)))
    torch.testing.assert_close(
        xent.softmax(x.float(), 1, dtype=torch.float64),
        F.softmax(x.float(), 1, dtype=torch.float64),
    )


def test_non_finite_rows_follow_torch():
    x = torch.tensor([[torch.inf, 0.0, 1.0], [-torch.inf] * 3, [0.0, -torch.inf, 2.0]])
    for ours, ref in [
        (xent.softmax(x, 1), F.softmax(x, 1)),
        (xent.log_softmax(x, 1), F.log_softmax(x, 1)),
        (xent.logsumexp(x, 1), torch.logsumexp(x, 1)),
    ]:
        torch.testing.assert_close(ours, ref, equal_nan=True)


def test_gradients():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: xent.log_softmax(x, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda x: xent.softmax(x, 1), (x,))
    assert torch.autograd.gradcheck(lambda x: xent.logsumexp(x, 1), (x,))


def test_seed_softmax_example():
    out = xent.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0)
    torch.testing.assert_close(
        out,
        torch.tensor([0.09003057, 0.24472847, 0.66524096], dtype=torch.float64),
        atol=1e-8,
        rtol=0,
    )
    assert out.round(decimals=4).tolist() == [0.0900, 0.2447, 0.6652]


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50), min_size=1, max_size=8),
    shift=st.sampled_from([0.0, 1e2, -1e3, 1e4]),
)
def test_log_softmax_is_shift_invariant_fp32(values, shift):
    x = torch.tensor(values, dtype=torch.float32)
    # ulp(1e4) in fp32 is ~1e-3: the shifted inputs themselves are rounded that much.
    torch.testing.assert_close(
        xent.log_softmax(x + shift, 0), xent.log_softmax(x, 0), atol=2e-3, rtol=1e-5
    )
    assert torch.isclose(xent.softmax(x + shift, 0).sum(), torch.tensor(1.0), atol=1e-5)


INTEGER_LIKE = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", INTEGER_LIKE)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_of_integers_needs_a_floating_dtype_argument(name, dtype):
    x = torch.tensor([[3, 0, 1], [1, 1, 0]]).to(dtype)
    ours, theirs = getattr(xent, name), getattr(F, name)
    # No truncated integers (softmax of a Long tensor was all zeros): PyTorch's error, naming
    # the dtype and the way out.
    with pytest.raises(NotImplementedError, match=rf"{name}\(\): input .* {dtype}; pass dtype="):
        ours(x, 1)
    with pytest.raises(NotImplementedError):
        theirs(x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex -> real drops the imaginary part, and says so
        for out_dtype in (torch.float64, torch.float32, torch.float16):
            got, want = ours(x, 1, dtype=out_dtype), theirs(x, 1, dtype=out_dtype)
            assert got.dtype == want.dtype == out_dtype
            # fp16 is computed in fp32 and rounded once: within one fp16 ulp of fp64's answer.
            exact = theirs(x, 1, dtype=torch.float64).to(out_dtype)
            tol = 1e-3 if out_dtype == torch.float16 else 1e-6
            torch.testing.assert_close(got, exact, atol=tol, rtol=tol)
    for bad in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(
            NotImplementedError, match=rf"dtype must be a floating dtype, got {bad}"
        ):
            ours(x.float(), 1, dtype=bad)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_logsumexp_of_integers_is_computed_in_the_default_dtype(default):
    x = torch.tensor([[2**40, 2**40 + 1, 7], [0, -3, 255]])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for t in (x, x.int(), x.clamp(0, 255).byte(), x > 0):
            got, want = xent.logsumexp(t, 1), torch.logsumexp(t, 1)
            assert got.dtype == want.dtype == default
            torch.testing.assert_close(got, want)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_logsumexp_of_complex_numbers_matches_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(4, 7, generator=gen) * 5
    imag = torch.randn(4, 7, generator=gen) * 3
    x = torch.complex(real, imag).to(dtype)
    x[0] += 1000  # far from 0: only the shift by the largest real part keeps it finite
    x[1, 2] = complex(-torch.inf, 0.0)
    for dim, keepdim in [(1, False), (0, True), ((0, 1), False)]:
        got, want = xent.logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim)
        assert got.dtype == dtype and got.shape == want.shape
        # Equal as points of the plane: the imaginary part only modulo 2π.
        torch.testing.assert_close(got.real, want.real)
        torch.testing.assert_close(torch.exp(1j * got.imag), torch.exp(1j * want.imag))
    z = torch.complex(real[:2, :3], imag[:2, :3]).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: xent.logsumexp(z, 1), (z,))


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_a_list_is_refused_in_pytorchs_words(name):
    # torch.softmax raises TypeError, F.softmax AttributeError: the error is both.
    with pytest.raises(TypeError, match=rf"^{name}\(\): argument 'input' \(position 1\) must be "):
        getattr(xent, name)([1.0, 2.0], 0)
    with pytest.raises(AttributeError, match=r"must be Tensor, not numpy\.ndarray$"):
        getattr(xent, name)(torch.ones(2).numpy(), 0)
