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
    cross_entropy_backward_pass,
    cross_entropy_forward,
)
from xent._engine.options import CEParams
from xent._numerics import compute_dtype

if TYPE_CHECKING:
    from xent._engine.parallel import VocabParallel

_FWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, str reduction, str impl, float[] options,"
    " bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor x, Tensor target, Tensor? weight, Tensor lse, Tensor coef, str reduction,"
    " str impl, float[] options, bool[] need) -> (Tensor, Tensor)"
)


@torch.library.custom_op("xent::cross_entropy_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _cross_entropy_fwd_op(x, target, weight, reduction, impl, options, need):
    params = CEParams.from_options(reduction, impl, options)
    out, lse, coef, grad_x, grad_q = cross_entropy_forward(
        x, target, weight, params, need[0], need[1]
    )
    return (
        out,
        lse,
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
        x.new_empty((rows,), dtype=cdtype),
        x.new_empty((rows,), dtype=cdtype),
        x.new_empty(x.shape if scalar and need[0] else (0,)),
        target.new_empty(target.shape if scalar and need[1] else (0,)),
    )


@torch.library.custom_op("xent::cross_entropy_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _cross_entropy_bwd_op(x, target, weight, lse, coef, reduction, impl, options, need):
    params = CEParams.from_options(reduction, impl, options)
    grad_x = torch.empty_like(x) if need[0] else x.new_empty(0)
    grad_q = torch.empty_like(target) if need[1] else x.new_empty(0)
    grads = (grad_x if need[0] else None, grad_q if need[1] else None)
    cross_entropy_backward_pass(x, target, weight, coef, params, grads, lse)
    return grad_x, grad_q


@_cross_entropy_bwd_op.register_fake
def _(x, target, weight, lse, coef, reduction, impl, options, need):
    return (
        torch.empty_like(x) if need[0] else x.new_empty(0),
        torch.empty_like(target) if need[1] else x.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, target, weight, reduction, impl, options, need = inputs
    _, lse, coef, grad_x, grad_q = output
    ctx.save_for_backward(x, target, weight, lse, coef, grad_x, grad_q)
    ctx.reduction, ctx.impl, ctx.options, ctx.need = reduction, impl, options, need


def _fwd_backward(ctx, grad_out, *_unused):
    x, target, weight, lse, coef, grad_x, grad_q = ctx.saved_tensors
    need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if policy.grad_in_forward(ctx.reduction, x.dtype):  # formed in the forward: scale
        g = grad_out.to(coef.dtype)
        return (
            (grad_x * g).to(x.dtype) if need_x else None,
            (grad_q * g).to(target.dtype) if need_q else None,
            None,
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
        ctx.impl,
        ctx.options,
        [need_x, need_q],
    )
    return grad_x if need_x else None, grad_q if need_q else None, None, None, None, None, None


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

    Under ``torch.compile`` the computation appears as opaque custom operators
    (above); otherwise it runs :class:`CrossEntropyFn`.
    """
    if torch.compiler.is_compiling() and parallel is None:
        return cross_entropy_compiled(x, target, weight, params)
    grad_on = torch.is_grad_enabled()
    inplace = inplace and grad_on and policy.gradient_into_logits(x)
    return CrossEntropyFn.apply(x, target, weight, params, inplace, grad_on, parallel)
