"""Binary cross-entropy on probabilities and on logits, each with a closed-form gradient.

Both losses treat every element independently: ``p`` (or ``z``) is the predicted probability (or
logit) that the element is positive and ``y`` its target in ``[0, 1]``. The backward passes are
written out by hand next to their derivations and use ordinary differentiable operations on the
saved inputs, so double backward (Hessian-vector products, gradient penalties) works too.

Arithmetic runs in fp32 for fp16/bf16 inputs (fp64 stays fp64), so a half-precision ``sum`` or
``mean`` over many elements neither overflows nor loses its precision before the final cast.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

from xent._engine.policy import autocast_like_torch
from xent._numerics import compute_dtype, concrete, reduce
from xent._validation import (
    InvalidValueError,
    Reduction,
    check_floating,
    check_reduction,
    check_same_shape,
    check_tensor_args,
    legacy_reduction,
    value_check,
)

# PyTorch clamps each log at -100, so p = 0 or 1 costs 100 per element instead of inf.
LOG_FLOOR = -100.0
# PyTorch floors p (1 - p) at 1e-12 in the gradient, so p = 0 or 1 gives ±1e12 (p - y), not inf.
# Its constant is an fp32 1e-12, which is this value in fp64 too.
GRAD_EPS = 9.999999960041972e-13


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_unit_interval(name: str, x: torch.Tensor) -> None:
    """Raise :class:`InvalidValueError` (PyTorch: ``RuntimeError``) naming the first element of
    ``x`` outside ``[0, 1]`` (NaN included)."""
    x = concrete(x)  # under torch.func transforms: the values beneath the wrappers
    how = value_check(x)
    if how == "none":
        return
    outside = ~((x >= 0) & (x <= 1))  # NaN fails both comparisons
    if how == "host":
        if bool(outside.any()):
            bad = x[outside].flatten()[0].item()
            raise InvalidValueError(f"all elements of {name} should be between 0 and 1, got {bad}")
    else:
        # No host sync on accelerators: the check runs on the device and fails the stream.
        torch._assert_async(~outside.any(), f"xent: all elements of {name} should be in [0, 1]")


def _check_option(
    function: str, name: str, value: torch.Tensor | None, input: torch.Tensor
) -> None:
    """``weight``/``pos_weight`` must broadcast to ``input``'s shape and, as in PyTorch, not
    require a gradient."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    try:
        shape = torch.broadcast_shapes(value.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise RuntimeError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to the input's shape "
            f"{tuple(input.shape)}"
        )
    if value.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{function}' is not differentiable with respect to argument "
            f"'{name}'. This input cannot have requires_grad True."
        )


