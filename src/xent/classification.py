"""Cross-entropy and negative log-likelihood, each with a closed-form gradient.

Both losses look at one *row* of ``C`` class scores at a time. Inputs of shape ``(N, C, d1, …, dK)``
are viewed as ``M = N·d1·…·dK`` rows of ``C`` columns (the class axis moved last), a 1-D input
``(C)`` as a single row; every formula below is written for one row ``x`` with target ``y``.

The backward passes are written out by hand rather than left to autograd, and they recompute the
softmax from the saved logits with ordinary differentiable operations, so double backward
(Hessian-vector products, gradient penalties) works too.
"""

from __future__ import annotations

import math

import torch

from xent._onepass import CEParams, empty_buffer, pass_for, resolve_impl, target_weights
from xent._validation import (
    Reduction,
    check_label_smoothing,
    check_reduction,
    compute_dtype,
    host_reads_cheap,
)

# --------------------------------------------------------------------------------------------
# Shapes and validation
# --------------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(C)`` → ``(1, C)``; ``(N, C)`` unchanged; ``(N, C, d1, …)`` → ``(N·d1·…, C)``."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _rows_to_target_shape(loss: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Per-row losses ``(M)`` back to the target's shape: ``()``, ``(N)`` or ``(N, d1, …)``."""
    if input.dim() == 1:
        return loss.reshape(())
    return loss.reshape((input.shape[0], *input.shape[2:]))


def _check_input(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 0:
        raise ValueError(
            "input must have a class dimension: expected (C), (N, C) or "
            "(N, C, d1, ..., dK), got a 0-d tensor"
        )
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {input.dtype}")


def _check_weight(weight: torch.Tensor | None, num_classes: int) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "class weights are not differentiable in xent (nor in PyTorch); "
            "pass weight.detach() instead of a tensor that requires grad"
        )


def _check_index_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Shape, dtype and range of a class-index target; raises before any arithmetic."""
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"expected an integer dtype for class-index targets, got {target.dtype}")
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(
                f"for an input of shape {tuple(input.shape)} the class-index target must be 0-d, "
                f"got shape {tuple(target.shape)}"
            )
    else:
        if target.dim() == 0 or target.shape[0] != input.shape[0]:
            n_target = target.shape[0] if target.dim() else "a 0-d target"
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({n_target})."
            )
        expected = (input.shape[0], *input.shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(
                f"Expected target size {list(expected)}, got {list(target.shape)} "
                f"(input shape {list(input.shape)})"
            )


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """``IndexError`` naming the first target outside ``[0, C)`` that is not ``ignore_index``."""
    target = target.long()  # compare in int64 whatever the integer dtype (no wrap-around)
    invalid = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if host_reads_cheap(target):
        if bool(invalid.any()):
            bad = target[invalid].flatten()[0].item()
            raise IndexError(f"Target {bad} is out of bounds.")
    else:
        # No host sync on accelerators: the check runs on the device and fails the stream.
        torch._assert_async(~invalid.any(), "xent: a class-index target is out of bounds")


def _check_prob_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {target.dtype}"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"ignore_index={ignore_index} is not supported for probability targets "
            "(a floating target with the input's shape)"
        )


IMPLS = ("auto", "torch", "triton")


def _check_z_loss(z_loss: float) -> float:
    value = float(z_loss)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return value


def _check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    value = float(softcap)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return value


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(
            f"chunk_size must be None or a positive number of rows, got {chunk_size!r}"
        )
    return None if chunk_size is None else int(chunk_size)


def _class_weight(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------
# The shared per-row pieces
# --------------------------------------------------------------------------------------------


def _log_probs(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax of ``(M, C)`` logits, in their (fp32 or fp64) dtype.

    The row max is subtracted first so no exponential exceeds 1; a row of all ``-inf`` is shifted
    by 0 and comes out NaN, as in PyTorch.
    """
    m = x.detach().amax(dim=1, keepdim=True)
    shifted = x - torch.where(m == -torch.inf, torch.zeros_like(m), m)
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _row_scale(
    grad_output: torch.Tensor, valid: torch.Tensor, denominator: torch.Tensor | None
) -> torch.Tensor:
    """``∂L/∂l_i`` for each row: ``g`` (sum), ``g / Σ w_y`` (mean) or ``g_i`` (none).

    Ignored rows get exactly 0 (via ``where``, not a product), so an all-ignored batch has a zero
    gradient even though its mean is 0/0.
    """
    scale = grad_output if denominator is None else grad_output / denominator
    return torch.where(valid, scale.expand(valid.shape), torch.zeros_like(scale))


