"""``torch.compile``: the cross-entropy as opaque custom operators with fake (shape-only) versions.

Dynamo cannot trace the chunk loop into a graph without unrolling it, and should not: the
one-pass kernel is already fused. Registered as custom operators, the forward and the
recomputing backward appear in the compiled graph as single nodes, so
`torch.compile(fullgraph=True)` of a model that calls `xent.cross_entropy` traces without
graph breaks. Options travel as a reduction string, a backend string and a list of numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xent._engine import policy
from xent._engine.autograd import (
    CrossEntropyFn,
    CrossEntropyFuncFn,
    LinearOptions,
    class_weight_grad,
    cross_entropy_backward_pass,
    cross_entropy_forward,
    linear_ce_backward,
    linear_ce_forward,
)
from xent._engine.options import CEParams
from xent._numerics import compute_dtype
from xent._validation import check_target_range

if TYPE_CHECKING:
    from xent._engine.parallel import VocabParallel

_FWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, str reduction, str impl, float[] options,"
    " bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, Tensor stats, Tensor coef, str reduction,"
    " str impl, float[] options, bool[] need) -> (Tensor, Tensor)"
)


@torch.library.custom_op("xent::cross_entropy_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _cross_entropy_fwd_op(x, target, weight, reduction, impl, options, need):
    params = CEParams.from_options(reduction, impl, options)
    out, stats, coef, grad_x, grad_q = cross_entropy_forward(
        x, target, weight, params, need[0], need[1]
    )
    return (
        out,
        stats,
        coef,
        x.new_empty(0) if grad_x is None else grad_x,  # operators cannot return None
        target.new_empty(0) if grad_q is None else grad_q,
    )


@_cross_entropy_fwd_op.register_fake
def _(x, target, weight, reduction, impl, options, need):
    rows, cdtype = x.shape[0], compute_dtype(x.dtype)
    scalar = policy.grad_in_forward(reduction, x.dtype)
    return (
        x.new_empty(() if scalar else (rows,)),
        x.new_empty((2, rows), dtype=cdtype),  # (m, log s)
        x.new_empty((rows,), dtype=cdtype),
        x.new_empty(x.shape if scalar and need[0] else (0,)),
        target.new_empty(target.shape if scalar and need[1] else (0,)),
    )


@torch.library.custom_op("xent::cross_entropy_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _cross_entropy_bwd_op(x, target, weight, stats, coef, reduction, impl, options, need):
    params = CEParams.from_options(reduction, impl, options)
    grad_x = torch.empty_like(x) if need[0] else x.new_empty(0)
    grad_q = torch.empty_like(target) if need[1] else x.new_empty(0)
    grads = (grad_x if need[0] else None, grad_q if need[1] else None)
    cross_entropy_backward_pass(x, target, weight, coef, params, grads, stats)
    return grad_x, grad_q


@_cross_entropy_bwd_op.register_fake
def _(x, target, weight, stats, coef, reduction, impl, options, need):
    return (
        torch.empty_like(x) if need[0] else x.new_empty(0),
        torch.empty_like(target) if need[1] else x.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, target, weight, reduction, impl, options, need = inputs
    _, stats, coef, grad_x, grad_q = output
    ctx.save_for_backward(x, target, weight, stats, coef, grad_x, grad_q)
    ctx.reduction, ctx.impl, ctx.options, ctx.need = reduction, impl, options, need


def _fwd_backward(ctx, grad_out, *_unused):
    x, target, weight, stats, coef, grad_x, grad_q = ctx.saved_tensors
    need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_w = None
    if ctx.needs_input_grad[2]:  # probability targets: plain operations beside the operators
        params = CEParams.from_options(ctx.reduction, ctx.impl, ctx.options)
        g = grad_out.to(coef.dtype)
        c = coef * (g.reshape(-1) if ctx.reduction == "none" else g)
        grad_w = class_weight_grad(x, target, weight, c, params)
    if policy.grad_in_forward(ctx.reduction, x.dtype):  # formed in the forward: scale
        g = grad_out.to(coef.dtype)
        return (
            (grad_x * g).to(x.dtype) if need_x else None,
            (grad_q * g).to(target.dtype) if need_q else None,
            grad_w,
            None,
            None,
            None,
            None,
        )
    grad_x, grad_q = torch.ops.xent.cross_entropy_bwd(
        x,
        target,
        weight,
        stats,
        coef * grad_out.to(coef.dtype),
        ctx.reduction,
        ctx.impl,
        ctx.options,
        [need_x, need_q],
    )
    return grad_x if need_x else None, grad_q if need_q else None, grad_w, None, None, None, None


torch.library.register_autograd(
    "xent::cross_entropy_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


def cross_entropy_compiled(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: CEParams
) -> torch.Tensor:
    need = [x.requires_grad, target.requires_grad]
    return torch.ops.xent.cross_entropy_fwd(
        x, target, weight, params.reduction, params.impl, params.options(), need
    )[0]


def cross_entropy_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: CEParams,
    *,
    inplace: bool = False,
    parallel: VocabParallel | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``(M, C)`` logits (the entry point of the public functions).

    Under ``torch.func`` transforms it runs :class:`CrossEntropyFuncFn` (pure tensor
    operations, batched by ``vmap``; ``inplace`` is then ignored); under ``torch.compile`` the
    computation appears as opaque custom operators (above); otherwise it runs
    :class:`CrossEntropyFn`.
    """
    if policy.under_transforms() and parallel is None:
        if target.dim() == 1:  # on the values beneath the wrappers
            check_target_range(target, x.shape[1], params.ignore_index)
        return CrossEntropyFuncFn.apply(x, target, weight, params)
    if torch.compiler.is_compiling() and parallel is None:
        return cross_entropy_compiled(x, target, weight, params)
    grad_on = torch.is_grad_enabled()
    # ∂L/∂w (probability targets) is formed from the logits in backward: keep them.
    weight_grad = weight is not None and weight.requires_grad
    inplace = inplace and grad_on and not weight_grad and policy.gradient_into_logits(x)
    return CrossEntropyFn.apply(x, target, weight, params, inplace, grad_on, parallel)


