"""Huber loss: quadratic for small residuals, linear for large ones.

Gradients come from autograd through elementary operations, arranged so that they stay finite
(``±delta``) for infinite residuals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from xent._engine.policy import autocast_like_torch
from xent._numerics import compute_dtype, reduce
from xent._validation import (
    InvalidValueError,
    Reduction,
    check_broadcastable,
    check_floating,
    check_number,
    check_reduction,
    check_same_shape,
    check_tensor_args,
    legacy_reduction,
    type_name,
)


def check_delta(delta: float, function: Callable[..., Any] | None = None) -> float:
    """``delta`` as a float: ``TypeError`` for what is not a real number (as in PyTorch), and
    :class:`~xent._validation.InvalidValueError` naming the value for ``delta ≤ 0`` or NaN
    (PyTorch: ``RuntimeError``)."""
    value = check_number(function, "delta", delta, "float")
    if not value > 0.0:  # NaN fails it too (no math.isnan: torch.compile traces this)
        raise InvalidValueError(f"delta must be > 0, got {delta!r}")
    return value


def check_module_delta(delta: object) -> None:
    """``HuberLoss``'s construction-time check, PyTorch's: a Python ``float`` or ``int``."""
    if not isinstance(delta, (float, int)):
        raise TypeError(f"delta must be a float or int, got {delta!r} ({type_name(delta)})")


@autocast_like_torch("huber_loss")
def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Huber loss of the residual ``d = input - target``, optionally weighted per element.

    .. math::

        \\ell = w \\cdot \\begin{cases} \\tfrac12 d^2 & |d| < \\delta \\\\
                          \\delta\\,(|d| - \\tfrac12 \\delta) & \\text{otherwise} \\end{cases}

    then ``"none"``, ``"mean"`` (over every element, not over the weights, as in PyTorch) or
    ``"sum"``. Gradients: ``∂ℓ/∂x = -∂ℓ/∂y = w · clamp(d, -δ, δ)``, ``±δ`` even at ``d = ±inf``
    (the second derivative is ``w`` for ``|d| < δ`` and 0 elsewhere), and ``∂ℓ/∂w`` is the
    unweighted loss.

    Args:
        input: ``(*)``, floating dtype.
        target: ``(*)``; another shape that broadcasts with ``(*)`` is used after PyTorch's
            ``UserWarning`` about it.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        delta: the threshold ``δ > 0`` between the quadratic and the linear part.
        weight: optional per-element weights of exactly the input's shape ``(*)`` (another shape
            raises ``ValueError``, as in PyTorch).

    Returns:
        The broadcast shape of input and target for ``"none"``, else a scalar; the input's dtype
        (promoted with the weight's, as in PyTorch). ``"mean"`` of an empty input is NaN.

    Equals ``torch.nn.functional.huber_loss(input, target, reduction=reduction, delta=delta,
    weight=weight)``.

    Differences from PyTorch: ``delta ≤ 0`` or NaN raises an error that is both ``ValueError``
    and ``RuntimeError`` (PyTorch's type), naming the value; an invalid ``reduction`` is refused
    before any arithmetic; fp16/bf16 are computed and reduced in fp32 and returned in their own
    dtype.

    Example:
        >>> import torch
        >>> from xent.regression import huber_loss
        >>> x, y = torch.tensor([0.5, 3.0, -2.0]), torch.zeros(3)
        >>> huber_loss(x, y, reduction="none")
        tensor([0.1250, 2.5000, 1.5000])
        >>> huber_loss(x, y, reduction="none", delta=2.0)
        tensor([0.1250, 4.0000, 2.0000])
    """
    check_tensor_args(
        huber_loss, input=input, target=target, weight=weight, real=("target", "weight")
    )
    check_floating("input", input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    reduction = legacy_reduction(None, None, reduction, stacklevel=4)  # past autocast
    check_reduction(reduction)
    delta = check_delta(delta, huber_loss)
    if target.shape != input.shape:
        check_broadcastable("huber_loss", input, target)
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            UserWarning,
            stacklevel=3,  # past the autocast wrapper, to the caller
        )
    out_dtype = input.dtype
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        check_same_shape("input", input, "weight", weight)
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    cdtype = compute_dtype(out_dtype)
    d = input.to(cdtype) - target.to(cdtype)
    # q is d in the quadratic zone |d| < δ and ±δ outside it, so q (d - q/2) is d²/2 inside and
    # δ (|d| - δ/2) outside. Outside, the gradient reaches d only through the second factor, so
    # ∂/∂d = q there: finite at d = ±inf, where differentiating d²/2 as well (a where() between
    # the two formulas) would backpropagate 0 · inf = NaN. The zone is open (|d| = δ counts as
    # outside for the second derivative, as in PyTorch) and a NaN residual stays NaN in q.
    q = torch.where(d.abs() < delta, d, d.detach().clamp(-delta, delta))
    loss = q * (d - 0.5 * q)
    if weight is not None:
        loss = loss * weight.to(cdtype)
    return reduce(loss, reduction).to(out_dtype)