# --------------------------------------------------------------------------------------------
# Cross-entropy: one autograd function for index and probability targets
# --------------------------------------------------------------------------------------------


def _row_coefficients(
    target: torch.Tensor, weight: torch.Tensor | None, params: CEParams, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c, D)``: ``c_i = ∂L/∂l_i`` for an upstream gradient of 1, and the mean's denominator.

    Class indices: ``D = Σ w_y`` over counted rows and ``c_i = 1 / D`` (mean) or 1 (sum, none)
    on counted rows, exactly 0 on ignored ones, so an all-ignored batch gets a zero gradient
    although its mean is 0/0. Probabilities: ``D = M`` and ``c_i = 1 / M`` (mean) or 1.
    """
    rows = target.shape[0]
    mean = params.reduction == "mean"
    if target.dim() == 2:
        denom = torch.full((), float(rows), dtype=dtype, device=target.device)
        scale = 1.0 / rows if mean and rows else 1.0
        return torch.full((rows,), scale, dtype=dtype, device=target.device), denom
    w = _class_weight(weight, torch.empty((), dtype=dtype, device=target.device))
    valid, _, w_y = target_weights(target, w, params.ignore_index, dtype)
    if not mean:
        return valid.to(dtype), None
    denom = w_y.sum()
    return torch.where(valid, 1.0 / denom, torch.zeros((), dtype=dtype, device=valid.device)), denom


def _closed_form_grad(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    coef: torch.Tensor,
    params: CEParams,
    need_target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient of ``Σ_i c_i l_i`` in differentiable operations, for double backward.

    With ``a_c = ∂/∂ log p_c`` of the row loss (index targets:
    ``a = -c[(1 - ε) w_y onehot(y) + (ε/C) w]``; probabilities: ``a = -c w q'``), log-softmax's
    Jacobian ``∂ log p_c / ∂z_j = [c = j] - p_j`` gives ``∂/∂z_j = a_j - p_j Σ_c a_c``; the
    z-loss adds ``2ζ c lse p_j`` and a soft cap multiplies by ``1 - tanh²(x/s)``. The same
    formulas as the one-pass kernel, written so that autograd can differentiate them again.
    """
    xc = x.to(compute_dtype(x.dtype))
    if params.softcap is not None:
        t = torch.tanh(xc / params.softcap)
        z = params.softcap * t
    else:
        z = xc
    log_p = _log_probs(z)
    c = coef[:, None]
    w = _class_weight(weight, xc)
    eps = params.label_smoothing
    grad_q = None
    if target.dim() == 2:
        q = target.to(xc.dtype)
        q = q if eps == 0.0 else (1.0 - eps) * q + eps / q.shape[1]
        a = -c * (q if w is None else q * w)
        if need_target_grad:
            grad_q = -(1.0 - eps) * c * (log_p if w is None else log_p * w)
    else:
        _, safe, w_y = target_weights(target, w, params.ignore_index, xc.dtype)
        a = torch.zeros_like(z).scatter(1, safe[:, None], -(1.0 - eps) * c * w_y[:, None])
        if eps > 0.0:
            a = a - (eps / z.shape[1]) * c * (torch.ones_like(z[:1]) if w is None else w[None, :])
    p = log_p.exp()
    grad = a - p * a.sum(dim=1, keepdim=True)
    if params.z_loss != 0.0:
        lse = (z - log_p)[:, :1]  # any column: z_c - log p_c = lse
        grad = grad + 2.0 * params.z_loss * c * lse * p
    if params.softcap is not None:
        grad = grad * (1.0 - t * t)
    return grad.to(x.dtype), None if grad_q is None else grad_q.to(target.dtype)


