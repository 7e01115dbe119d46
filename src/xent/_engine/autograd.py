"""The autograd Functions of the engine: cross-entropy on logits, NLL, and losses on hidden states.

Each Function calls a row kernel (:mod:`xent._engine.rows`) directly on the logits, or through the
chunk walker (:mod:`xent._engine.walker`) on hidden states. For scalar losses the forward pass
already forms the gradient and backward only scales it; for ``reduction="none"`` the forward
keeps the per-row log-sum-exp and backward recomputes from it. A second backward through a
retained graph forms the same buffers again by the same arithmetic, so repeated backwards agree
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xent._engine import dispatch, policy
from xent._engine.options import CEParams
from xent._engine.rows import CrossEntropyRows
from xent._engine.walker import linear_walk
from xent._numerics import (
    compute_dtype,
    empty_buffer,
    in_dtypes_of,
    reduce_rows,
    row_coefficients,
    stable_max,
    target_weights,
)
from xent._validation import check_target_range

if TYPE_CHECKING:
    from xent._engine.parallel import VocabParallel


def _class_weight(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------
# Cross-entropy on logits
# --------------------------------------------------------------------------------------------


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
    shifted = z - stable_max(z, 1)
    log_p = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
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
        raise RuntimeError(policy.INPLACE_CONSUMED)
    return (
        empty_buffer(tuple(x.shape), x) if need_x else None,
        empty_buffer(tuple(target.shape), target) if need_q else None,
    )


def cross_entropy_forward(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: CEParams,
    need_x: bool,
    need_q: bool,
    inplace: bool = False,
    parallel: VocabParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, lse, c, ∂L/∂x, ∂L/∂q)``; the gradients only for scalar losses (else None)."""
    if target.dim() == 1:  # checked here, where it is read (inside the compiled operator too)
        check_target_range(
            target, x.shape[1] if parallel is None else parallel.vocab, params.ignore_index
        )
    cdtype = compute_dtype(x.dtype)
    _, coef, denom = row_coefficients(
        target,
        reduction=params.reduction,
        dtype=cdtype,
        ignore_index=params.ignore_index,
        class_weight=weight,
    )
    scalar = policy.grad_in_forward(params.reduction, x.dtype)
    grad_x = grad_q = None
    if scalar and need_x:
        grad_x = x if inplace else empty_buffer(tuple(x.shape), x)
    if scalar and need_q:
        grad_q = empty_buffer(tuple(target.shape), target)
    rows = CrossEntropyRows(params, target, weight, coef, grad_target=grad_q, parallel=parallel)
    loss, lse = rows(x, slice(None), grad_x)
    out = reduce_rows(loss, params.reduction, denom)
    return out.to(x.dtype), lse, coef, grad_x, grad_q


def cross_entropy_backward_pass(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    coef: torch.Tensor,
    params: CEParams,
    grads: tuple[torch.Tensor | None, torch.Tensor | None],
    lse: torch.Tensor | None = None,
    parallel: VocabParallel | None = None,
) -> None:
    """Write ``c_i ∂l_i/∂(x, q)`` into ``grads``: from the saved ``lse`` ("none", fp16), or by
    the forward's own arithmetic (a second backward of a scalar loss)."""
    rows = CrossEntropyRows(
        params, target, weight, coef, lse=lse, grad_target=grads[1], parallel=parallel
    )
    rows(x, slice(None), grads[0])


