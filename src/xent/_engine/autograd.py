"""The autograd Functions of the engine: cross-entropy on logits, NLL, and losses on hidden states.

Each Function calls a row kernel (:mod:`xent._engine.rows`) directly on the logits, or through the
chunk walker (:mod:`xent._engine.walker`) on hidden states. For scalar losses the forward pass
already forms the gradient and backward only scales it; for ``reduction="none"`` the forward
keeps the per-row statistics ``(m, log s)`` (the row max and ``log Σ_c e^{z_c - m}``, stacked
as one ``(2, M)`` tensor) and backward recomputes from them. A second backward through a
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
from xent._engine.walker import linear_walk, tokens_per_chunk
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


def _log_softmax(
    x: torch.Tensor, params: CEParams
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, tanh(x/s), m, log s, log p)`` of ``(M, C)`` logits in the compute dtype, in
    differentiable operations: ``z = s tanh(x/s)`` under a soft cap (else ``z = x``), the row
    max ``m``, ``log s = log Σ_c e^{z_c - m}`` and ``log p = (z - m) - log s`` (``(M, 1)``
    statistics)."""
    xc = x.to(compute_dtype(x.dtype))
    t = None
    if params.softcap is not None:
        t = torch.tanh(xc / params.softcap)
        z = params.softcap * t
    else:
        z = xc
    m = stable_max(z, 1)
    shifted = z - m  # relative to the max: log p never subtracts lse from a logit
    log_s = shifted.exp().sum(dim=1, keepdim=True).log()
    return xc, t, m, log_s, shifted - log_s


def class_weight_terms(x: torch.Tensor, q: torch.Tensor, params: CEParams) -> torch.Tensor:
    """``D_ic = ∂l_i/∂w_c = -q'_ic log p_ic`` for probability targets, ``(M, C)`` in the
    compute dtype, differentiable again.

    With probability targets the row loss is ``l_i = -Σ_c w_c q'_ic log p_ic`` plus a z-loss
    ``ζ lse_i²`` that holds no weight, where ``q' = (1 - ε) q + ε/C`` and ``p = softmax(z_i)``
    depends on the logits alone; it is linear in ``w``, so ``∂l_i/∂w_c = -q'_ic log p_ic``.
    The row coefficients ``c_i = ∂L/∂l_i`` do not depend on ``w`` either (a mean over
    probability targets divides by ``M``, not by a sum of weights), hence
    ``∂L/∂w_c = Σ_i c_i D_ic``: one column sum of the terms, in closed form.
    """
    log_p = _log_softmax(x, params)[4]
    qc = q.to(log_p.dtype)
    eps = params.label_smoothing
    qc = qc if eps == 0.0 else (1.0 - eps) * qc + eps / qc.shape[1]
    return -qc * log_p


def class_weight_grad(
    x: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, coef: torch.Tensor, params: CEParams
) -> torch.Tensor:
    """``∂L/∂w = Σ_i c_i D_i`` (:func:`class_weight_terms`) in ``weight``'s dtype, ``(C)``."""
    terms = class_weight_terms(x, q, params)
    return (coef[:, None].to(terms.dtype) * terms).sum(0).to(weight.dtype)


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
    xc, t, m, log_s, log_p = _log_softmax(x, params)
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
        a = torch.zeros_like(log_p).scatter(1, safe[:, None], -(1.0 - eps) * c * w_y[:, None])
        if eps > 0.0:
            ones = torch.ones_like(log_p[:1])
            a = a - (eps / log_p.shape[1]) * c * (ones if w is None else w[None, :])
    p = log_p.exp()
    grad = a - p * a.sum(dim=1, keepdim=True)
    if params.z_loss != 0.0:
        grad = grad + 2.0 * params.z_loss * c * (m + log_s) * p  # lse = m + log s
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
    """``(loss, stats, c, ∂L/∂x, ∂L/∂q)``; the gradients only for scalar losses (else None).

    ``stats`` is ``(2, M)``: each row's max ``m`` and ``log s`` (``lse = m + log s``)."""
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
    loss, m, log_s = rows(x, slice(None), grad_x)
    out = reduce_rows(loss, params.reduction, denom)
    return out.to(x.dtype), torch.stack((m, log_s)), coef, grad_x, grad_q