def _empty_grads(
    x: torch.Tensor | None, target: torch.Tensor, need_x: bool, need_q: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if x is None:
        raise RuntimeError(
            "inplace_backward=True overwrote the logits with their gradient, which the first "
            "backward consumed; recompute the loss to backward through it again"
        )
    return (
        empty_buffer(tuple(x.shape), x) if need_x else None,
        empty_buffer(tuple(target.shape), target) if need_q else None,
    )


def _grad_in_forward(params: CEParams, x: torch.Tensor) -> bool:
    """Whether the forward pass forms the gradient (scalar losses), or backward does.

    fp16 logits are the exception: their gradient is formed in backward, where the upstream
    factor is known. Formed early with a factor of 1 (and the mean's 1/N), fp16's narrow range
    would flush small entries to zero before a loss scale of 2¹² could rescue them.
    """
    return params.reduction != "none" and x.dtype != torch.float16


def _forward_impl(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: CEParams,
    need_x: bool,
    need_q: bool,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, lse, c, ∂L/∂x, ∂L/∂q)``; the gradients only for scalar losses (else None)."""
    if target.dim() == 1:
        _check_target_range(target, x.shape[1], params.ignore_index)
    cdtype = compute_dtype(x.dtype)
    coef, denom = _row_coefficients(target, weight, params, cdtype)
    scalar = _grad_in_forward(params, x)
    grad_x = grad_q = None
    if scalar and need_x:
        grad_x = x if inplace else empty_buffer(tuple(x.shape), x)
    if scalar and need_q:
        grad_q = empty_buffer(tuple(target.shape), target)
    loss, lse = pass_for(params)(
        x, target, weight, coef, params, grad_out=grad_x, grad_target_out=grad_q
    )
    if params.reduction == "mean":
        out = loss.sum() / denom  # Σ l_i / Σ w_y (indices) or / M (probabilities)
    elif params.reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    return out.to(x.dtype), lse, coef, grad_x, grad_q


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``(M, C)`` logits against ``(M)`` indices or ``(M, C)`` probabilities.

    For ``"mean"``/``"sum"`` the forward pass already forms the gradient (the loss is a scalar,
    so ``∂L/∂x`` is known up to the upstream factor) and backward only scales it. For ``"none"``
    the forward keeps just the per-row log-sum-exp and backward recomputes ``softmax`` from it.
    """

    @staticmethod
    def forward(ctx, x, target, weight, params: CEParams, inplace: bool, grad_on: bool):
        # Under torch.no_grad no gradient is needed, whatever the inputs' requires_grad.
        need_x = ctx.needs_input_grad[0] and grad_on
        need_q = ctx.needs_input_grad[1] and grad_on
        out, lse, coef, grad_x, grad_q = _forward_impl(
            x, target, weight, params, need_x, need_q, inplace
        )
        ctx.params, ctx.inplace = params, bool(inplace and grad_x is not None)
        ctx.grads = (grad_x, grad_q)
        ctx.save_for_backward(None if ctx.inplace else x, target, weight, coef, lse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, target, weight, coef, lse = ctx.saved_tensors
        params: CEParams = ctx.params
        need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_output.to(coef.dtype)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient is needed
            if x is None:
                raise RuntimeError(
                    "inplace_backward=True overwrote the logits; double "
                    "backward needs them: call cross_entropy without it"
                )
            c = coef * g if params.reduction != "none" else coef * g.reshape(-1)
            grad_x, grad_q = _closed_form_grad(x, target, weight, c, params, need_q)
            return (grad_x if need_x else None), grad_q, None, None, None, None
        if not _grad_in_forward(params, target if x is None else x):
            # Only the log-sum-exp was kept ("none", or fp16 logits): one more pass forms
            # c_i g_i ∂l_i/∂x from it, the upstream factor applied before any rounding.
            grads = _empty_grads(x, target, need_x, need_q)
            pass_for(params)(
                x,
                target,
                weight,
                coef * (g.reshape(-1) if params.reduction == "none" else g),
                params,
                lse_in=lse,
                grad_out=grads[0],
                grad_target_out=grads[1],
            )
            return grads[0], grads[1], None, None, None, None
        # The forward pass already formed c_i ∂l_i/∂x; hand the buffers over (no copy; they are
        # freed with the result) and apply the upstream factor.
        grad_x, grad_q = ctx.grads
        ctx.grads = (None, None)
        if (need_x and grad_x is None) or (need_q and grad_q is None):
            # A second backward through a retained graph: form the same buffers again, by the
            # same arithmetic, so repeated backwards agree bit for bit.
            grad_x, grad_q = _empty_grads(x, target, need_x, need_q)
            pass_for(params)(
                x, target, weight, coef, params, grad_out=grad_x, grad_target_out=grad_q
            )
        # On CPU reading g is free, and skipping the multiply by 1 saves a pass over M × C.
        if params.impl == "triton" and not host_reads_cheap(g):
            from xent._triton_ce import scale_unless_one_  # the same skip, decided on the device

            grad_x, grad_q = scale_unless_one_(grad_x, g), scale_unless_one_(grad_q, g)
        elif not (host_reads_cheap(g) and bool(g == 1)):
            grad_x = None if grad_x is None else grad_x.mul_(g.to(grad_x.dtype))
            grad_q = None if grad_q is None else grad_q.mul_(g.to(grad_q.dtype))
        return grad_x, grad_q, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.compile: the same computation as opaque operators with a fake (shape-only) version
# --------------------------------------------------------------------------------------------
# Dynamo cannot trace the chunk loop into a graph without unrolling it, and should not: the
# one-pass kernel is already fused. Registered as custom operators, the forward and the
# recomputing backward appear in the compiled graph as single nodes, so
# `torch.compile(fullgraph=True)` of a model that calls `xent.cross_entropy` traces without
# graph breaks. Options travel as a reduction string and a flat list of numbers.

_FWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, str reduction, float[] options, bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, Tensor lse, Tensor coef, str reduction,"
    " float[] options, bool[] need) -> (Tensor, Tensor)"
)


@torch.library.custom_op("xent::cross_entropy_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _cross_entropy_fwd_op(x, target, weight, reduction, options, need):
    params = CEParams.from_options(reduction, options)
    out, lse, coef, grad_x, grad_q = _forward_impl(x, target, weight, params, need[0], need[1])
    return (
        out,
        lse,
        coef,
        x.new_empty(0) if grad_x is None else grad_x,  # operators cannot return None
        target.new_empty(0) if grad_q is None else grad_q,
    )


@_cross_entropy_fwd_op.register_fake
def _(x, target, weight, reduction, options, need):
    rows, cdtype = x.shape[0], compute_dtype(x.dtype)
    scalar = _grad_in_forward(CEParams(reduction=reduction), x)
    return (
        x.new_empty(() if scalar else (rows,)),
        x.new_empty((rows,), dtype=cdtype),
        x.new_empty((rows,), dtype=cdtype),
        x.new_empty(x.shape if scalar and need[0] else (0,)),
        target.new_empty(target.shape if scalar and need[1] else (0,)),
    )


@torch.library.custom_op("xent::cross_entropy_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _cross_entropy_bwd_op(x, target, weight, lse, coef, reduction, options, need):
    params = CEParams.from_options(reduction, options)
    grad_x = torch.empty_like(x) if need[0] else x.new_empty(0)
    grad_q = torch.empty_like(target) if need[1] else x.new_empty(0)
    pass_for(params)(
        x,
        target,
        weight,
        coef,
        params,
        lse_in=lse,
        grad_out=grad_x if need[0] else None,
        grad_target_out=grad_q if need[1] else None,
    )
    return grad_x, grad_q


@_cross_entropy_bwd_op.register_fake
def _(x, target, weight, lse, coef, reduction, options, need):
    return (
        torch.empty_like(x) if need[0] else x.new_empty(0),
        torch.empty_like(target) if need[1] else x.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, target, weight, reduction, options, need = inputs
    _, lse, coef, grad_x, grad_q = output
    ctx.save_for_backward(x, target, weight, lse, coef, grad_x, grad_q)
    ctx.reduction, ctx.options, ctx.need = reduction, options, need


def _fwd_backward(ctx, grad_out, *_unused):
    x, target, weight, lse, coef, grad_x, grad_q = ctx.saved_tensors
    need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if _grad_in_forward(CEParams(reduction=ctx.reduction), x):  # formed in the forward: scale
        g = grad_out.to(coef.dtype)
        return (
            (grad_x * g).to(x.dtype) if need_x else None,
            (grad_q * g).to(target.dtype) if need_q else None,
            None,
            None,
            None,
            None,
        )
    grad_x, grad_q = torch.ops.xent.cross_entropy_bwd(
        x,
        target,
        weight,
        lse,
        coef * grad_out.to(coef.dtype),
        ctx.reduction,
        ctx.options,
        [need_x, need_q],
    )
    return grad_x if need_x else None, grad_q if need_q else None, None, None, None, None


torch.library.register_autograd(
    "xent::cross_entropy_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


def _cross_entropy_compiled(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: CEParams
) -> torch.Tensor:
    need = [x.requires_grad, target.requires_grad]
    return torch.ops.xent.cross_entropy_fwd(
        x, target, weight, params.reduction, params.options(), need
    )[0]


# --------------------------------------------------------------------------------------------
# Negative log-likelihood
# --------------------------------------------------------------------------------------------


class _NLL(torch.autograd.Function):
    """``l = -w_y · x_y`` for ``(M, C)`` log-probabilities ``x`` and ``(M)`` targets."""

    @staticmethod
    def forward(ctx, x, target, weight, params: CEParams):
        xc = x.to(compute_dtype(x.dtype))
        w = _class_weight(weight, xc)
        valid, safe, w_y = target_weights(target, w, params.ignore_index, xc.dtype)
        zero = torch.zeros((), dtype=xc.dtype, device=xc.device)
        loss = torch.where(valid, -w_y * xc.gather(1, safe[:, None]).squeeze(1), zero)
        denominator = None
        if params.reduction == "mean":
            denominator = w_y.sum()
            out = loss.sum() / denominator
        elif params.reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        ctx.save_for_backward(target, weight, denominator)
        ctx.shape_dtype = (x.shape, x.dtype, xc.dtype)
        ctx.params = params
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        # ∂l/∂x_j = -w_y [j = y]: one entry per row, scaled by ∂L/∂l_i. The loss is linear in x,
        # so this gradient does not depend on x and the second derivative is zero.
        target, weight, denominator = ctx.saved_tensors
        shape, dtype, cdtype = ctx.shape_dtype
        params: CEParams = ctx.params
        w = None if weight is None else weight.to(device=target.device, dtype=cdtype)
        valid, safe, w_y = target_weights(target, w, params.ignore_index, cdtype)
        scale = _row_scale(grad_output.to(cdtype), valid, denominator)
        grad = torch.zeros(shape, dtype=cdtype, device=target.device)
        grad = grad.scatter(1, safe[:, None], (-scale * w_y)[:, None])
        return grad.to(dtype), None, None, None


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy between logits and class indices or class probabilities.

    With ``log p = log_softmax(x)`` over the class axis and class weights ``w`` (all 1 if
    ``weight`` is None), each element's loss is, for a class-index target ``y``,

    .. math::

        l = (1 - ε)\\,(-w_y \\log p_y) + \\frac{ε}{C} \\sum_c (-w_c \\log p_c),

    and for a probability target ``q`` (smoothed to ``q' = (1 - ε) q + ε / C``),

    .. math::

        l = -\\sum_c w_c\\, q'_c \\log p_c .

    ``"mean"`` divides ``Σ l`` by ``Σ w_y`` over the elements whose target is not
    ``ignore_index`` (class indices) or by the number of elements (probabilities).

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; floating dtype.
        target: class indices ``()``, ``(N)`` or ``(N, d1, …, dK)`` with values in ``[0, C)``
            or equal to ``ignore_index``; or probabilities with ``input``'s shape and a floating
            dtype (no check that they sum to 1; differentiable).
        weight: optional ``(C)`` class weights, may be negative; not differentiable.
        ignore_index: class-index targets equal to it contribute nothing and are left out of the
            ``"mean"`` denominator (their logits still enter every softmax). Any integer, also
            outside ``[0, C)``. Probability targets accept only negative values (unused).
        reduction: ``"none"`` (shape of a class-index target), ``"mean"`` or ``"sum"`` (scalars).
        label_smoothing: ``ε`` in ``[0, 1]``.
        z_loss: ``ζ ≥ 0`` (keyword-only): adds ``ζ · lse(x)²`` to each counted element's loss
            (PaLM's auxiliary loss; ``lse`` the log-sum-exp over classes); under ``"mean"`` it
            shares the cross-entropy's denominator.
        softcap: ``s > 0`` (keyword-only): the logits are replaced by ``s · tanh(x / s)`` before
            everything else (Gemma 2); the gradient includes the ``1 - tanh²`` factor.
        inplace_backward: opt-in (keyword-only), 2-D inputs, scalar reductions: the gradient is
            written **into the logits buffer**, which is overwritten during the forward call, so
            no gradient-sized memory is allocated. Only for logits nothing else needs afterwards;
            double backward is then impossible.
        chunk_size: rows per chunk of the one-pass kernel (keyword-only; default: ~4 MiB of
            logits). Changes nothing but speed.
        impl: ``"auto"`` (Triton on CUDA when installed, else the torch kernel), ``"torch"`` or
            ``"triton"`` (CUDA tensors, or any tensors with ``TRITON_INTERPRET=1``).

    For ``"mean"``/``"sum"`` the gradient is formed in the forward pass, in one pass over the
    logits, and backward only scales it by the upstream gradient; for ``"none"`` the forward
    keeps the per-row log-sum-exp and backward recomputes the softmax from it.

    Returns:
        The loss in ``input``'s dtype. All targets ignored: ``"mean"`` is NaN (with a zero
        gradient), ``"sum"`` is 0. An empty batch: ``"mean"`` is NaN, ``"sum"`` is 0.

    Equals ``torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)``, except (deliberate deviations):

    * ``label_smoothing`` outside ``[0, 1]`` or NaN raises ``ValueError`` (PyTorch silently
      ignores negative and NaN values);
    * fp16/bf16 inputs are computed and reduced in fp32 and rounded once, so a ``"mean"`` over
      many rows stays finite (PyTorch's CPU kernel overflows to inf/NaN past ~60 000 fp16 rows);
    * class-index targets may have any integer dtype (PyTorch takes only int64 and uint8).

    Raises:
        IndexError: a target outside ``[0, C)`` that is not ``ignore_index``, e.g.
            ``Target 5 is out of bounds.``
        ValueError: an unknown ``reduction``, bad ``label_smoothing``, batch-size mismatch.
        RuntimeError: target size or weight length that does not fit ``input``; a wrong target
            dtype.

    Example:
        >>> import torch, xent
        >>> logits = torch.tensor([[0.4, 0.4, 0.2]]).log()  # the mastiff example
        >>> xent.cross_entropy(logits, torch.tensor([1]))
        tensor(0.9163)
        >>> xent.cross_entropy(logits, torch.tensor([1]), label_smoothing=0.1)
        tensor(0.9394)
    """
    check_reduction(reduction)
    eps = check_label_smoothing(label_smoothing)
    _check_input(input)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_weight(weight, num_classes)
    params = CEParams(
        int(ignore_index),
        reduction,
        eps,
        _check_z_loss(z_loss),
        _check_softcap(softcap),
        _check_chunk_size(chunk_size),
        resolve_impl(impl, input, IMPLS),
    )
    if target.shape == input.shape:
        _check_prob_target(input, target, ignore_index)
        rows_target = _as_rows(target)
    else:
        _check_index_target(input, target, ignore_index)
        # int64 from here on: compared in uint8/int8, ignore_index=-100 would wrap to 156/-100
        # and silently ignore a real class. Its range is checked inside, where it is read.
        rows_target = target.reshape(-1).long()
    if torch.compiler.is_compiling():
        loss = _cross_entropy_compiled(_as_rows(input), rows_target, weight, params)
    else:
        grad_on = torch.is_grad_enabled()
        inplace = bool(inplace_backward) and input.dim() == 2 and grad_on
        loss = _CrossEntropy.apply(_as_rows(input), rows_target, weight, params, inplace, grad_on)
    return _rows_to_target_shape(loss, input) if reduction == "none" else loss


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of class indices under given log-probabilities.

    .. math::

        l = -w_y\\, x_y, \\qquad
        L_{\\text{mean}} = \\frac{\\sum_i l_i}{\\sum_{i:\\, y_i \\ne \\text{ignore}} w_{y_i}}

    ``cross_entropy(x, y)`` equals ``nll_loss(log_softmax(x, 1), y)``.

    Args:
        input: log-probabilities ``(C)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; floating dtype.
            Nothing checks that they are normalised: the loss is simply linear in ``input``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, …, dK)`` in ``[0, C)`` or
            ``ignore_index``.
        weight: optional ``(C)`` class weights.
        ignore_index: targets equal to it contribute nothing and leave the mean's denominator.
        reduction: ``"none"`` (target's shape), ``"mean"`` or ``"sum"``.

    Returns:
        The loss in ``input``'s dtype (fp16/bf16 are reduced in fp32: a deviation, as in
        :func:`cross_entropy`).

    Equals ``torch.nn.functional.nll_loss(input, target, weight, ignore_index=ignore_index,
    reduction=reduction)``.

    Raises:
        IndexError: a target outside ``[0, C)`` that is not ``ignore_index``.
        ValueError: an unknown ``reduction`` or a batch-size mismatch.

    Example:
        >>> import torch, xent
        >>> log_p = torch.tensor([[0.1, 0.12, 0.78]]).log()  # the horse example
        >>> xent.nll_loss(log_p, torch.tensor([2]))
        tensor(0.2485)
    """
    check_reduction(reduction)
    _check_input(input)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_weight(weight, num_classes)
    _check_index_target(input, target, ignore_index)
    _check_target_range(
        target, input.shape[0] if input.dim() == 1 else input.shape[1], ignore_index
    )
    params = CEParams(int(ignore_index), reduction)
    loss = _NLL.apply(_as_rows(input), target.reshape(-1).long(), weight, params)
    return _rows_to_target_shape(loss, input) if reduction == "none" else loss
