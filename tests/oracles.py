"""Comparison helpers shared by the test modules (oracle checks, error floors)."""

from __future__ import annotations

import math

import torch


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Same dtype, same shape, and equal within ``tol`` (NaN where the reference has NaN)."""
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol, equal_nan=True)


def assert_error_floor(
    ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, rtol: float
) -> None:
    """``|ours - ref| ≤ |theirs - ref| + rtol (|ref| + floor)`` elementwise.

    ``ref`` is a float64 answer, ``theirs`` torch's own result in our dtype: xent may be as far
    from the truth as torch is, plus a small relative tolerance. NaN and ±inf must match exactly.
    """
    assert ours.dtype == theirs.dtype and ours.shape == ref.shape
    ours, theirs = ours.double(), theirs.double()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    floor = 1e-6 * ref[finite].abs().max() if finite.any() else 0.0
    err_ours = (ours - ref)[finite].abs()
    err_theirs = (theirs - ref)[finite].abs().nan_to_num(math.inf)
    assert (err_ours <= err_theirs + rtol * (ref[finite].abs() + floor)).all()


def assert_rounded_once(ours, ref, dtype: torch.dtype) -> None:
    """Each tensor of ``ours`` is within half an ulp of ``dtype`` (plus fp32's own error) of the
    float64 ``ref``: computed in fp32, rounded to ``dtype`` once."""
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for a, r in zip(ours, ref, strict=True):
        assert a.dtype == dtype
        bound = (0.5 * eps + 1e-5) * r.abs() + tiny * eps
        assert ((a.double() - r).abs() <= bound).all()
