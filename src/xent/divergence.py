"""Kullback-Leibler divergence and Shannon entropy, in nats.

``KL(p ‖ q) = Σ_c p_c (log p_c - log q_c)`` and ``H(p) = -Σ_c p_c log p_c``, both with the
convention ``0 log 0 = 0``. They are tied by the cross-entropy ``H(p, q) = -Σ_c p_c log q_c``:

    KL(p ‖ q) = H(p, q) - H(p).

Gradients come from autograd through elementary operations; no custom backward is needed.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from xent import _numerics
from xent._engine.policy import autocast_like_torch
from xent._numerics import compute_dtype
from xent._validation import (
    check_broadcastable,
    check_floating,
    check_number,
    check_reduction,
    check_tensor_args,
    floating_or_default,
    legacy_reduction,
)

KLReduction = Literal["none", "mean", "sum", "batchmean"]
KL_REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum", "batchmean")

# PyTorch's text, verbatim (its missing spaces included), so filters written for it still match.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


@autocast_like_torch("kl_div")
def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: KLReduction = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    """Kullback-Leibler divergence of ``input`` (log-probabilities) from ``target``.

    .. math::

        \\ell = y (\\log y - x) \\quad (0 \\log 0 = 0), \\qquad
        \\ell = e^{y} (y - x) \\quad \\text{with } \\texttt{log\\_target}

    for log-probabilities ``x`` and target probabilities (or log-probabilities) ``y``; then
    ``"none"``, ``"sum"``, ``"batchmean"`` (the sum divided by ``input.size(0)``, which is the
    mathematical KL averaged over a batch; just the sum for a 0-d input) or ``"mean"`` (divided by
    every element, with PyTorch's ``UserWarning`` about it). ``kl_div(log q, p, reduction="sum")``
    is ``KL(p ‖ q)``.

    Values follow PyTorch's element by element: ``y = 0`` gives 0 for any finite ``x``, but NaN for
    ``x = ±inf`` (``0 · inf``); ``y < 0`` or NaN gives NaN; ``x = -inf`` against ``y > 0`` gives
    ``+inf``. With ``log_target`` a target of ``-inf`` (probability 0) gives NaN, as in PyTorch.
    Gradients are PyTorch's too: ``∂ℓ/∂x = -y`` (0 at ``y = 0``) and ``∂ℓ/∂y = log y + 1 - x``,
    NaN at ``y = 0`` (with ``log_target``: ``-e^y`` and ``e^y (y + 1 - x)``).

    Args:
        input: log-probabilities ``x``, any shape ``(*)``, floating dtype.
        target: ``y``, a shape that broadcasts with ``(*)``, floating dtype.
        size_average: deprecated, as in PyTorch: with ``reduce``, if either is not None, it
            picks ``"none"``, ``"mean"`` or ``"sum"`` in place of ``reduction`` (with PyTorch's
            ``UserWarning``, and without the ``"mean"`` one); a ``reduction`` of
            ``"batchmean"`` then still divides that result by ``input.size(0)``, as in PyTorch.
        reduce: deprecated, as in PyTorch (see ``size_average``).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"`` | ``"batchmean"``.
        log_target: the target holds log-probabilities (a ``bool``, else ``TypeError`` as in
            PyTorch).

    Returns:
        The broadcast shape for ``"none"``, else a scalar; the promoted dtype of input and target.

    Equals ``torch.nn.functional.kl_div(input, target, size_average, reduce, reduction,
    log_target)``.

    Differences from PyTorch: fp16/bf16 are computed and reduced in fp32 and returned in their own
    dtype; a non-floating input or target raises ``TypeError`` (PyTorch: ``RuntimeError``).

    Example:
        >>> import torch
        >>> from xent.divergence import kl_div
        >>> q, p = torch.tensor([0.1, 0.12, 0.78]), torch.tensor([0.0, 0.0, 1.0])
        >>> round(kl_div(q.log(), p, reduction="sum").item(), 4)
        0.2485
    """
    check_tensor_args(kl_div, input=input, target=target)
    check_floating("input", input)
    check_floating("target", target)
    if size_average is None and reduce is None:
        # "elementwise_mean" is "mean" with PyTorch's rename warning, not the batchmean one.
        asked, reduction = reduction, legacy_reduction(None, None, reduction, stacklevel=4)
        check_reduction(reduction, KL_REDUCTIONS)
        applied = "sum" if reduction == "batchmean" else reduction
        if asked == "mean":
            warnings.warn(MEAN_WARNING, UserWarning, stacklevel=3)  # past the autocast wrapper
    else:
        applied = legacy_reduction(size_average, reduce, reduction, stacklevel=4)  # past autocast
    log_target = check_number(kl_div, "log_target", log_target, "bool")
    check_broadcastable("kl_div", input, target)
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    cdtype = compute_dtype(out_dtype)
    x, y = input.to(cdtype), target.to(cdtype)
    if log_target:
        loss = torch.exp(y) * (y - x)
    else:
        # xlogy(y, y) is y log y with 0 log 0 = 0 (NaN for y < 0); its gradient is PyTorch's.
        loss = torch.xlogy(y, y) - y * x
    out = _numerics.reduce(loss, applied)
    if reduction == "batchmean" and input.dim():
        out = out / input.shape[0]
    return out.to(out_dtype)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy of the distributions ``p`` along ``dim``, in nats.

    .. math::

        H(p) = -\\sum_c p_c \\log p_c, \\qquad 0 \\log 0 = 0

    No check that ``p`` sums to 1. A negative or NaN element gives NaN.

    Gradient: ``∂H/∂p_c = -(log p_c + 1)`` for ``p_c > 0`` and exactly 0 at ``p_c = 0`` (the
    one-sided derivative there is ``+inf``; 0 keeps gradients that flow on through a softmax
    finite and exact, since ``∂p_c/∂z`` vanishes with ``p_c``).

    Args:
        p: probabilities, any shape ``(*)`` with the distribution along ``dim``, floating dtype.
        dim: the dimension that holds each distribution.

    Returns:
        ``(*)`` without ``dim``, in ``p``'s dtype (computed in fp32 for fp16/bf16).

    Equals ``-torch.xlogy(p, p).sum(dim)`` in value (and ``torch.special.entr(p).sum(dim)`` for
    ``p ≥ 0``); PyTorch's gradients at ``p = 0`` are NaN and ``+inf`` respectively.

    Example:
        >>> import torch
        >>> from xent.divergence import entropy
        >>> entropy(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
        tensor([0.6931, 0.0000])
    """
    p = floating_or_default("p", p, entropy)
    check_floating("p", p)
    pc = p.to(compute_dtype(p.dtype))
    zero = pc == 0
    # Feeding log a 1 where p = 0 keeps the unused branch finite, so its gradient is 0, not NaN.
    plogp = torch.where(zero, torch.zeros_like(pc), pc * torch.log(torch.where(zero, 1.0, pc)))
    # 0 - Σ rather than -Σ: a one-hot row gives 0.0, not -0.0.
    return (0.0 - plogp.sum(dim)).to(p.dtype)
