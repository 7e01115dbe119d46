"""Oracles and comparison helpers shared by the test modules: the losses spelled out with torch's
own functions, oracle checks, error floors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def torch_cross_entropy(
    x,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """xent.cross_entropy's options spelled out with torch's own functions (F.cross_entropy of
    the soft-capped logits, plus the z-loss), materialising everything: the oracle of the kernels
    and of :mod:`xent.reference`."""
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(
        z,
        target,
        weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(z, dim=1)
    if target.dim() == 1:
        valid = target != ignore_index
        per_row = ce + torch.where(valid, z_loss * lse**2, torch.zeros_like(lse))
        denom = (weight[target.clamp(min=0)] * valid if weight is not None else valid).sum()
    else:
        per_row = ce + z_loss * lse**2
        denom = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    if reduction == "none":
        return per_row
    return per_row.sum() / denom if reduction == "mean" else per_row.sum()


def relative_cross_entropy(
    x64, target, reduction="none", z_loss=0.0, softcap=None, cap_dtype=None, **opts
):
    """:func:`torch_cross_entropy` (per row, or summed) for logits far from 0: torch's
    cross-entropy of ``z - max z`` (exact in float64 for float32 logits, and for float64 ones
    within a factor of 2 of their max), plus the z-loss ``ζ (m + lse(z - m))²``. Equal to it in
    exact arithmetic; torch's own ``logsumexp`` backward forms ``e^{z - lse}``, which cancels at
    large logits (4e-6 off at ``z ≈ 10⁷`` in float64).

    The soft cap is applied in ``cap_dtype`` (the kernels' compute dtype) by the torch kernel's
    own operations: the capped logits, of the offset's size, are an intermediate rounded there.
    """
    z = x64
    if softcap is not None:
        xc = x64 if cap_dtype is None else x64.to(cap_dtype)
        z = (softcap * torch.tanh(xc / softcap)).double()
    m = z.detach().amax(dim=1, keepdim=True)
    per_row = torch_cross_entropy(z - m, target, reduction="none", **opts)
    if z_loss:
        lse = m.squeeze(1) + torch.logsumexp(z - m, dim=1)
        ignore = opts.get("ignore_index", -100)
        valid = target != ignore if target.dim() == 1 else torch.ones_like(lse, dtype=torch.bool)
        per_row = per_row + torch.where(valid, z_loss * lse**2, 0.0)
    return per_row if reduction == "none" else per_row.sum()


def relative_log_probs(x64, target, inv_temp=1.0, ignore_index=-100):
    """``(log p_y, H)`` per row of float64 logits far from 0: torch's log-softmax of
    ``(x - max x)/T`` (the difference exact in float64 for float32 logits and for float64 ones
    within a factor of 2 of their max), so that neither value nor gradient forms ``x/T - lse``.
    Ignored rows give 0."""
    d = (x64 - x64.detach().amax(dim=1, keepdim=True)) * inv_temp
    log_p = torch.log_softmax(d, dim=1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    lp = torch.where(valid, log_p.gather(1, safe[:, None]).squeeze(1), 0.0)
    p = log_p.exp()
    ent = -(p * torch.where(p > 0, log_p, 0.0)).sum(dim=1)
    return lp, torch.where(valid, ent, 0.0)


def torch_linear_cross_entropy(
    x,
    w,
    b,
    t,
    *,
    weight=None,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    token_weight=None,
    normalizer=None,
    ignore_index=-100,
):
    """xent.linear_cross_entropy's definition with torch's own functions (F.linear, then
    :func:`torch_cross_entropy`'s terms) and all logits in memory, in the inputs' dtype."""
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(
        z, t, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = t != ignore_index
    lse = torch.logsumexp(z, 1)
    per = ce + torch.where(valid, z_loss * lse**2, torch.zeros_like(lse))
    tw = torch.ones_like(per) if token_weight is None else token_weight
    per = per * tw
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    wy = torch.ones_like(per) if weight is None else weight[t.clamp(min=0)]
    denom = normalizer if normalizer is not None else (tw * wy * valid).sum()
    return per.sum() / denom


class Counted:
    """A stand-in for a patched function that counts its calls, so that a white-box test can
    assert that the path it patched ran (a patch of a name nobody reads passes silently)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)
