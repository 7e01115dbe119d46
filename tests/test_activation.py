"""xent.softmax, xent.log_softmax and xent.logsumexp against torch."""

from __future__ import annotations

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