class CrossEntropyFn(torch.autograd.Function):
    """Cross-entropy of ``(M, C)`` logits against ``(M)`` indices or ``(M, C)`` probabilities.

    With ``parallel`` the logits are this rank's slice of the vocabulary (class indices only).
    """

    @staticmethod
    def forward(ctx, x, target, weight, params: CEParams, inplace, grad_on, parallel):
        # Under torch.no_grad no gradient is needed, whatever the inputs' requires_grad.
        need_x = ctx.needs_input_grad[0] and grad_on
        need_q = ctx.needs_input_grad[1] and grad_on
        out, lse, coef, grad_x, grad_q = cross_entropy_forward(
            x, target, weight, params, need_x, need_q, inplace, parallel
        )
        ctx.params, ctx.inplace = params, bool(inplace and grad_x is not None)
        if ctx.inplace:  # the logits now hold their gradient: an earlier saver must notice
            torch.autograd.graph.increment_version(x)
        ctx.parallel, ctx.grads = parallel, (grad_x, grad_q)
        ctx.save_for_backward(None if ctx.inplace else x, target, weight, coef, lse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, target, weight, coef, lse = ctx.saved_tensors
        params: CEParams = ctx.params
        need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_output.to(coef.dtype)
        none = params.reduction == "none"
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient is needed
            if ctx.parallel is not None:
                policy.refuse_double_backward("vocab_parallel_cross_entropy")
            if x is None:
                raise RuntimeError(
                    "inplace_backward=True overwrote the logits; double "
                    "backward needs them: call cross_entropy without it"
                )
            c = coef * (g.reshape(-1) if none else g)
            grad_x, grad_q = _closed_form_grad(x, target, weight, c, params, need_q)
            return (grad_x if need_x else None), grad_q, None, None, None, None, None
        dtype = target.dtype if x is None else x.dtype
        if not policy.grad_in_forward(params.reduction, dtype):
            # Only the log-sum-exp was kept ("none", or fp16 logits): one more pass forms
            # c_i g_i ∂l_i/∂x from it, the upstream factor applied before any rounding.
            grads = _empty_grads(x, target, need_x, need_q)
            c = coef * (g.reshape(-1) if none else g)
            cross_entropy_backward_pass(x, target, weight, c, params, grads, lse, ctx.parallel)
            return grads[0], grads[1], None, None, None, None, None
        # The forward pass already formed c_i ∂l_i/∂x; hand the buffers over (no copy; they are
        # freed with the result) and apply the upstream factor.
        grad_x, grad_q = ctx.grads
        ctx.grads = (None, None)
        if (need_x and grad_x is None) or (need_q and grad_q is None):
            # A second backward through a retained graph: form the same buffers again.
            grad_x, grad_q = _empty_grads(x, target, need_x, need_q)
            cross_entropy_backward_pass(
                x, target, weight, coef, params, (grad_x, grad_q), None, ctx.parallel
            )
        dispatch.scale_unless_one_((grad_x, grad_q), g, params.impl)
        return grad_x, grad_q, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Negative log-likelihood
# --------------------------------------------------------------------------------------------


class NLLFn(torch.autograd.Function):
    """``l = -w_y · x_y`` for ``(M, C)`` log-probabilities ``x`` and ``(M)`` targets."""

    @staticmethod
    def forward(ctx, x, target, weight, params: CEParams):
        xc = x.to(compute_dtype(x.dtype))
        w = _class_weight(weight, xc)
        valid, safe, w_y = target_weights(target, w, params.ignore_index, xc.dtype)
        zero = torch.zeros((), dtype=xc.dtype, device=xc.device)
        loss = torch.where(valid, -w_y * xc.gather(1, safe[:, None]).squeeze(1), zero)
        _, coef, denominator = row_coefficients(
            target,
            reduction=params.reduction,
            dtype=xc.dtype,
            ignore_index=params.ignore_index,
            class_weight=w,
        )
        out = reduce_rows(loss, params.reduction, denominator)
        ctx.save_for_backward(target, weight, coef)
        ctx.shape_dtype = (x.shape, x.dtype, xc.dtype)
        ctx.params = params
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        # ∂l/∂x_j = -w_y [j = y]: one entry per row, scaled by c_i g. The loss is linear in x,
        # so this gradient does not depend on x and the second derivative is zero.
        target, weight, coef = ctx.saved_tensors
        shape, dtype, cdtype = ctx.shape_dtype
        params: CEParams = ctx.params
        w = None if weight is None else weight.to(device=target.device, dtype=cdtype)
        _, safe, w_y = target_weights(target, w, params.ignore_index, cdtype)
        g = grad_output.to(cdtype)
        scale = coef * (g.reshape(-1) if params.reduction == "none" else g)
        grad = torch.zeros(shape, dtype=cdtype, device=target.device)
        grad = grad.scatter(1, safe[:, None], (-scale * w_y)[:, None])
        return grad.to(dtype), None, None, None


# --------------------------------------------------------------------------------------------
# Cross-entropy on hidden states
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearOptions:
    """Options of one linear cross-entropy call and its non-differentiable tensors.

    They travel through autograd as one object, so backward returns only the gradients of the
    input, the weight and the bias.
    """

    ce: CEParams
    target: torch.Tensor
    class_weight: torch.Tensor | None = None
    token_weight: torch.Tensor | None = None
    normalizer: torch.Tensor | float | None = None
    chunk_tokens: int | None = None
    parallel: VocabParallel | None = None


def _linear_ce_walk(x, w, b, opts: LinearOptions, coef, need, lse=None, skip=None):
    rows = CrossEntropyRows(
        opts.ce, opts.target, opts.class_weight, coef, lse=lse, parallel=opts.parallel
    )
    return linear_walk(
        x,
        w,
        b,
        rows,
        num_outputs=rows.num_outputs,
        need=need if coef is not None else (False, False, False),
        skip=skip,
        chunk_tokens=opts.chunk_tokens,
        parallel=opts.parallel,
    )


class LinearCrossEntropyFn(torch.autograd.Function):
    """Linear + cross-entropy on ``(N, H)`` inputs and ``(N)`` targets, through the walker.

    Only ``x``, ``w`` and ``b`` are differentiable; everything else rides in ``opts``.
    """

    @staticmethod
    def forward(ctx, x, w, b, opts: LinearOptions):
        ce, target = opts.ce, opts.target
        cdtype = compute_dtype(x.dtype)
        tw, coef, denom = row_coefficients(
            target,
            reduction=ce.reduction,
            dtype=cdtype,
            ignore_index=ce.ignore_index,
            class_weight=opts.class_weight,
            token_weight=opts.token_weight,
            normalizer=opts.normalizer,
        )
        skip = target == ce.ignore_index
        scalar = ce.reduction != "none"
        need = tuple(ctx.needs_input_grad[:3])
        (loss, lse), grad_x, gw, gb = _linear_ce_walk(
            x, w, b, opts, coef if scalar else None, need, skip=skip
        )
        out = reduce_rows(loss * tw, ce.reduction, denom)  # tw: 0 on ignored tokens
        ctx.opts, ctx.grads, ctx.skip = opts, (grad_x, gw, gb), skip
        ctx.save_for_backward(x, w, b, coef, lse)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        policy.refuse_double_backward("linear_cross_entropy")
        x, w, b, coef, lse = ctx.saved_tensors
        opts: LinearOptions = ctx.opts
        g = grad_out.to(coef.dtype)
        scalar = opts.ce.reduction != "none"
        need = tuple(ctx.needs_input_grad[:3])
        grad_x, grad_w, grad_b = ctx.grads
        ctx.grads = (None, None, None)  # hand the buffers over: no copy
        if not scalar or all(grad is None for grad in (grad_x, grad_w, grad_b)):
            # "none": recompute the logits chunk by chunk from the saved log-sum-exp. A scalar
            # loss whose buffers a first backward already consumed (retained graph) forms them
            # again by the forward's own arithmetic, so repeated backwards agree bit for bit.
            c = coef * g.reshape(-1) if not scalar else coef
            _, grad_x, grad_w, grad_b = _linear_ce_walk(
                x, w, b, opts, c, need, lse=None if scalar else lse, skip=ctx.skip
            )
        if scalar:
            dispatch.scale_unless_one_((grad_x, grad_w, grad_b), g, opts.ce.impl)
        return (*in_dtypes_of((grad_x, grad_w, grad_b), (x, w, b)), None)