def cross_entropy_backward_pass(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    coef: torch.Tensor,
    params: CEParams,
    grads: tuple[torch.Tensor | None, torch.Tensor | None],
    stats: torch.Tensor | None = None,
    parallel: VocabParallel | None = None,
) -> None:
    """Write ``c_i ∂l_i/∂(x, q)`` into ``grads``: from the saved ``(2, M)`` statistics
    ``(m, log s)`` ("none", fp16), or by the forward's own arithmetic (a second backward of a
    scalar loss)."""
    rows = CrossEntropyRows(
        params,
        target,
        weight,
        coef,
        stats=None if stats is None else (stats[0], stats[1]),
        grad_target=grads[1],
        parallel=parallel,
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
        out, stats, coef, grad_x, grad_q = cross_entropy_forward(
            x, target, weight, params, need_x, need_q, inplace, parallel
        )
        ctx.params, ctx.inplace = params, bool(inplace and grad_x is not None)
        if ctx.inplace:  # the logits now hold their gradient: an earlier saver must notice
            torch.autograd.graph.increment_version(x)
        ctx.parallel, ctx.grads = parallel, (grad_x, grad_q)
        ctx.save_for_backward(None if ctx.inplace else x, target, weight, coef, stats)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, target, weight, coef, stats = ctx.saved_tensors
        params: CEParams = ctx.params
        need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_output.to(coef.dtype)
        none = params.reduction == "none"
        grad_w = None
        if ctx.needs_input_grad[2]:  # probability targets only (the public functions check)
            if x is None:
                raise RuntimeError(policy.INPLACE_CONSUMED)
            grad_w = class_weight_grad(
                x, target, weight, coef * (g.reshape(-1) if none else g), params
            )
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
            return (grad_x if need_x else None), grad_q, grad_w, None, None, None, None
        dtype = target.dtype if x is None else x.dtype
        if not policy.grad_in_forward(params.reduction, dtype):
            # Only the statistics (m, log s) were kept ("none", or fp16 logits): one more pass
            # forms c_i g_i ∂l_i/∂x from them, the upstream factor applied before any rounding.
            grads = _empty_grads(x, target, need_x, need_q)
            c = coef * (g.reshape(-1) if none else g)
            cross_entropy_backward_pass(x, target, weight, c, params, grads, stats, ctx.parallel)
            return grads[0], grads[1], grad_w, None, None, None, None
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
        return grad_x, grad_q, grad_w, None, None, None, None


def _func_coefficients(target, weight, params: CEParams, dtype) -> torch.Tensor:
    return row_coefficients(
        target,
        reduction=params.reduction,
        dtype=dtype,
        ignore_index=params.ignore_index,
        class_weight=weight,
    )[1]


class CrossEntropyFuncFn(torch.autograd.Function):
    """:class:`CrossEntropyFn` under ``torch.func`` transforms: the same loss and closed-form
    gradient in pure tensor operations.

    The one-pass kernel writes its gradient into buffers during the forward pass, which a
    batched (``vmap``) or dual (``jvp``) tensor cannot receive. Here the forward forms only the
    loss (:func:`xent.reference.cross_entropy_per_row`, plain operations); backward forms
    ``Σ_i c_i g_i ∂l_i/∂(x, q)`` by :func:`_closed_form_grad`, differentiable again, and
    ``jvp`` contracts the same gradient with the tangents: ``⟨∂L/∂x, ẋ⟩ + ⟨∂L/∂q, q̇⟩``
    (per row for ``"none"``, whose row ``i`` of ``∂l/∂x`` is ``∂l_i/∂x_i``). With no host reads
    and no in-place writes, ``vmap`` batches all three by running them on batched tensors
    (``generate_vmap_rule``): one call over the whole batch, no per-sample loop.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, weight, params: CEParams):
        from xent.reference import cross_entropy_per_row

        per_row = cross_entropy_per_row(
            x,
            target,
            weight,
            params.ignore_index,
            params.label_smoothing,
            params.z_loss,
            params.softcap,
        )
        _, _, denom = row_coefficients(
            target,
            reduction=params.reduction,
            dtype=per_row.dtype,
            ignore_index=params.ignore_index,
            class_weight=weight,
        )
        return reduce_rows(per_row, params.reduction, denom).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, params = inputs
        ctx.save_for_backward(x, target, weight)
        ctx.save_for_forward(x, target, weight)
        ctx.params = params

    @staticmethod
    def backward(ctx, grad_output):
        x, target, weight = ctx.saved_tensors
        params: CEParams = ctx.params
        coef = _func_coefficients(target, weight, params, compute_dtype(x.dtype))
        g = grad_output.to(coef.dtype)
        c = coef * (g.reshape(-1) if params.reduction == "none" else g)
        need_x, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_q = _closed_form_grad(x, target, weight, c, params, need_q)
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = class_weight_grad(x, target, weight, c, params)
        return (grad_x if need_x else None), grad_q, grad_w, None

    @staticmethod
    def jvp(ctx, x_t, q_t, w_t, *_):
        x, target, weight = ctx.saved_tensors
        params: CEParams = ctx.params
        coef = _func_coefficients(target, weight, params, compute_dtype(x.dtype))
        grad_x, grad_q = _closed_form_grad(x, target, weight, coef, params, q_t is not None)
        dims = 1 if params.reduction == "none" else (0, 1)
        out = torch.zeros_like(coef if params.reduction == "none" else coef[:0].sum())
        if x_t is not None:
            out = out + (grad_x.to(coef.dtype) * x_t.to(coef.dtype)).sum(dims)
        if q_t is not None:
            out = out + (grad_q.to(coef.dtype) * q_t.to(coef.dtype)).sum(dims)
        if w_t is not None and target.dim() == 2:
            # Probability targets only: ⟨∂L/∂w, ẇ⟩ = Σ_c (Σ_i c_i D_ic) ẇ_c.
            terms = coef[:, None] * class_weight_terms(x, target, params)
            out = out + (terms * w_t.to(terms.dtype)[None, :]).sum(dims)
        return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Negative log-likelihood
# --------------------------------------------------------------------------------------------


def _nll_rows(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: CEParams):
    """``(L, c)``: the reduced loss ``L = reduce(-w_y x_y)`` (0 on ignored rows) in the compute
    dtype and the coefficients ``c_i = ∂L/∂l_i``. Linear in ``x``, so applied to a tangent it is
    also the forward-mode derivative."""
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
    return reduce_rows(loss, params.reduction, denominator), coef


class NLLFn(torch.autograd.Function):
    """``l = -w_y · x_y`` for ``(M, C)`` log-probabilities ``x`` and ``(M)`` targets.

    Pure tensor operations without host reads, so ``torch.func``'s ``vmap`` batches it by
    running them on batched tensors (``generate_vmap_rule``); ``jvp`` is the loss of the tangent.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, weight, params: CEParams):
        return _nll_rows(x, target, weight, params)[0].to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, params = inputs
        ctx.save_for_backward(target, weight)
        ctx.save_for_forward(target, weight)
        ctx.shape_dtype = (x.shape, x.dtype, compute_dtype(x.dtype))
        ctx.params = params

    @staticmethod
    def backward(ctx, grad_output):
        # ∂l/∂x_j = -w_y [j = y]: one entry per row, scaled by c_i g. The loss is linear in x,
        # so this gradient does not depend on x and the second derivative is zero.
        target, weight = ctx.saved_tensors
        shape, dtype, cdtype = ctx.shape_dtype
        params: CEParams = ctx.params
        w = None if weight is None else weight.to(device=target.device, dtype=cdtype)
        _, coef, _ = row_coefficients(
            target,
            reduction=params.reduction,
            dtype=cdtype,
            ignore_index=params.ignore_index,
            class_weight=w,
        )
        _, safe, w_y = target_weights(target, w, params.ignore_index, cdtype)
        g = grad_output.to(cdtype)
        scale = coef * (g.reshape(-1) if params.reduction == "none" else g)
        grad = torch.zeros(shape, dtype=cdtype, device=target.device)
        grad = grad.scatter(1, safe[:, None], (-scale * w_y)[:, None])
        return grad.to(dtype), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        target, weight = ctx.saved_tensors
        return _nll_rows(x_t, target, weight, ctx.params)[0].to(ctx.shape_dtype[1])