# --------------------------------------------------------------------------------------------
# Linear cross-entropy
# --------------------------------------------------------------------------------------------
# The walker reads the host (which tokens are ignored, the target range on the CPU) and loops
# over chunks; as operators it is one node per pass, with shapes that follow the batch size
# symbolically (``dynamic=True``). The target is class indices or, floating, probabilities;
# the options list is CEParams.options() + [tokens per chunk, a numeric normalizer] (0: none).

_LINEAR_FWD_SCHEMA = (
    "(Tensor x, Tensor w, Tensor? b, Tensor target, Tensor? class_weight,"
    " Tensor? token_weight, Tensor? normalizer, str reduction, str impl, float[] options,"
    " bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LINEAR_BWD_SCHEMA = (
    "(Tensor x, Tensor w, Tensor? b, Tensor target, Tensor? class_weight, Tensor stats,"
    " Tensor coef, str reduction, str impl, float[] options, bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)


def _linear_opts(target, class_weight, token_weight, normalizer, reduction, impl, options):
    ce = CEParams.from_options(reduction, impl, list(options[:5]))
    chunk, norm_value = int(options[5]) or None, options[6] or None
    return LinearOptions(
        ce,
        None if target.is_floating_point() else target,
        class_weight,
        token_weight,
        normalizer if normalizer is not None else norm_value,
        chunk,
    ), (target if target.is_floating_point() else None)


def _grad_or_empty(grad, like, dtype, shape, wanted):
    """The gradient, or an empty stand-in (operators cannot return None): same dtype both ways."""
    if wanted:
        return like.new_empty(shape, dtype=dtype) if grad is None else grad
    return like.new_empty(0, dtype=dtype)


def _linear_fwd_shapes(x, w, b, target, reduction, need):
    scalar, cdtype = reduction != "none", compute_dtype(x.dtype)
    pairs = x.shape[0] * (1 if w.dim() == 2 else w.shape[1])
    want = [scalar and need[0], scalar and need[1], scalar and need[2] and b is not None]
    want.append(scalar and need[3] and target.is_floating_point())
    return scalar, cdtype, pairs, want


@torch.library.custom_op(
    "xent::linear_cross_entropy_fwd", mutates_args=(), schema=_LINEAR_FWD_SCHEMA
)
def _linear_fwd_op(
    x, w, b, target, class_weight, token_weight, normalizer, reduction, impl, options, need
):
    opts, q = _linear_opts(target, class_weight, token_weight, normalizer, reduction, impl, options)
    _, cdtype, _, want = _linear_fwd_shapes(x, w, b, target, reduction, need)
    out, stats, coef, grads = linear_ce_forward(x, w, b, q, opts, want)
    gx, gw, gb, gq = grads
    return (
        out,
        stats,
        coef,
        _grad_or_empty(gx, x, cdtype, x.shape, want[0]),
        _grad_or_empty(gw, w, cdtype, w.shape, want[1]),
        _grad_or_empty(gb, w, cdtype, (0,) if b is None else b.shape, want[2]),
        _grad_or_empty(gq, target, target.dtype, target.shape, want[3]),
    )


@_linear_fwd_op.register_fake
def _(x, w, b, target, class_weight, token_weight, normalizer, reduction, impl, options, need):
    scalar, cdtype, pairs, want = _linear_fwd_shapes(x, w, b, target, reduction, need)
    return (
        x.new_empty(() if scalar else (pairs,), dtype=cdtype),
        x.new_empty((2, pairs), dtype=cdtype),  # each pair's max m and log s
        x.new_empty((pairs,), dtype=cdtype),
        _grad_or_empty(None, x, cdtype, x.shape, want[0]),
        _grad_or_empty(None, w, cdtype, w.shape, want[1]),
        _grad_or_empty(None, w, cdtype, (0,) if b is None else b.shape, want[2]),
        _grad_or_empty(None, target, target.dtype, target.shape, want[3]),
    )


def _linear_bwd_want(b, target, need):
    return [need[0], need[1], need[2] and b is not None, need[3] and target.is_floating_point()]


@torch.library.custom_op(
    "xent::linear_cross_entropy_bwd", mutates_args=(), schema=_LINEAR_BWD_SCHEMA
)
def _linear_bwd_op(x, w, b, target, class_weight, stats, coef, reduction, impl, options, need):
    opts, q = _linear_opts(target, class_weight, None, None, reduction, impl, options)
    want = _linear_bwd_want(b, target, need)
    cdtype = compute_dtype(x.dtype)
    gx, gw, gb, gq = linear_ce_backward(x, w, b, q, opts, coef, stats, want)
    return (
        _grad_or_empty(gx, x, cdtype, x.shape, want[0]),
        _grad_or_empty(gw, w, cdtype, w.shape, want[1]),
        _grad_or_empty(gb, w, cdtype, (0,) if b is None else b.shape, want[2]),
        _grad_or_empty(gq, target, target.dtype, target.shape, want[3]),
    )


@_linear_bwd_op.register_fake
def _(x, w, b, target, class_weight, stats, coef, reduction, impl, options, need):
    want = _linear_bwd_want(b, target, need)
    cdtype = compute_dtype(x.dtype)
    return (
        _grad_or_empty(None, x, cdtype, x.shape, want[0]),
        _grad_or_empty(None, w, cdtype, w.shape, want[1]),
        _grad_or_empty(None, w, cdtype, (0,) if b is None else b.shape, want[2]),
        _grad_or_empty(None, target, target.dtype, target.shape, want[3]),
    )


def _linear_setup_context(ctx, inputs, output):
    x, w, b, target, class_weight, _tw, _norm, reduction, impl, options, _need = inputs
    _, stats, coef, gx, gw, gb, gq = output
    ctx.save_for_backward(x, w, b, target, class_weight, stats, coef, gx, gw, gb, gq)
    ctx.reduction, ctx.impl, ctx.options = reduction, impl, options


def _linear_backward(ctx, grad_out, *_unused):
    x, w, b, target, class_weight, stats, coef, gx, gw, gb, gq = ctx.saved_tensors
    likes = (x, w, b, target)
    need = [bool(ctx.needs_input_grad[i]) for i in range(4)]
    want = _linear_bwd_want(b, target, need)
    g = grad_out.to(coef.dtype)
    if ctx.reduction != "none":  # formed in the forward: scale
        grads = (gx, gw, gb, gq)
    else:
        grads = torch.ops.xent.linear_cross_entropy_bwd(
            x,
            w,
            b,
            target,
            class_weight,
            stats,
            coef * g,
            ctx.reduction,
            ctx.impl,
            ctx.options,
            need,
        )
    out = []
    for grad, like, wanted in zip(grads, likes, want, strict=True):
        if not wanted:
            out.append(None)
        elif ctx.reduction != "none":
            out.append((grad * g).to(like.dtype))
        else:
            out.append(grad.to(like.dtype))
    return (*out, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "xent::linear_cross_entropy_fwd", _linear_backward, setup_context=_linear_setup_context
)


def linear_cross_entropy_compiled(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    q: torch.Tensor | None,
    opts: LinearOptions,
) -> torch.Tensor:
    """:class:`LinearCrossEntropyFn` as the operators above (under ``torch.compile``)."""
    grad_on = torch.is_grad_enabled()
    target = q if q is not None else opts.target
    need = [
        grad_on and x.requires_grad,
        grad_on and w.requires_grad,
        grad_on and b is not None and b.requires_grad,
        grad_on and q is not None and q.requires_grad,
    ]
    norm = opts.normalizer
    options = [
        *opts.ce.options(),
        float(opts.chunk_tokens or 0),
        0.0 if norm is None or isinstance(norm, torch.Tensor) else float(norm),
    ]
    out = torch.ops.xent.linear_cross_entropy_fwd(
        x,
        w,
        b,
        target,
        opts.class_weight,
        opts.token_weight,
        norm if isinstance(norm, torch.Tensor) else None,
        opts.ce.reduction,
        opts.ce.impl,
        options,
        need,
    )[0]
    return out.to(opts.out_dtype or x.dtype)