def _upstream(
    grad_output: torch.Tensor, reduction: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """``∂L/∂l`` for every element: ``g`` (sum, none) or ``g / numel`` (mean)."""
    g = grad_output.to(dtype)
    return g / numel if reduction == "mean" and numel else g


# --------------------------------------------------------------------------------------------
# Binary cross-entropy on probabilities
# --------------------------------------------------------------------------------------------


def _bce_partials(
    p: torch.Tensor, y: torch.Tensor, need_p: bool, need_y: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The unweighted elementwise ``(∂l/∂p, ∂l/∂y)`` in the compute dtype (None where not needed).

    ``∂l/∂p = -y/p + (1 - y)/(1 - p) = (p - y) / (p (1 - p))``. PyTorch floors the denominator
    at 1e-12 rather than differentiating the clamped logs (whose slope would be 0), so p = 0 or
    1 gives ±1e12 (p - y); matched here. ``∂l/∂y = log(1 - p) - log p = -logit(p)``, unclamped
    as in PyTorch (±inf at p = 0, 1).
    """
    cdtype = compute_dtype(p.dtype)
    pc, yc = p.to(cdtype), y.to(cdtype)
    d_p = (pc - yc) / (pc * (1 - pc)).clamp_min(GRAD_EPS) if need_p else None
    d_y = torch.log1p(-pc) - torch.log(pc) if need_y else None
    return d_p, d_y


class _BinaryCrossEntropy(torch.autograd.Function):
    """``l = -w (y max(log p, -100) + (1 - y) max(log(1 - p), -100))``, reduced.

    Pure tensor operations, so ``torch.func.vmap`` batches forward, backward and ``jvp`` by
    running them on batched tensors (``generate_vmap_rule``); ``jvp`` is
    ``reduce(w (∂l/∂p ṗ + ∂l/∂y ẏ))``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        p: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, reduction: str
    ) -> torch.Tensor:
        cdtype = compute_dtype(p.dtype)
        pc, yc = p.to(cdtype), y.to(cdtype)
        # log1p(-p) keeps log(1 - p) accurate for small p (PyTorch uses log1p too).
        loss = -(
            yc * torch.log(pc).clamp_min(LOG_FLOOR)
            + (1 - yc) * torch.log1p(-pc).clamp_min(LOG_FLOOR)
        )
        if weight is not None:
            loss = loss * weight.to(cdtype)
        return reduce(loss, reduction).to(p.dtype)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        p, y, weight, reduction = inputs
        ctx.save_for_backward(p, y, weight)
        ctx.save_for_forward(p, y, weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, y, weight = ctx.saved_tensors
        cdtype = compute_dtype(p.dtype)
        scale = _upstream(grad_output, ctx.reduction, p.numel(), cdtype)
        if weight is not None:
            scale = scale * weight.to(cdtype)
        d_p, d_y = _bce_partials(p, y, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_p = None if d_p is None else (scale * d_p).expand(p.shape).to(p.dtype)
        grad_y = None if d_y is None else (scale * d_y).expand(y.shape).to(y.dtype)
        return grad_p, grad_y, None, None

    @staticmethod
    def jvp(ctx: FunctionCtx, p_t, y_t, *_) -> torch.Tensor:
        p, y, weight = ctx.saved_tensors
        d_p, d_y = _bce_partials(p, y, p_t is not None, y_t is not None)
        return _reduced_tangent(((d_p, p_t), (d_y, y_t)), weight, ctx.reduction, p)


@autocast_like_torch("binary_cross_entropy")
def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Binary cross-entropy between predicted probabilities and targets.

    .. math::

        \\ell = -w \\big(y \\max(\\log p, -100) + (1 - y) \\max(\\log(1 - p), -100)\\big)

    then ``"none"``, ``"mean"`` (over every element, not over the weights) or ``"sum"``. Each log is
    clamped at -100 as in PyTorch, so ``p = 0`` or ``1`` against the opposite target costs 100,
    not inf.

    Gradients: ``∂ℓ/∂p = w (p - y) / max(p (1 - p), 1e-12)`` (PyTorch's floor) and
    ``∂ℓ/∂y = -w logit(p)`` (unclamped: ±inf at ``p = 0, 1``); both are differentiable again.

    Args:
        input: probabilities ``p``, any shape ``(*)``, floating dtype, every element in ``[0, 1]``.
        target: ``y``, shape ``(*)`` (the input's), the input's dtype (else ``RuntimeError``, as
            in PyTorch), every element in ``[0, 1]``.
        weight: optional per-element rescaling that broadcasts to ``(*)``; no gradient.
        size_average: deprecated, as in PyTorch: with ``reduce``, if either is not None, it
            overrides ``reduction``, with PyTorch's ``UserWarning``.
        reduce: deprecated, as in PyTorch (see ``size_average``).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Returns:
        ``(*)`` for ``"none"``, else a scalar; the input's dtype. ``"mean"`` of an empty input is
        NaN, ``"sum"`` is 0.

    Equals ``torch.nn.functional.binary_cross_entropy(input, target, weight, size_average, reduce,
    reduction)``.

    Differences from PyTorch: an input or target element outside ``[0, 1]`` (or NaN) raises an
    error that is both ``ValueError`` and ``RuntimeError``, naming the value (PyTorch raises
    ``RuntimeError`` without it); fp16/bf16 are
    computed and reduced in fp32 and returned in their own dtype; a non-floating input or target
    raises ``TypeError``.

    Example:
        >>> import torch
        >>> from xent.binary import binary_cross_entropy
        >>> p, y = torch.tensor([0.7, 0.2]), torch.tensor([1.0, 0.0])
        >>> round(binary_cross_entropy(p, y).item(), 4)
        0.2899
        >>> binary_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0]))
        tensor(100.)
    """
    check_tensor_args(
        binary_cross_entropy, input=input, target=target, weight=weight, real=("weight",)
    )
    check_floating("input", input)
    check_floating("target", target)
    reduction = legacy_reduction(size_average, reduce, reduction, stacklevel=4)  # past autocast
    check_reduction(reduction)
    check_same_shape("input", input, "target", target)
    if target.dtype != input.dtype:
        raise RuntimeError(
            f"binary_cross_entropy needs input and target of one dtype: found target dtype "
            f"{target.dtype} but expected {input.dtype}"
        )
    _check_option("binary_cross_entropy", "weight", weight, input)
    _check_unit_interval("input", input)
    _check_unit_interval("target", target)
    return _BinaryCrossEntropy.apply(input, target, weight, reduction)


# --------------------------------------------------------------------------------------------
# Binary cross-entropy on logits
# --------------------------------------------------------------------------------------------


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x) = max(x, 0) + log1p(e^{-|x|})``: the exponent is ``≤ 0``, so no overflow."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


class _Softplus(torch.autograd.Function):
    """``softplus`` whose derivative is ``sigmoid(x)`` everywhere, ``x = 0`` included (autograd
    through ``max`` and ``|x|`` would give 1 there), and is itself differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _softplus(x)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)

    @staticmethod
    def jvp(ctx: FunctionCtx, x_t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x_t * torch.sigmoid(x)


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` with ``0 * inf`` taken as 0: the limit of a coefficient that is exactly 0."""
    return torch.where(a == 0, torch.zeros_like(a), a * b)


def _bce_logits_partials(
    z: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor | None,
    need_z: bool,
    need_y: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The unweighted elementwise ``(∂l/∂z, ∂l/∂y)`` in the compute dtype (None where not needed).

    softplus(-z)' = -sigmoid(-z), so with c = 1 + (pw - 1) y
      ∂l/∂z = (1 - y) - c sigmoid(-z) = c sigmoid(z) - pw y
            = (1 - y) sigmoid(z) - pw y sigmoid(-z).
    The last form has no 1 - sigmoid(z) to cancel (sigmoid(z) - 1 at z = 10 keeps only
    3 digits in fp32) and is finite at z = ±inf.
      ∂l/∂y = -z + (pw - 1) softplus(-z) = pw softplus(-z) - softplus(z)
    (softplus(z) - softplus(-z) = z); the second form is ±inf, never NaN, at z = ±inf.
    """
    cdtype = compute_dtype(torch.promote_types(z.dtype, y.dtype))
    zc, yc = z.to(cdtype), y.to(cdtype)
    pw = None if pos_weight is None else pos_weight.to(cdtype)
    d_z = d_y = None
    if need_z:
        t = yc if pw is None else pw * yc
        d_z = (1 - yc) * torch.sigmoid(zc) - t * torch.sigmoid(-zc)
    if need_y:
        d_y = -zc if pw is None else pw * _Softplus.apply(-zc) - _Softplus.apply(zc)
    return d_z, d_y


def _reduced_tangent(
    pairs: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...],
    weight: torch.Tensor | None,
    reduction: str,
    like: torch.Tensor,
) -> torch.Tensor:
    """Forward mode of an elementwise loss: ``reduce(w Σ_k ∂l/∂a_k ȧ_k)`` over the ``(partial,
    tangent)`` pairs whose tangent is given, in the loss's output dtype ``like.dtype``."""
    total = None
    for partial, tangent in pairs:
        if tangent is not None:
            term = partial * tangent.to(partial.dtype)
            total = term if total is None else total + term
    if weight is not None:
        total = total * weight.to(total.dtype)
    return reduce(total.expand(like.shape), reduction).to(like.dtype)


class _BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """``l = w ((1 - y) z + (1 + (pw - 1) y) softplus(-z))``, reduced.

    Pure tensor operations, batched by ``torch.func.vmap`` (``generate_vmap_rule``); ``jvp`` is
    ``reduce(w (∂l/∂z ż + ∂l/∂y ẏ))``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        pos_weight: torch.Tensor | None,
        reduction: str,
    ) -> torch.Tensor:
        cdtype = compute_dtype(torch.promote_types(z.dtype, y.dtype))
        zc, yc = z.to(cdtype), y.to(cdtype)
        t = yc if pos_weight is None else pos_weight.to(cdtype) * yc  # pw y
        c = 1 - yc + t  # 1 + (pw - 1) y
        # With softplus(-z) = max(-z, 0) + log1p(e^{-|z|}) the loss splits by the sign of z into
        #   l = (1 - y) max(z, 0) + pw y max(-z, 0) + (1 + (pw - 1) y) log1p(e^{-|z|}),
        # which never forms inf - inf; taking 0 * inf = 0 in the first two terms gives the limit
        # at z = ±inf (0 for a matching target, +inf otherwise) where (1 - y) z + ... is NaN.
        loss = (
            _times(1 - yc, zc.clamp_min(0))
            + _times(t, (-zc).clamp_min(0))
            + c * torch.log1p(torch.exp(-zc.abs()))
        )
        if weight is not None:
            loss = loss * weight.to(cdtype)
        # PyTorch returns the target's dtype (its arithmetic starts from the target).
        return reduce(loss, reduction).to(y.dtype)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        z, y, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(z, y, weight, pos_weight)
        ctx.save_for_forward(z, y, weight, pos_weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, y, weight, pos_weight = ctx.saved_tensors
        cdtype = compute_dtype(torch.promote_types(z.dtype, y.dtype))
        scale = _upstream(grad_output, ctx.reduction, z.numel(), cdtype)
        if weight is not None:
            scale = scale * weight.to(cdtype)
        need_z, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_z, d_y = _bce_logits_partials(z, y, pos_weight, need_z, need_y)
        grad_z = None if d_z is None else (scale * d_z).expand(z.shape).to(z.dtype)
        grad_y = None if d_y is None else (scale * d_y).expand(y.shape).to(y.dtype)
        return grad_z, grad_y, None, None, None

    @staticmethod
    def jvp(ctx: FunctionCtx, z_t, y_t, *_) -> torch.Tensor:
        z, y, weight, pos_weight = ctx.saved_tensors
        d_z, d_y = _bce_logits_partials(z, y, pos_weight, z_t is not None, y_t is not None)
        return _reduced_tangent(((d_z, z_t), (d_y, y_t)), weight, ctx.reduction, y)


@autocast_like_torch("binary_cross_entropy_with_logits")
def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: Reduction = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy between logits and targets, stable for any logit.

    .. math::

        \\ell = w \\big((1 - y)\\, z + (1 + (p_w - 1)\\, y)\\, \\operatorname{softplus}(-z)\\big),
        \\qquad \\operatorname{softplus}(-z) = \\max(-z, 0) + \\log(1 + e^{-|z|})

    which is ``-w (p_w y log σ(z) + (1 - y) log(1 - σ(z)))`` without ever forming ``σ(z)``; then
    ``"none"``, ``"mean"`` (over every element) or ``"sum"``.

    Gradients: ``∂ℓ/∂z = w ((1 + (p_w - 1) y) σ(z) - p_w y) = w ((1 - y) σ(z) - p_w y σ(-z))``
    (the second form, used here, keeps full precision where ``σ(z)`` is close to 1) and
    ``∂ℓ/∂y = w (p_w softplus(-z) - softplus(z))``; both are differentiable again.

    Args:
        input: logits ``z``, any shape ``(*)``, floating dtype.
        target: ``y``, shape ``(*)`` (the input's), floating dtype; not range-checked.
        weight: optional per-element rescaling that broadcasts to ``(*)``; no gradient.
        size_average: deprecated, as in PyTorch: with ``reduce``, if either is not None, it
            overrides ``reduction``, with PyTorch's ``UserWarning``.
        reduce: deprecated, as in PyTorch (see ``size_average``).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        pos_weight: optional weight ``p_w`` of the positive term, broadcast along the last (class)
            dimension: shape ``(C)`` for ``(*, C)`` inputs (or anything else that broadcasts to
            ``(*)``); no gradient.

    Returns:
        ``(*)`` for ``"none"``, else a scalar, in the target's dtype (as in PyTorch). ``"mean"`` of
        an empty input is NaN, ``"sum"`` is 0.

    Equals ``torch.nn.functional.binary_cross_entropy_with_logits(input, target, weight,
    size_average, reduce, reduction, pos_weight)``.

    Differences from PyTorch: at ``z = ±inf`` the loss is its limit (0 when the target matches,
    ``+inf`` otherwise; exactly ``p_w y · inf`` or ``(1 - y) · inf`` with ``0 · inf = 0``) where
    PyTorch returns NaN; fp16/bf16 are computed and reduced in fp32; ``∂ℓ/∂z`` near saturation
    is accurate to full relative precision, where PyTorch's ``σ(z) - y`` loses digits (the two
    agree to PyTorch's rounding error); a non-floating input or target raises ``TypeError``.

    Example:
        >>> import torch
        >>> from xent.binary import binary_cross_entropy_with_logits as bce_logits
        >>> z, y = torch.tensor([0.8473, -1.3863]), torch.tensor([1.0, 0.0])
        >>> round(bce_logits(z, y).item(), 4)
        0.2899
        >>> bce_logits(torch.tensor([torch.inf, -torch.inf, torch.inf]),
        ...            torch.tensor([1.0, 0.0, 0.0]), reduction="none")
        tensor([0., 0., inf])
    """
    check_tensor_args(
        binary_cross_entropy_with_logits,
        input=input,
        target=target,
        weight=weight,
        pos_weight=pos_weight,
        real=("weight", "pos_weight"),
    )
    check_floating("input", input)
    check_floating("target", target)
    reduction = legacy_reduction(size_average, reduce, reduction, stacklevel=4)  # past autocast
    check_reduction(reduction)
    check_same_shape("input", input, "target", target)
    _check_option("binary_cross_entropy_with_logits", "weight", weight, input)
    _check_option("binary_cross_entropy_with_logits", "pos_weight", pos_weight, input)
    return _BinaryCrossEntropyWithLogits.apply(input, target, weight, pos_weight, reduction)