# --------------------------------------------------------------------------------------------
# Cross-entropy on hidden states
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearOptions:
    """Options of one linear cross-entropy call and its non-differentiable tensors.

    They travel through autograd as one object, so backward returns only the gradients of the
    input, the weight, the bias and a probability target. ``target`` is ``(N)`` or, for a
    ``(V, P, H)`` weight (``P`` positions of a K-dimensional loss), ``(N, P)`` class indices;
    None when the target is probabilities (then they are the Function's ``q`` input).
    ``out_dtype`` is the loss's dtype (None: the input's).
    """

    ce: CEParams
    target: torch.Tensor | None
    class_weight: torch.Tensor | None = None
    token_weight: torch.Tensor | None = None
    normalizer: torch.Tensor | float | None = None
    chunk_tokens: int | None = None
    parallel: VocabParallel | None = None
    out_dtype: torch.dtype | None = None


def _heads(w: torch.Tensor) -> int:
    """``P``: how many positions a ``(V, P, H)`` weight has (1 for ``(V, H)``)."""
    return 1 if w.dim() == 2 else w.shape[1]


def linear_ce_coefficients(
    opts: LinearOptions, q: torch.Tensor | None, num_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(t, c, D)`` over the ``N·P`` (token, position) pairs, n-major (see
    :func:`row_coefficients`). Probability targets: ``t`` the token weight (else 1), ``D`` the
    normalizer, else the pair count."""
    ce = opts.ce
    if q is None:
        assert opts.target is not None
        return row_coefficients(
            opts.target.reshape(-1),
            reduction=ce.reduction,
            dtype=dtype,
            ignore_index=ce.ignore_index,
            class_weight=opts.class_weight,
            token_weight=opts.token_weight,
            normalizer=opts.normalizer,
        )
    device = q.device
    tw = opts.token_weight
    t = (
        torch.ones(num_tokens, dtype=dtype, device=device)
        if tw is None
        else tw.reshape(-1).to(device=device, dtype=dtype)
    )
    if ce.reduction != "mean":
        return t, t, None
    norm = opts.normalizer
    if isinstance(norm, torch.Tensor):
        denom = norm.to(device=device, dtype=dtype).reshape(())
    else:
        denom = torch.full(
            (), float(num_tokens if norm is None else norm), dtype=dtype, device=device
        )
    return t, t / denom, denom


def _linear_ce_walk(
    x, w, b, opts: LinearOptions, q, coef, need, stats=None, skip=None, grad_q=None
):
    """One walk per position of the weight; ``(loss, m, log s)`` over the ``N·P`` pairs (n-major;
    ``stats``, when given, is their ``(2, N·P)`` stack)
    and ``(∂x, ∂w, ∂b)`` in the compute dtype; ``grad_q`` (``q``'s shape) is written."""
    heads = _heads(w)
    num_tokens = x.shape[0]
    need = need if coef is not None else (False, False, False)

    def per_head(p):
        def pick(t, axis):  # position p of a per-pair tensor (n-major) or of q's last axis
            if t is None or heads == 1:
                return t
            # Contiguous: the Triton row kernels index per-row tensors with unit stride.
            picked = t.reshape(num_tokens, heads)[:, p] if axis == 0 else t[..., p]
            return picked.contiguous()

        tgt = pick(q, 1) if q is not None else pick(opts.target, 1)
        gq = None if grad_q is None else (grad_q if heads == 1 else torch.empty_like(tgt))
        rows = CrossEntropyRows(
            opts.ce,
            tgt,
            opts.class_weight,
            pick(coef, 0),
            stats=None if stats is None else (pick(stats[0], 0), pick(stats[1], 0)),
            grad_target=gq,
            parallel=opts.parallel,
        )
        result = linear_walk(
            x,
            w if heads == 1 else w[:, p],
            b if b is None or heads == 1 else b[:, p],
            rows,
            num_outputs=rows.num_outputs,
            need=need,
            skip=pick(skip, 0),
            chunk_tokens=opts.chunk_tokens,
            parallel=opts.parallel,
        )
        if gq is not None and heads > 1:
            grad_q[..., p] = gq
        return result

    if heads == 1:
        return per_head(0)
    outputs, grad_x, grad_w, grad_b = per_head(0)
    per_pair = [[t] for t in outputs]
    grad_w = None if grad_w is None else _spread(grad_w, heads, 0)
    grad_b = None if grad_b is None else _spread(grad_b, heads, 0)
    for p in range(1, heads):
        outputs, gx, gw, gb = per_head(p)
        for kept, t in zip(per_pair, outputs, strict=True):
            kept.append(t)
        if grad_x is not None:
            grad_x += gx
        if grad_w is not None:
            grad_w[:, p] = gw
        if grad_b is not None:
            grad_b[:, p] = gb
    return (
        tuple(torch.stack(kept, 1).reshape(-1) for kept in per_pair),
        grad_x,
        grad_w,
        grad_b,
    )


def _spread(first: torch.Tensor, heads: int, p: int) -> torch.Tensor:
    """A ``(V, P, ...)`` buffer whose position ``p`` is ``first``."""
    out = first.new_empty((first.shape[0], heads, *first.shape[1:]))
    out[:, p] = first
    return out


def _skip_of(opts: LinearOptions) -> torch.Tensor | None:
    return None if opts.target is None else (opts.target == opts.ce.ignore_index).reshape(-1)


def linear_ce_forward(x, w, b, q, opts: LinearOptions, need):
    """The forward of linear cross-entropy on ``(N, H)`` inputs: ``(loss, stats, coef, grads)``.

    ``need`` says which of ``∂x``, ``∂w``, ``∂b``, ``∂q`` to form. For scalar losses they are
    formed here (compute dtype; ``∂q`` in ``q``'s dtype), ``c_i ∂l_i/∂·`` for an upstream
    gradient of 1; for ``"none"`` they are None and backward recomputes from ``stats``, the
    ``(2, N·P)`` stack of each row's max ``m`` and ``log s``.
    """
    ce = opts.ce
    if opts.target is not None:  # read here, inside the compiled operator too
        vocab = w.shape[0] if opts.parallel is None else opts.parallel.vocab
        check_target_range(opts.target, vocab, ce.ignore_index)
    cdtype = compute_dtype(x.dtype)
    tw, coef, denom = linear_ce_coefficients(opts, q, x.shape[0] * _heads(w), cdtype)
    scalar = ce.reduction != "none"
    grad_q = empty_buffer(tuple(q.shape), q) if scalar and q is not None and need[3] else None
    (loss, row_max, log_s), grad_x, gw, gb = _linear_ce_walk(
        x,
        w,
        b,
        opts,
        q,
        coef if scalar else None,
        tuple(need[:3]),
        skip=_skip_of(opts),
        grad_q=grad_q,
    )
    out = reduce_rows(loss * tw, ce.reduction, denom)  # tw: 0 on ignored tokens
    return out, torch.stack((row_max, log_s)), coef, (grad_x, gw, gb, grad_q)


def linear_ce_backward(x, w, b, q, opts: LinearOptions, coef, stats, need):
    """``c_i ∂l_i/∂(x, w, b, q)`` recomputed chunk by chunk: from the saved ``stats`` (``"none"``,
    ``coef`` already scaled by the upstream gradient), or, ``stats`` None, by the forward's own
    arithmetic (a second backward of a scalar loss)."""
    grad_q = empty_buffer(tuple(q.shape), q) if q is not None and need[3] else None
    _, grad_x, grad_w, grad_b = _linear_ce_walk(
        x, w, b, opts, q, coef, tuple(need[:3]), stats=stats, skip=_skip_of(opts), grad_q=grad_q
    )
    return grad_x, grad_w, grad_b, grad_q


class LinearCrossEntropyFn(torch.autograd.Function):
    """Linear + cross-entropy on ``(N, H)`` inputs, through the walker.

    The weight is ``(V, H)``, or ``(V, P, H)`` for a K-dimensional loss (``P`` positions, each
    its own softmax over ``V``). The target is class indices (in ``opts``) or probabilities
    ``q`` (``(N, V)``, or ``(N, V, P)``), fed to the row kernel chunk by chunk. Only ``x``,
    ``w``, ``b`` and ``q`` are differentiable; everything else rides in ``opts``.
    """

    @staticmethod
    def forward(ctx, x, w, b, opts: LinearOptions, q=None):
        need = (*ctx.needs_input_grad[:3], q is not None and ctx.needs_input_grad[4])
        out, stats, coef, grads = linear_ce_forward(x, w, b, q, opts, need)
        ctx.opts, ctx.grads = opts, grads
        ctx.save_for_backward(x, w, b, q, coef, stats)
        return out.to(opts.out_dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        policy.refuse_double_backward("linear_cross_entropy")
        x, w, b, q, coef, stats = ctx.saved_tensors
        opts: LinearOptions = ctx.opts
        g = grad_out.to(coef.dtype)
        scalar = opts.ce.reduction != "none"
        need = (*ctx.needs_input_grad[:3], q is not None and ctx.needs_input_grad[4])
        grads = ctx.grads
        ctx.grads = (None, None, None, None)  # hand the buffers over: no copy
        if not scalar or all(grad is None for grad in grads):
            # "none": recompute the logits chunk by chunk from the saved (m, log s). A scalar
            # loss whose buffers a first backward already consumed (retained graph) forms them
            # again by the forward's own arithmetic, so repeated backwards agree bit for bit.
            c = coef * g.reshape(-1) if not scalar else coef
            grads = linear_ce_backward(x, w, b, q, opts, c, None if scalar else stats, need)
        if scalar:
            dispatch.scale_unless_one_(grads, g, opts.ce.impl)
        grad_x, grad_w, grad_b, grad_q = in_dtypes_of(grads, (x, w, b, q))
        return grad_x, grad_w, grad_b, None, grad_q


class LinearClassWeightGradFn(torch.autograd.Function):
    """The class weights' gradient of linear cross-entropy with probability targets.

    The loss is linear in the class weights ``w``: with ``q' = (1-ε) q + ε/V`` and ``c_i`` the
    pairs' row coefficients (token weight, ``/ D`` for ``"mean"``; ``D`` does not depend on
    ``w`` for probabilities), ``l_i = c_i Σ_v w_v q'_iv (lse(z_i) − z_iv) + (terms free of
    w)``, so

    .. math:: ∂L/∂w_v = Σ_i g_i c_i q'_iv (\\operatorname{lse}(z_i) − z_iv),

    the terms of :func:`class_weight_terms` (the same as on logits), chunk by chunk.

    The forward returns zeros of the loss's shape (added to the loss, it changes nothing);
    backward forms that sum chunk by chunk from recomputed logits (never all ``N × V`` at
    once) and gives no gradient to the other inputs, whose gradients the fused Function
    already carries. Tensors: ``x (N, H)``, ``w (V, H)`` or ``(V, P, H)``, ``b``, ``q (N, V)``
    or ``(N, V, P)``.
    """

    @staticmethod
    def forward(ctx, class_weight, x, w, b, q, opts: LinearOptions):
        ctx.opts = opts
        ctx.save_for_backward(class_weight, x, w, b, q)
        heads = _heads(w)
        shape = () if opts.ce.reduction != "none" else (x.shape[0] * heads,)
        return x.new_zeros(shape, dtype=opts.out_dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        policy.refuse_double_backward("linear_cross_entropy")
        class_weight, x, w, b, q = ctx.saved_tensors
        opts: LinearOptions = ctx.opts
        ce = opts.ce
        cdtype = compute_dtype(x.dtype)
        vocab, heads, num_tokens = w.shape[0], _heads(w), x.shape[0]
        _, coef, _ = linear_ce_coefficients(opts, q, num_tokens * heads, cdtype)
        g = coef * grad_out.to(cdtype).reshape(-1)  # (N·P), n-major
        w3 = w.reshape(vocab * heads, x.shape[1]).to(cdtype)
        b3 = None if b is None else b.reshape(vocab, heads).to(cdtype)
        grad = torch.zeros(vocab, dtype=cdtype, device=x.device)
        step = opts.chunk_tokens or tokens_per_chunk(vocab * heads, x.device, 4)
        for start in range(0, num_tokens, step):
            stop = min(start + step, num_tokens)
            z = (x[start:stop].to(cdtype) @ w3.t()).reshape(-1, vocab, heads)
            if b3 is not None:
                z = z + b3
            # (token, position) pairs as rows, n-major like g; class_weight_terms applies the
            # soft cap and smoothing and forms log p relative to the row max.
            rows = z.transpose(1, 2).reshape(-1, vocab)
            qs = q[start:stop].reshape(-1, vocab, heads).transpose(1, 2).reshape(-1, vocab)
            terms = class_weight_terms(rows, qs, ce)
            grad += (g[start * heads : stop * heads, None] * terms).sum(0)
        return grad.to(class_weight.dtype), None, None, None, None, None


@dataclass(frozen=True)
class LinearCrossEntropySpec:
    """Linear + cross-entropy under ``torch.func`` transforms (:mod:`xent._engine.transforms`).

    The tensors are ``(x, w, b, target, class_weight, token_weight, normalizer)`` (None where
    not given; a number normalizer rides here). Same row kernel and walker as
    :class:`LinearCrossEntropyFn`; the forward forms no gradient, the backward walks again.
    Forward mode: with ``c_i`` the loss's row coefficients, ``L̇ = Σ_i c_i Σ_v (p_iv − q_iv)
    ż_iv`` (``∂l_i/∂z_i`` as the row kernel writes it, soft-cap, smoothing and z-loss included)
    and ``ż = ẋWᵀ + xẆᵀ + ḃ``, chunk by chunk; ``"none"`` keeps the per-row terms.
    """

    ce: CEParams
    chunk_tokens: int | None
    normalizer: float | None
    name = "linear_cross_entropy"
    num_diff = 3

    def _setup(self, t):
        x, _, _, target, class_weight, token_weight, norm = t
        opts = LinearOptions(
            self.ce,
            target,
            class_weight,
            token_weight,
            self.normalizer if norm is None else norm,
            self.chunk_tokens,
        )
        tw, coef, denom = row_coefficients(
            target,
            reduction=self.ce.reduction,
            dtype=compute_dtype(x.dtype),
            ignore_index=self.ce.ignore_index,
            class_weight=class_weight,
            token_weight=token_weight,
            normalizer=opts.normalizer,
        )
        return opts, tw, coef, denom, target == self.ce.ignore_index

    def row_inputs(self, t):
        if self.ce.reduction != "none":
            return None
        return (True, False, False, True, False, True, False)

    def value(self, t):
        from xent._validation import check_target_range  # values are readable here

        x, w, b, target = t[:4]
        check_target_range(target, w.shape[0], self.ce.ignore_index)
        opts, tw, _, denom, skip = self._setup(t)
        (loss, *_), *_ = _linear_ce_walk(x, w, b, opts, None, None, (False,) * 3, skip=skip)
        return (reduce_rows(loss * tw, self.ce.reduction, denom).to(x.dtype),)

    def vjp(self, t, grads, need):
        x, w, b = t[:3]
        opts, _, coef, _, skip = self._setup(t)
        g = grads[0].to(coef.dtype)
        c = coef * (g.reshape(-1) if self.ce.reduction == "none" else g)
        _, gx, gw, gb = _linear_ce_walk(x, w, b, opts, None, c, need, skip=skip)
        return in_dtypes_of((gx, gw, gb), (x, w, b))

    def jvp(self, t, tangents):
        from xent._engine.transforms import HeadTangentRows

        x, w, b = t[:3]
        opts, _, coef, _, skip = self._setup(t)
        rows = CrossEntropyRows(opts.ce, opts.target, opts.class_weight, coef)
        kernel = HeadTangentRows(rows, rows.num_outputs, x, w, *tangents)
        outputs, *_ = linear_walk(
            x, w, b, kernel, num_outputs=kernel.num_outputs, skip=skip,
            chunk_tokens=self.chunk_tokens,
        )  # fmt: skip
        per_row = outputs[-1]
        return ((per_row if self.ce.reduction == "none" else per_row.sum()).to(x.dtype),)
