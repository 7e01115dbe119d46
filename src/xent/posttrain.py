"""Post-training quantities per token: log-probabilities, entropy, distillation divergences.

Reinforcement learning from rewards (GRPO, PPO, RLOO), preference training (DPO, KTO) and
distillation need, per token, the log-probability of the chosen token, often the entropy of the
tempered distribution, or a divergence between a student's and a teacher's distributions. Each
comes in two forms: on logits (``log_probs``, ``distill_divergence``) and on hidden states and the
head's weight (``linear_log_probs``, ``linear_distill_divergence``), where the ``N × V`` logits are
formed one chunk of tokens at a time and never stored.

Every logit goes through the same transform first, in this order (scale, soft cap, temperature):

.. math::

    u = \\frac{s \\tanh(a z / s)}{T} \\qquad (u = a z / T \\text{ without a cap}),

with ``a = logit_scale``, ``s = softcap`` and ``T = temperature`` (a number or one per row).
Results are fp32 whatever the input dtype (fp64 for fp64 inputs). The closed-form gradients are
derived in :mod:`xent._engine.logprob_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from xent._engine import transforms
from xent._engine.dispatch import logprob_backend as _rows
from xent._engine.dispatch import resolve, scale_unless_one_
from xent._engine.logprob_rows import log_prob_grad_rows, log_prob_rows_parallel
from xent._engine.options import DivergenceParams, LogProbParams, PolicyParams, Transform
from xent._engine.policy import grad_in_forward, refuse_double_backward
from xent._engine.walker import fp32_out_gemms, linear_walk, mm_fp32, tokens_per_chunk
from xent._numerics import (
    compute_dtype,
    host_reads_cheap,
    in_dtypes_of,
    reduce_rows,
    row_coefficients,
)
from xent._validation import (
    check_chunk_size,
    check_normalizer,
    check_reduction,
    check_target_range,
    check_tensor_args,
)

DistillReduction = Literal["none", "mean", "sum", "batchmean"]
DISTILL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


class LogProbs(NamedTuple):
    """Per-token results of :func:`log_probs` / :func:`linear_log_probs` (target's shape).

    ``log_probs``: ``log p(y)`` (fp32, ≤ 0); ``entropy``: ``H`` of the tempered distribution
    (fp32), or None unless asked for; ``top1``: whether ``y`` is the arg-max (bool), or None.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    top1: torch.Tensor | None


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _inverse_temperature(
    temperature: float | torch.Tensor, shape: torch.Size, device: torch.device, dtype: torch.dtype
) -> float | torch.Tensor:
    """``1 / T``: a number, or an ``(M)`` tensor for a per-row temperature broadcast to ``shape``.

    ``ValueError`` naming the value for a temperature ≤ 0 or not finite (on accelerators a
    device-side assert instead of a host read).
    """
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / _check_positive("temperature", temperature)
    if not temperature.is_floating_point():
        raise TypeError(
            f"temperature must be a number or a floating tensor, got {temperature.dtype}"
        )
    try:
        t = temperature.detach().to(device=device, dtype=dtype).broadcast_to(shape)
    except RuntimeError:
        raise ValueError(
            f"temperature of shape {tuple(temperature.shape)} does not broadcast to the target's "
            f"shape {tuple(shape)} (one temperature per sequence of (B, S) tokens is (B, 1))"
        ) from None
    t = t.reshape(-1)
    if transforms.active():  # torch.func: checked inside the transform (_check_inv_temp)
        return 1.0 / t
    bad = ~(torch.isfinite(t) & (t > 0))
    if host_reads_cheap(t):
        if bool(bad.any()):
            raise ValueError(f"temperature must be finite and > 0, got {t[bad][0].item()!r}")
    else:
        torch._assert_async(~bad.any(), "xent: temperature must be finite and > 0")
    return (1.0 / t).contiguous()


def _check_target(target: torch.Tensor, shape: torch.Size, vocab: int, ignore_index: int) -> None:
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        raise RuntimeError(
            f"target must be an integer tensor of class indices, got "
            f"{getattr(target, 'dtype', type(target).__name__)}"
        )
    if target.dtype == torch.bool:
        raise RuntimeError("target must hold class indices, got a bool tensor")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"target must have the input's shape without its last dimension, {tuple(shape)}, "
            f"got {tuple(target.shape)}"
        )
    if transforms.active():  # torch.func: checked inside the transform, on ordinary tensors
        return
    t = target.long()
    invalid = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if host_reads_cheap(t):
        if bool(invalid.any()):
            raise IndexError(f"Target {t[invalid].flatten()[0].item()} is out of bounds.")
    else:
        torch._assert_async(~invalid.any(), "xent: a class-index target is out of bounds")


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() == 0:
        raise TypeError(
            f"{name} must be a floating tensor of shape (..., V), got "
            f"{getattr(logits, 'dtype', type(logits).__name__)} of shape "
            f"{tuple(getattr(logits, 'shape', ()))}"
        )


def _check_head(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    _check_logits(name + "_hidden" if name else "hidden", hidden)
    prefix = f"{name}_" if name else ""
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(
            f"{prefix}weight must have shape (V, H) with H = {h} (the hidden states' last "
            f"dimension), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise RuntimeError(
            f"{prefix}hidden and {prefix}weight must have the same dtype, got {hidden.dtype} "
            f"and {weight.dtype}"
        )
    if bias is not None and (bias.dtype != hidden.dtype or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(
            f"{prefix}bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}"
        )


# --------------------------------------------------------------------------------------------
# Log-probabilities on logits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LPOpts:
    """Options and non-differentiable tensors of one log-probability call."""

    params: LogProbParams
    target: torch.Tensor  # (M) int64
    inv_temp: torch.Tensor | float  # 1/T: a number or (M)
    chunk_tokens: int | None = None
    parallel: object | None = None  # a VocabParallel: the logits are this rank's slice
    local_target: torch.Tensor | None = None  # (M) targets within the slice (parallel only)
    owned: torch.Tensor | None = None  # (M) bool: the target lies in this rank's slice

    def stats(self, x: torch.Tensor, rows=slice(None)):
        """The forward row kernel on rows ``rows`` of the call: ``(log p, H, top1, m, log s)``."""
        target, inv_t = self.target[rows], _index(self.inv_temp, rows)
        if self.parallel is not None:
            return log_prob_rows_parallel(x, target, inv_t, self.params, self.parallel)
        return _rows(self.params.impl).log_prob_rows(x, target, inv_t, self.params)

    def grad(self, x, rows, stats, ent, c_lp, c_ent, grad_out) -> None:
        """The backward row kernel: ``grad_out ← ∂(c·log p + e·H)/∂x`` for rows ``rows``, from
        their ``stats = (m, log s)`` (the row max of ``u`` and ``log Σ e^{u - m}``)."""
        inv_t = _index(self.inv_temp, rows)
        if self.parallel is not None:
            log_prob_grad_rows(
                x, self.local_target[rows], inv_t, self.params, *stats, ent, c_lp, c_ent,
                grad_out, owned=self.owned[rows],
            )  # fmt: skip
            return
        kernels = _rows(self.params.impl)
        kernels.log_prob_grad_rows(
            x, self.target[rows], inv_t, self.params, *stats, ent, c_lp, c_ent, grad_out
        )


class _LogProbs(torch.autograd.Function):
    """``(M, V)`` logits → ``(M)`` log-probabilities, entropy and top-1; only the logits are
    differentiable. Backward runs one pass over the logits from the saved row max, ``log s``
    and entropy (``log p = (u - m) - log s``, never ``u - lse``); the entropy's part of it only
    when the entropy's gradient is not None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, opts: _LPOpts):
        lp, ent, top, m, log_s = opts.stats(x)
        ctx.set_materialize_grads(False)
        ctx.opts = opts
        ctx.save_for_backward(x, m, log_s, ent)
        top = (top if top is not None else lp.new_zeros(0)) > 0.5
        ctx.mark_non_differentiable(top)
        return lp, (ent if ent is not None else lp.new_zeros(0)), top

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_top):
        if g_lp is None and g_ent is None:
            return None, None
        refuse_double_backward("log_probs")
        x, m, log_s, ent = ctx.saved_tensors
        opts: _LPOpts = ctx.opts
        c_lp, c_ent = _upstream(opts, g_lp, g_ent, m)
        grad = torch.empty_like(x)
        opts.grad(x, slice(None), (m, log_s), ent, c_lp, c_ent, grad)
        return grad, None


def _check_inv_temp(inv_t: torch.Tensor | float | None) -> None:
    """The temperature check of :func:`_inverse_temperature`, inside a ``torch.func`` transform."""
    if isinstance(inv_t, torch.Tensor):
        bad = ~(torch.isfinite(inv_t) & (inv_t > 0))
        if bool(bad.any()):
            bad_t = 1 / inv_t[bad][0].item()
            raise ValueError(f"temperature must be finite and > 0, got {bad_t!r}")


@dataclass(frozen=True)
class _LogProbsSpec:
    """:func:`log_probs` under ``torch.func`` transforms (:mod:`xent._engine.transforms`) on
    ``(x, target, inv_temp)``. Outputs ``(log p, H or (0), top1 as 0/1)``. Forward mode from
    the backward row kernel: with ``G = ∂log p_i/∂x_i`` (coefficient 1 per counted row),
    ``(log p)˙_i = Σ_v G_iv ẋ_iv``; the same with the entropy's coefficient for ``Ḣ``."""

    params: LogProbParams
    inv_temp: float | None  # a number; a per-row tensor is t[2]
    chunk_tokens: int | None = None
    name = "log_probs"
    num_diff = 1

    def opts(self, t) -> _LPOpts:
        target, inv_t = t[-2], t[-1]
        inv = self.inv_temp if inv_t is None else inv_t
        return _LPOpts(self.params, target, inv, self.chunk_tokens)

    def row_inputs(self, t):  # (x, target, inv_temp): all per token
        return (True, True, True)

    def value(self, t):
        x, target, inv_t = t[0].contiguous(), t[1], t[2]
        check_target_range(target, x.shape[-1], self.params.ignore_index)
        _check_inv_temp(inv_t)
        lp, ent, top, _, _ = self.opts(t).stats(x)
        return lp, _or_empty(ent, lp), _or_empty(top, lp)

    def vjp(self, t, grads, need):
        x = t[0].contiguous()
        opts = self.opts(t)
        _, ent, _, *stats = opts.stats(x)
        g_ent = grads[1] if self.params.entropy else None
        c_lp, c_ent = _upstream(opts, grads[0], g_ent, stats[0])
        grad = torch.empty_like(x)
        opts.grad(x, slice(None), stats, ent, c_lp, c_ent, grad)
        return (grad,)

    def jvp(self, t, tangents):
        x, (dx,) = t[0].contiguous(), tangents
        opts = self.opts(t)
        lp, ent, top, *stats = opts.stats(x)
        outs = _log_prob_tangents(opts, x, slice(None), stats, ent, lambda _: dx)
        return (*outs[:1], _or_empty(outs[1], lp), torch.zeros_like(_or_empty(top, lp)))


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(0) if t is None else t


def _log_prob_tangents(opts: _LPOpts, z, rows, stats, ent, zdot_of):
    """``((log p)˙, Ḣ or None)`` of the rows ``rows`` of logits ``z`` (``zdot_of(rows)``: their
    tangent, or None for zeros), from the backward kernel with unit coefficients and the rows'
    ``stats = (m, log s)``."""
    lse = stats[0]  # for its dtype and device only
    zdot = zdot_of(rows)
    if zdot is None:
        zero = torch.zeros(z.shape[0], dtype=lse.dtype, device=z.device)
        return zero, (zero if opts.params.entropy else None)
    one = (opts.target[rows] != opts.params.ignore_index).to(lse.dtype).contiguous()
    zero = torch.zeros_like(one)
    grad = torch.empty_like(z)
    opts.grad(z, rows, stats, None, one, None, grad)
    d_lp = (grad.to(lse.dtype) * zdot.to(lse.dtype)).sum(-1)
    if not opts.params.entropy:
        return d_lp, None
    opts.grad(z, rows, stats, ent, zero, one, grad)
    return d_lp, (grad.to(lse.dtype) * zdot.to(lse.dtype)).sum(-1)


def _upstream(
    opts: _LPOpts, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernels' coefficients: ``∂L/∂log p`` (zeros when unused) and ``∂L/∂H`` or None,
    both exactly 0 on ignored rows."""
    valid = opts.target != opts.params.ignore_index
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    c_lp = zero.expand(like.shape) if g_lp is None else torch.where(valid, g_lp.to(like.dtype), 0.0)
    c_ent = None if g_ent is None else torch.where(valid, g_ent.to(like.dtype), 0.0)
    return c_lp.contiguous(), c_ent


def _lp_result(
    lp: torch.Tensor,
    ent: torch.Tensor | None,
    top: torch.Tensor | None,
    shape: torch.Size,
    return_entropy: bool,
    return_top1: bool,
) -> torch.Tensor | LogProbs:
    lp = lp.reshape(shape)
    if not (return_entropy or return_top1):
        return lp
    return LogProbs(
        lp,
        ent.reshape(shape) if return_entropy else None,
        top.reshape(shape) if return_top1 else None,
    )


def log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_top1: bool = False,
    impl: str = "auto",
) -> torch.Tensor | LogProbs:
    """Per-token log-probability of ``target`` under ``softmax(u)``, and optionally the entropy.

    With ``u = s·tanh(a·z/s) / T`` (see the module's docstring), per token

    .. math::

        \\log p(y) = u_y - \\log\\sum_j e^{u_j} \\le 0, \\qquad
        H = \\log\\sum_j e^{u_j} - \\sum_j p_j u_j = -\\sum_j p_j \\log p_j,

    with ``0·log 0 = 0`` (no NaN at ``-inf`` logits), and ``top1 = [y = argmax_j u_j]`` (of
    tied maxima the first is the arg-max, as ``torch.argmax`` has it). Tokens whose target is
    ``ignore_index`` give 0 (and ``False``) and no gradient.

    Args:
        logits: ``(..., V)``, any floating dtype.
        target: ``(...)`` class indices.
        temperature: ``T > 0``: a number, or a tensor broadcastable to ``target``'s shape
            (``(B, 1)`` for one temperature per sequence of ``(B, S)`` targets); no gradient.
        logit_scale: ``a > 0``, multiplies the logits first.
        softcap: ``s > 0`` caps ``a·z`` to ``s·tanh(a·z/s)`` before the temperature.
        ignore_index: targets equal to it are ignored.
        return_entropy, return_top1: return a :class:`LogProbs` named tuple with these fields.
        impl: ``"auto"`` (Triton on CUDA when installed, else torch), ``"torch"``, ``"triton"``
            or ``"reference"`` (autograd through elementary operations).

    Returns:
        ``(...)`` fp32 log-probabilities (fp64 for fp64 logits), or ``LogProbs(log_probs,
        entropy, top1)`` with unrequested fields None.

    Gradients flow through the log-probabilities and, when it is used in the loss, the entropy
    (an entropy that is only logged costs no extra backward work). Equals, for fp32 logits,
    ``torch.log_softmax(u, -1).gather(-1, target[..., None])[..., 0]`` and
    ``-(u.softmax(-1) * u.log_softmax(-1)).sum(-1)``, zeroed on ignored tokens.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the equivalent PyTorch composition gives; ``vmap`` makes one call per sample
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> z = torch.log(torch.tensor([[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]]))
        >>> xent.log_probs(z, torch.tensor([1, 0]))
        tensor([-0.9163, -0.6931])
        >>> out = xent.log_probs(z, torch.tensor([1, 0]), return_entropy=True, return_top1=True)
        >>> out.entropy, out.top1
        (tensor([1.0549, 1.0397]), tensor([False,  True]))
    """
    check_tensor_args(log_probs, floating=("logits",), logits=logits, target=target)
    _check_logits("logits", logits)
    kind = resolve(impl, logits)
    vocab = logits.shape[-1]
    _check_target(target, logits.shape[:-1], vocab, ignore_index)
    scale = _check_positive("logit_scale", logit_scale)
    cap = _check_positive("softcap", softcap, allow_none=True)
    cdtype = compute_dtype(logits.dtype)
    inv_t = _inverse_temperature(temperature, target.shape, logits.device, cdtype)
    if kind == "reference":
        return log_probs_reference(
            logits,
            target,
            temperature=temperature,
            logit_scale=scale,
            softcap=cap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            return_top1=return_top1,
        )
    params = LogProbParams(
        Transform(scale, cap), int(ignore_index), bool(return_entropy), bool(return_top1), impl=kind
    )
    if transforms.active():
        tensor_t = isinstance(inv_t, torch.Tensor)
        lp, ent, top = transforms.apply(
            _LogProbsSpec(params, None if tensor_t else inv_t),
            logits.reshape(-1, vocab),
            target.reshape(-1).long(),
            inv_t if tensor_t else None,
        )
        return _lp_result(lp, ent, top > 0.5, target.shape, return_entropy, return_top1)
    x = logits.reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()
    opts = _LPOpts(params, target.reshape(-1).long(), inv_t)
    lp, ent, top = _LogProbs.apply(x, opts)
    return _lp_result(lp, ent, top, target.shape, return_entropy, return_top1)


# --------------------------------------------------------------------------------------------
# Log-probabilities from hidden states: a row kernel for the engine's chunk walker
# --------------------------------------------------------------------------------------------


def _index(t: torch.Tensor | float, rows) -> torch.Tensor | float:
    return t[rows] if isinstance(t, torch.Tensor) else t


def _lp_chunk(
    chunk: int | None, vocab: int, x: torch.Tensor, capped: bool, entropy: bool
) -> tuple[int, int]:
    """``(tokens per chunk, rows per block of the torch kernels)`` for the fused log-probabilities.

    The kernels' scratch is one chunk of fp32 in all: one chunk-sized buffer, or, for the
    entropy (whose forward holds two), blocks of half a chunk; through a cap another buffer,
    and on the tensor-core path one more for the fp32 gradient beside the bf16 one. The default
    chunk is as many tokens as the walker's budget holds with that scratch counted.
    """
    split = fp32_out_gemms(x)
    if chunk is None:
        per_logit = 4 * (2 + int(capped) + int(split)) + (2 if split else 0)
        chunk = tokens_per_chunk(vocab, x.device, per_logit, min_tokens=1)
    return chunk, max(1, chunk // 2) if entropy else chunk


class _LogProbKernel:
    """The row kernel of :func:`linear_log_probs` for the chunk walker: forward statistics
    (``grad_out`` None: returns ``log p, H, top1, m, log s``) or, built with the saved
    ``stats = (m, log s)`` and coefficients, the gradient (returns nothing)."""

    def __init__(self, opts: _LPOpts, stats=None, ent=None, c_lp=None, c_ent=None) -> None:
        self.opts, self.stats, self.ent, self.c_lp, self.c_ent = opts, stats, ent, c_lp, c_ent

    def __call__(self, z, rows, grad_out):
        o = self.opts
        if grad_out is None:
            lp, ent, top, m, log_s = o.stats(z, rows)
            zeros = torch.zeros_like(lp)
            return lp, zeros if ent is None else ent, zeros if top is None else top, m, log_s
        o.grad(
            z,
            rows,
            tuple(t[rows] for t in self.stats),
            None if self.c_ent is None else self.ent[rows],
            self.c_lp[rows],
            None if self.c_ent is None else self.c_ent[rows],
            grad_out,
        )
        return ()


class _LinearLogProbs(torch.autograd.Function):
    """``(M, H)`` hidden states and the ``(V, H)`` head → per-token log-probabilities, entropy,
    top-1. Forward walks the chunks without gradients; backward walks them again with the
    upstream coefficients and forms ``∂x``, ``∂W``, ``∂b``."""

    @staticmethod
    def forward(ctx, x, w, b, opts: _LPOpts):
        skip = opts.target == opts.params.ignore_index
        (lp, ent, top, m, log_s), *_ = linear_walk(
            x,
            w,
            b,
            _LogProbKernel(opts),
            num_outputs=5,
            skip=skip,
            chunk_tokens=opts.chunk_tokens,
            parallel=opts.parallel,
        )
        ctx.set_materialize_grads(False)
        ctx.opts, ctx.skip = opts, skip
        ctx.save_for_backward(x, w, b, m, log_s, ent)
        top = top > 0.5
        ctx.mark_non_differentiable(top)
        return lp, ent, top

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_top):
        if g_lp is None and g_ent is None:
            return None, None, None, None
        refuse_double_backward("linear_log_probs")
        x, w, b, m, log_s, ent = ctx.saved_tensors
        opts: _LPOpts = ctx.opts
        if not opts.params.entropy:
            g_ent = None
        c_lp, c_ent = _upstream(opts, g_lp, g_ent, m)
        kernel = _LogProbKernel(opts, (m, log_s), ent, c_lp, c_ent)
        _, gx, gw, gb = linear_walk(
            x,
            w,
            b,
            kernel,
            num_outputs=0,
            need=tuple(ctx.needs_input_grad[:3]),
            skip=ctx.skip,
            chunk_tokens=opts.chunk_tokens,
            parallel=opts.parallel,
        )
        return (*in_dtypes_of((gx, gw, gb), (x, w, b)), None)


class _LogProbTangentKernel:
    """Walker row kernel of :class:`_LinearLogProbsSpec`'s forward mode: per chunk the
    statistics, then ``((log p)˙, Ḣ)`` with ``ż = ẋWᵀ + xẆᵀ + ḃ`` (:func:`_log_prob_tangents`)."""

    num_outputs = 2

    def __init__(self, opts: _LPOpts, x, w, dx, dw, db) -> None:
        cdtype = compute_dtype(x.dtype)
        self.opts = opts
        self.zdot_of = lambda rows: transforms.head_tangent(rows, x, w, dx, dw, db, cdtype)

    def __call__(self, z, rows, grad_out):
        _, ent, _, *stats = self.opts.stats(z, rows)
        d_lp, d_ent = _log_prob_tangents(self.opts, z, rows, stats, ent, self.zdot_of)
        return d_lp, torch.zeros_like(d_lp) if d_ent is None else d_ent


@dataclass(frozen=True)
class _LinearLogProbsSpec(_LogProbsSpec):
    """:func:`linear_log_probs` under ``torch.func`` transforms on ``(x, w, b, target,
    inv_temp)``: the walks of :class:`_LinearLogProbs` (the backward's statistics formed by one
    more forward walk), and forward mode chunk by chunk (:class:`_LogProbTangentKernel`)."""

    name = "linear_log_probs"
    num_diff = 3

    def _walk(self, t, kernel, num_outputs, need=(False, False, False)):
        x, w, b = t[:3]
        opts = kernel.opts
        skip = opts.target == opts.params.ignore_index
        return linear_walk(
            x, w, b, kernel, num_outputs=num_outputs, need=need, skip=skip,
            chunk_tokens=self.chunk_tokens,
        )  # fmt: skip

    def row_inputs(self, t):  # (x, w, b, target, inv_temp)
        return (True, False, False, True, True)

    def value(self, t):
        check_target_range(t[3], t[1].shape[0], self.params.ignore_index)
        _check_inv_temp(t[4])
        (lp, ent, top, _, _), *_ = self._walk(t, _LogProbKernel(self.opts(t)), 5)
        return lp, ent if self.params.entropy else lp.new_zeros(0), top

    def vjp(self, t, grads, need):
        opts = self.opts(t)
        (_, ent, _, *stats), *_ = self._walk(t, _LogProbKernel(opts), 5)
        g_ent = grads[1] if self.params.entropy else None
        c_lp, c_ent = _upstream(opts, grads[0], g_ent, stats[0])
        kernel = _LogProbKernel(opts, stats, ent, c_lp, c_ent)
        _, gx, gw, gb = self._walk(t, kernel, 0, need)
        return in_dtypes_of((gx, gw, gb), t[:3])

    def jvp(self, t, tangents):
        x, w = t[:2]
        kernel = _LogProbTangentKernel(self.opts(t), x, w, *tangents)
        (d_lp, d_ent), *_ = self._walk(t, kernel, 2)
        return d_lp, d_ent if self.params.entropy else d_lp.new_zeros(0), torch.zeros_like(d_lp)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_top1: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor | LogProbs:
    """:func:`log_probs` of the logits ``hidden @ weight.T + bias``, without storing them.

    The tokens are walked in chunks: per chunk the logits ``z = h Wᵀ + b`` (fp32) are formed,
    turned into the chunk's log-probabilities, entropies and top-1 flags, and dropped. Backward
    walks the chunks again with the upstream gradients and forms ``∂hidden``, ``∂weight`` (fp32
    accumulation) and ``∂bias``; the entropy's part only when the entropy is in the loss.
    Ignored tokens are dropped before any matrix product.

    Args:
        hidden: ``(..., H)``; fp32, bf16, fp16 or fp64.
        weight: ``(V, H)``, same dtype. bias: optional ``(V)``.
        target: ``(...)`` class indices (the hidden states' shape without ``H``).
        temperature, logit_scale, softcap, ignore_index, return_entropy, return_top1: as in
            :func:`log_probs`.
        chunk_size: tokens per chunk; default as many as fit 48 MiB (512 MiB on CUDA) of fp32
            logits together with the torch kernel's scratch (one chunk-sized buffer, two with a
            cap). It changes speed and memory; the values only in the last bits of their float
            sums (grouped by chunk), not bit for bit.
        impl: ``"auto"``, ``"torch"``, ``"triton"`` (the row kernel; the matrix products are
            torch's) or ``"reference"`` (materialise the logits).

    Returns:
        As :func:`log_probs`: ``(...)`` fp32 log-probabilities, or :class:`LogProbs`.

    Equals ``xent.log_probs(torch.nn.functional.linear(hidden, weight, bias), target, ...)``.
    Memory besides the gradients: one chunk of fp32 logits and the kernel's scratch, 48 MiB in
    all by default.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the equivalent PyTorch composition gives; ``vmap`` makes one call per sample
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> h, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_log_probs(h, w, torch.tensor([0, 0]))
        tensor([-0.3133, -1.3133])
    """
    check_tensor_args(
        linear_log_probs,
        floating=("hidden", "weight", "bias"),
        hidden=hidden,
        weight=weight,
        target=target,
        bias=bias,
    )
    _check_head("", hidden, weight, bias)
    kind = resolve(impl, hidden)
    vocab = weight.shape[0]
    _check_target(target, hidden.shape[:-1], vocab, ignore_index)
    scale = _check_positive("logit_scale", logit_scale)
    cap = _check_positive("softcap", softcap, allow_none=True)
    chunk = check_chunk_size(chunk_size)
    cdtype = compute_dtype(hidden.dtype)
    inv_t = _inverse_temperature(temperature, target.shape, hidden.device, cdtype)
    if kind == "reference":
        return linear_log_probs_reference(
            hidden,
            weight,
            target,
            bias=bias,
            temperature=temperature,
            logit_scale=scale,
            softcap=cap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            return_top1=return_top1,
        )
    chunk, block = _lp_chunk(chunk, vocab, hidden, cap is not None, bool(return_entropy))
    params = LogProbParams(
        Transform(scale, cap),
        int(ignore_index),
        bool(return_entropy),
        bool(return_top1),
        block_rows=block,
        impl=kind,
    )
    x = hidden.reshape(-1, hidden.shape[-1])
    if transforms.active():
        tensor_t = isinstance(inv_t, torch.Tensor)
        lp, ent, top = transforms.apply(
            _LinearLogProbsSpec(params, None if tensor_t else inv_t, chunk),
            x,
            weight,
            bias,
            target.reshape(-1).long(),
            inv_t if tensor_t else None,
        )
        return _lp_result(lp, ent, top > 0.5, target.shape, return_entropy, return_top1)
    opts = _LPOpts(params, target.reshape(-1).long(), inv_t, chunk)
    lp, ent, top = _LinearLogProbs.apply(x, weight, bias, opts)
    return _lp_result(lp, ent, top, target.shape, return_entropy, return_top1)


# --------------------------------------------------------------------------------------------
# The clipped policy-gradient loss on hidden states
# --------------------------------------------------------------------------------------------

POLICY_REDUCTIONS = ("none", "mean", "sum")


class PolicyLoss(NamedTuple):
    """:func:`linear_policy_loss` with ``return_stats=True``: the loss and, per token (the
    target's shape, fp32, no gradient), ``log p(y)``, the entropy (0 unless it is in the loss
    or ``return_stats``) and whether the ratio was clipped (bool)."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    clipped: torch.Tensor


@dataclass(frozen=True)
class _PolicyOpts:
    """Options and non-differentiable tensors of one policy-loss call."""

    params: PolicyParams
    target: torch.Tensor  # (M) int64
    inv_temp: torch.Tensor | float
    advantages: torch.Tensor  # (M), compute dtype
    old_log_probs: torch.Tensor | None  # (M), compute dtype; None on-policy
    reduction: str
    coef: torch.Tensor  # (M) c_i = ∂L/∂ℓ_i for an upstream gradient of 1; 0 on ignored tokens
    denom: torch.Tensor | None  # the mean's denominator
    need: tuple[bool, bool, bool]  # gradients wanted for hidden, weight, bias
    chunk_tokens: int | None = None


# Bytes of fp32 per scratch buffer of the policy loss's torch kernel: its statistics and its
# gradient visit each block twice in a row, so blocks that stay in the L2/L3 caches (the
# cross-entropy kernel's 4 MiB) save a round trip to memory per pass.
POLICY_BLOCK_BYTES = 4 << 20


def _policy_chunk(chunk: int | None, vocab: int, x: torch.Tensor, capped: bool) -> tuple[int, int]:
    """``(tokens per chunk, rows per block of the torch kernel)`` for :func:`linear_policy_loss`.

    The kernel's scratch is two blocks of :data:`POLICY_BLOCK_BYTES` (one more through a cap,
    and one on the tensor-core path, for the fp32 gradient beside the bf16 one); the default
    chunk holds as many tokens as the walker's budget holds once that is set aside.
    """
    block = max(1, POLICY_BLOCK_BYTES // (4 * max(vocab, 1)))
    if chunk is None:
        split = fp32_out_gemms(x)
        per_logit = 6 if split else 4
        scratch_rows = -(-(2 + int(capped) + int(split)) * block * 4 // per_logit)
        chunk = max(1, tokens_per_chunk(vocab, x.device, per_logit, min_tokens=1) - scratch_rows)
    return chunk, min(block, chunk)


class _PolicyKernel:
    """The row kernel of :func:`linear_policy_loss` for the chunk walker: per-token loss,
    log-probability, entropy and clip flag, and with ``coef`` the gradient of ``Σ c_i ℓ_i``."""

    def __init__(self, opts: _PolicyOpts, coef: torch.Tensor | None) -> None:
        self.opts, self.coef = opts, coef

    def __call__(self, z, rows, grad_out):
        o = self.opts
        return _rows(o.params.log_probs.impl).policy_rows(
            z,
            o.target[rows],
            _index(o.inv_temp, rows),
            o.params,
            o.advantages[rows],
            None if o.old_log_probs is None else o.old_log_probs[rows],
            None if grad_out is None else self.coef[rows],
            grad_out,
        )


def _policy_walk(x, w, b, opts: _PolicyOpts, coef, need):
    return linear_walk(
        x,
        w,
        b,
        _PolicyKernel(opts, coef),
        num_outputs=4,
        need=need,
        skip=opts.target == opts.params.log_probs.ignore_index,
        chunk_tokens=opts.chunk_tokens,
    )


class _LinearPolicyLoss(torch.autograd.Function):
    """``(M, H)`` hidden states and the ``(V, H)`` head → the policy loss (and detached
    per-token statistics). A scalar loss is finished, gradients included, in one walk: the
    forward returns the gradients as extra non-differentiable outputs, which ``setup_context``
    keeps for backward; ``"none"`` (and fp16, :func:`grad_in_forward`) walks again in backward."""

    @staticmethod
    def forward(x, w, b, opts: _PolicyOpts):
        early = grad_in_forward(opts.reduction, x.dtype) and any(opts.need)
        need = opts.need if early else (False, False, False)
        (loss, lp, ent, clipped), gx, gw, gb = _policy_walk(x, w, b, opts, opts.coef, need)
        out = reduce_rows(loss, opts.reduction, opts.denom)
        empty = loss.new_empty(0)
        grads = tuple(empty if g is None else g for g in (gx, gw, gb))
        return (out.to(x.dtype), lp, ent, clipped > 0.5, *grads, early)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, opts = inputs
        _, lp, ent, clipped, gx, gw, gb, early = output
        ctx.mark_non_differentiable(lp, ent, clipped, gx, gw, gb)
        ctx.set_materialize_grads(False)
        ctx.opts, ctx.early = opts, early
        ctx.grads = (gx, gw, gb) if early else None
        ctx.save_for_backward(x, w, b)

    @staticmethod
    def backward(ctx, g, *_):
        if g is None:
            return None, None, None, None
        refuse_double_backward("linear_policy_loss")
        x, w, b = ctx.saved_tensors
        opts: _PolicyOpts = ctx.opts
        need = tuple(ctx.needs_input_grad[:3])
        g = g.to(opts.coef.dtype)
        if ctx.grads is not None:
            grads = tuple(
                gr if wanted else None for gr, wanted in zip(ctx.grads, opts.need, strict=True)
            )
            ctx.grads = None  # hand the buffers over: no copy
            scale_unless_one_(grads, g, opts.params.log_probs.impl)
        elif ctx.early:
            # A second backward through a retained graph: the forward's own arithmetic again.
            _, *grads = _policy_walk(x, w, b, opts, opts.coef, need)
            scale_unless_one_(tuple(grads), g, opts.params.log_probs.impl)
        else:
            # "none" or fp16: the upstream factor joins the coefficients before any rounding.
            coef = opts.coef * (g.reshape(-1) if opts.reduction == "none" else g)
            _, *grads = _policy_walk(x, w, b, opts, coef, need)
        return (*in_dtypes_of(tuple(grads), (x, w, b)), None)


@dataclass(frozen=True)
class _LinearPolicySpec:
    """:func:`linear_policy_loss` under ``torch.func`` transforms (:mod:`xent._engine.transforms`)
    on ``(x, w, b, target, inv_temp, advantages, old_log_probs, coef, denom)`` (the last two
    from :func:`xent._numerics.row_coefficients`, formed outside on the possibly batched
    target, so that each vmapped sample keeps its own mean). Outputs ``(L, log p, H, clipped)``;
    the per-token statistics carry no derivative, as in the eager path.

    ``vjp``: the walk of :class:`_LinearPolicyLoss` with coefficients ``c_i·ḡ`` (``ḡ`` the
    output's cotangent, per token for ``"none"``). ``jvp`` in closed form from the same row
    kernel: it writes ``G_i = c_i ∂ℓ_i/∂z_i = c_i (∂ℓ/∂log p · ∂log p_i/∂z_i - β ∂H_i/∂z_i)``
    over each chunk's logits, and ``c_i ℓ̇_i = Σ_v G_iv ż_iv`` with ``ż = ẋWᵀ + xẆᵀ + ḃ``
    (:class:`xent._engine.transforms.HeadTangentRows`); a scalar loss's tangent is their sum.
    """

    params: PolicyParams
    reduction: str
    inv_temp: float | None  # a number; a per-token tensor is t[4]
    chunk_tokens: int | None = None
    name = "linear_policy_loss"
    num_diff = 3

    def opts(self, t, need=(False, False, False)) -> _PolicyOpts:
        _, _, _, target, inv_t, adv, old, coef, denom = t
        inv = self.inv_temp if inv_t is None else inv_t
        return _PolicyOpts(
            self.params, target, inv, adv, old, self.reduction, coef, denom, need,
            self.chunk_tokens,
        )  # fmt: skip

    def row_inputs(self, t):  # (x, w, b, target, inv_temp, advantages, old, coef, denom)
        if self.reduction != "none":
            return None
        return (True, False, False, True, True, True, True, True, False)

    def value(self, t):
        x = t[0]
        check_target_range(t[3], t[1].shape[0], self.params.log_probs.ignore_index)
        _check_inv_temp(t[4])
        opts = self.opts(t)
        (loss, lp, ent, clipped), *_ = _policy_walk(*t[:3], opts, None, (False, False, False))
        out = reduce_rows(loss, self.reduction, opts.denom).to(x.dtype)
        return out, lp, ent, clipped

    def vjp(self, t, grads, need):
        opts = self.opts(t, tuple(need))
        g = grads[0]
        if g is None:
            return tuple(None if p is None else torch.zeros_like(p) for p in t[:3])
        coef = opts.coef * g.reshape(-1 if self.reduction == "none" else ()).to(opts.coef.dtype)
        _, *grads_out = _policy_walk(*t[:3], opts, coef, tuple(need))
        return in_dtypes_of(tuple(grads_out), t[:3])

    def jvp(self, t, tangents):
        x, w, b = t[:3]
        opts = self.opts(t)
        kernel = transforms.HeadTangentRows(_PolicyKernel(opts, opts.coef), 4, x, w, *tangents)
        (_, lp, _, _, per_row), *_ = linear_walk(
            x, w, b, kernel, num_outputs=5,
            skip=opts.target == self.params.log_probs.ignore_index,
            chunk_tokens=opts.chunk_tokens,
        )  # fmt: skip
        tangent = per_row if self.reduction == "none" else per_row.sum()
        zero = torch.zeros_like(lp)
        return tangent.to(x.dtype), zero, zero.clone(), zero.clone()


def _per_token(
    name: str, value: torch.Tensor, shape: torch.Size, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A detached per-token tensor broadcast to ``shape`` and flattened, in ``dtype``."""
    try:
        t = value.detach().to(device=device, dtype=dtype).broadcast_to(shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to the target's shape "
            f"{tuple(shape)} (one value per sequence of (B, S) tokens is (B, 1))"
        ) from None
    return t.reshape(-1).contiguous()


def _check_clip(name: str, value: float) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return v


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    entropy_coef: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: torch.Tensor | float | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor | PolicyLoss:
    """The clipped policy-gradient loss (PPO, GRPO, DAPO) of the logits ``hidden @ weight.T +
    bias``, gradients formed in the same walk as the loss, logits never stored.

    Per token, with ``log p(y)`` and the entropy ``H`` of the transformed distribution (as in
    :func:`linear_log_probs`: scale, soft cap, temperature), advantage ``A`` and
    ``r = exp(log p(y) - old)``:

    .. math::

        \\ell = -\\min\\bigl(r A,\\ \\operatorname{clip}(r, 1 - \\varepsilon_{lo},
        1 + \\varepsilon_{hi}) A\\bigr) - \\beta H,

    with ``ε_lo = clip_low``, ``ε_hi = clip_high`` (``clip_low`` when None) and
    ``β = entropy_coef``. Without ``old_log_probs`` the loss is on-policy: ``old = log p(y)``
    without gradient, so ``r = 1`` in value (``ℓ = -A - βH``) and the gradient is
    ``-A ∂log p(y) - β ∂H``. Where the clipped term is the strictly smaller one, the token's
    ratio is clipped and ``log p(y)`` gets no gradient:
    ``∂ℓ/∂log p(y) = -A r [r A ≤ clip(r) A]``, ``∂ℓ/∂H = -β`` (derived, down to the logits, in
    :mod:`xent._engine.logprob_rows`).

    Reductions: ``"mean"`` sums ``ℓ`` over the tokens whose target is not ``ignore_index`` and
    divides by their count (token-level; ``normalizer`` replaces the count, e.g. the tokens of
    the whole accumulated batch); ``"sum"``; ``"none"`` gives ``ℓ`` per token (0 on ignored
    ones). Ignored tokens contribute nothing and are dropped before any matrix product.

    The gradient of a ``"mean"`` or ``"sum"`` loss is formed chunk by chunk during the forward
    pass (the coefficients of each token are known once its row's statistics are), so a step
    costs the ``6·N·H·V`` flops of the products ``z = h Wᵀ``, ``∂h = ∂z W`` and
    ``∂W = ∂zᵀ h``, against ``8·N·H·V`` for :func:`linear_log_probs` followed by the loss
    (its backward forms the logits again); backward only applies the upstream factor.

    Args:
        hidden: ``(..., H)``; fp32, bf16, fp16 or fp64.
        weight: ``(V, H)``, same dtype. bias: optional ``(V)``.
        target: ``(...)`` sampled token ids (the hidden states' shape without ``H``).
        advantages: per token, broadcastable to ``target``'s shape (``(B, 1)`` for one per
            sequence of ``(B, S)`` tokens); data, no gradient.
        old_log_probs: ``log p_old(y)`` per token (``target``'s shape), or None (on-policy).
        clip_low, clip_high: the ratio's clip range ``[1 - clip_low, 1 + clip_high]``, both
            ``≥ 0``; ``clip_high=None`` takes ``clip_low``.
        entropy_coef: ``β``, the entropy bonus's weight (0: the entropy is not computed unless
            ``return_stats``).
        temperature, logit_scale, softcap, ignore_index: as in :func:`linear_log_probs`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. normalizer: the mean's denominator
            instead of the count of tokens (a number or one-element tensor).
        return_stats: also return the per-token statistics, as a :class:`PolicyLoss`.
        chunk_size: tokens per chunk, as in :func:`linear_log_probs`.
        impl: ``"auto"``, ``"torch"``, ``"triton"`` (the row kernel; the products are torch's)
            or ``"reference"`` (materialise the logits; autograd).

    Returns:
        The loss in ``hidden``'s dtype (a scalar, or the target's shape for ``"none"``), or
        ``PolicyLoss(loss, log_probs, entropy, clipped)``.

    Gradients flow to ``hidden``, ``weight`` and ``bias``. Memory besides the gradients: one
    chunk of fp32 logits and the kernel's scratch (48 MiB by default). Equals
    :func:`linear_policy_loss_reference` (the logits materialised).

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the reference gives under them (each vmapped sample its own mean); the
    per-token statistics carry no derivative, as outside them
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> h, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> y, adv = torch.tensor([0, 0]), torch.tensor([1.0, -0.5])
        >>> xent.linear_policy_loss(h, w, y, adv)  # on-policy: -mean(A)
        tensor(-0.2500)
        >>> old = torch.tensor([-0.3, -1.0])
        >>> out = xent.linear_policy_loss(h, w, y, adv, old_log_probs=old, return_stats=True)
        >>> out.loss, out.clipped
        (tensor(-0.2934), tensor([False,  True]))
    """
    check_tensor_args(
        linear_policy_loss,
        floating=("hidden", "weight", "advantages", "old_log_probs", "bias"),
        hidden=hidden,
        weight=weight,
        target=target,
        advantages=advantages,
        old_log_probs=old_log_probs,
        bias=bias,
    )
    _check_head("", hidden, weight, bias)
    kind = resolve(impl, hidden)
    vocab = weight.shape[0]
    _check_target(target, hidden.shape[:-1], vocab, ignore_index)
    check_reduction(reduction, POLICY_REDUCTIONS)
    norm = check_normalizer(normalizer, reduction)
    lo = _check_clip("clip_low", clip_low)
    hi = lo if clip_high is None else _check_clip("clip_high", clip_high)
    if isinstance(entropy_coef, torch.Tensor) or not math.isfinite(float(entropy_coef)):
        raise ValueError(f"entropy_coef must be a finite number, got {entropy_coef!r}")
    beta = float(entropy_coef)
    if old_log_probs is not None and tuple(old_log_probs.shape) != tuple(target.shape):
        raise ValueError(
            f"old_log_probs must have the target's shape {tuple(target.shape)}, got "
            f"{tuple(old_log_probs.shape)}"
        )
    scale = _check_positive("logit_scale", logit_scale)
    cap = _check_positive("softcap", softcap, allow_none=True)
    chunk = check_chunk_size(chunk_size)
    cdtype = compute_dtype(hidden.dtype)
    adv = _per_token("advantages", advantages, target.shape, hidden.device, cdtype)
    if kind == "reference":
        return linear_policy_loss_reference(
            hidden, weight, target, advantages, old_log_probs=old_log_probs, bias=bias,
            clip_low=lo, clip_high=hi, entropy_coef=beta, temperature=temperature,
            logit_scale=scale, softcap=cap, ignore_index=ignore_index, reduction=reduction,
            normalizer=norm, return_stats=return_stats,
        )  # fmt: skip
    inv_t = _inverse_temperature(temperature, target.shape, hidden.device, cdtype)
    entropy = beta != 0.0 or bool(return_stats)
    chunk, block = _policy_chunk(chunk, vocab, hidden, cap is not None)
    lpp = LogProbParams(
        Transform(scale, cap), int(ignore_index), entropy, block_rows=block, impl=kind
    )
    t = target.reshape(-1).long()
    _, coef, denom = row_coefficients(
        t, reduction=reduction, dtype=cdtype, ignore_index=int(ignore_index), normalizer=norm
    )
    old = None
    if old_log_probs is not None:
        old = old_log_probs.detach().reshape(-1).to(device=hidden.device, dtype=cdtype)
    grad_on = torch.is_grad_enabled()
    need = tuple(
        bool(grad_on and p is not None and p.requires_grad) for p in (hidden, weight, bias)
    )
    opts = _PolicyOpts(
        PolicyParams(lpp, lo, hi, beta, old is not None),
        t, inv_t, adv, old, reduction, coef, denom, need, chunk,
    )  # fmt: skip
    x = hidden.reshape(-1, hidden.shape[-1])
    if transforms.active():
        tensor_t = isinstance(inv_t, torch.Tensor)
        spec = _LinearPolicySpec(opts.params, reduction, None if tensor_t else inv_t, chunk)
        loss, lp, ent, clipped = transforms.apply(
            spec, x, weight, bias, t, inv_t if tensor_t else None, adv, old, coef, denom
        )
        clipped = clipped > 0.5
    else:
        loss, lp, ent, clipped, *_ = _LinearPolicyLoss.apply(x, weight, bias, opts)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    shape = target.shape
    return PolicyLoss(loss, lp.reshape(shape), ent.reshape(shape), clipped.reshape(shape))


# --------------------------------------------------------------------------------------------
# Vocabulary parallelism: the head (or the logits) split over the ranks along the vocabulary
# --------------------------------------------------------------------------------------------


def _parallel_opts(
    opts: _LPOpts, group, vocab_start: int | None, size: int, device: torch.device
) -> _LPOpts:
    from dataclasses import replace

    from xent._engine.parallel import layout

    vp = layout(group, size, vocab_start, device)
    valid = opts.target != opts.params.ignore_index
    local = opts.target - vp.start
    owned = valid & (local >= 0) & (local < vp.size)
    # Ignored rows keep ignore_index (the kernel zeroes them); others a safe index in the slice.
    local = torch.where(owned, local, torch.zeros_like(local))
    local = torch.where(valid, local, opts.target)
    return replace(opts, parallel=vp, local_target=local, owned=owned)


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_top1: bool = False,
) -> torch.Tensor | LogProbs:
    """:func:`log_probs` over a vocabulary split across the ranks of ``group``.

    Each rank passes the ``(..., V_r)`` logits of its contiguous slice of classes (rank order,
    or starting at ``vocab_start``) and the same global targets; every rank gets the
    log-probabilities, entropies and top-1 flags over the **whole** vocabulary, and backward
    gives each rank the gradient for its slice (nothing is communicated in backward). Per call
    of ``n`` tokens: an all-reduce MAX of ``n`` floats and a SUM of ``3n`` (a second MAX of
    ``n`` for ``top1``); never anything ``n × V``. The row kernels are torch's.

    Example:
        >>> import torch, xent  # one process: a group of one holds the whole vocabulary
        >>> import torch.distributed as dist
        >>> from xent.posttrain import vocab_parallel_log_probs
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> z = torch.log(torch.tensor([[0.4, 0.4, 0.2]]))
        >>> vocab_parallel_log_probs(z, torch.tensor([2]))
        tensor([-1.6094])
        >>> dist.destroy_process_group()
    """
    transforms.refuse("vocab_parallel_log_probs")
    _check_logits("logits", logits)
    scale = _check_positive("logit_scale", logit_scale)
    cap = _check_positive("softcap", softcap, allow_none=True)
    _check_target(target, logits.shape[:-1], 2**62, ignore_index)  # range: checked below
    cdtype = compute_dtype(logits.dtype)
    inv_t = _inverse_temperature(temperature, target.shape, logits.device, cdtype)
    params = LogProbParams(
        Transform(scale, cap), int(ignore_index), bool(return_entropy), bool(return_top1)
    )
    vocab = logits.shape[-1]
    opts = _LPOpts(params, target.reshape(-1).long(), inv_t)
    opts = _parallel_opts(opts, group, vocab_start, vocab, logits.device)
    _check_target(target, logits.shape[:-1], opts.parallel.vocab, ignore_index)
    x = logits.reshape(-1, vocab)
    x = x if x.stride(-1) == 1 else x.contiguous()
    lp, ent, top = _LogProbs.apply(x, opts)
    return _lp_result(lp, ent, top, target.shape, return_entropy, return_top1)


def vocab_parallel_linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    group=None,
    vocab_start: int | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_top1: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | LogProbs:
    """:func:`linear_log_probs` with the head split along the vocabulary: each rank passes the
    same ``hidden`` and targets and its own ``(V_r, H)`` slice of the weight (and bias).

    Every rank gets the results over the whole vocabulary; backward gives each rank the gradient
    of its weight slice and the full ``∂hidden`` (all-reduced once, at the end of the walk).
    Per chunk of ``n`` tokens: an all-reduce MAX of ``n`` and a SUM of ``3n`` floats in the
    forward (a second MAX of ``n`` for ``top1``); backward communicates only ``∂hidden``.
    """
    transforms.refuse("vocab_parallel_linear_log_probs")
    _check_head("", hidden, weight, bias)
    scale = _check_positive("logit_scale", logit_scale)
    cap = _check_positive("softcap", softcap, allow_none=True)
    chunk = check_chunk_size(chunk_size)
    _check_target(target, hidden.shape[:-1], 2**62, ignore_index)
    cdtype = compute_dtype(hidden.dtype)
    inv_t = _inverse_temperature(temperature, target.shape, hidden.device, cdtype)
    # Every rank walks the same chunks: the budget counts the global vocabulary.
    from xent._engine.parallel import layout

    global_vocab = layout(group, weight.shape[0], vocab_start, hidden.device).vocab
    chunk, block = _lp_chunk(chunk, global_vocab, hidden, cap is not None, bool(return_entropy))
    params = LogProbParams(
        Transform(scale, cap),
        int(ignore_index),
        bool(return_entropy),
        bool(return_top1),
        block_rows=block,
    )
    opts = _LPOpts(params, target.reshape(-1).long(), inv_t, chunk)
    opts = _parallel_opts(opts, group, vocab_start, weight.shape[0], hidden.device)
    _check_target(target, hidden.shape[:-1], opts.parallel.vocab, ignore_index)
    x = hidden.reshape(-1, hidden.shape[-1])
    lp, ent, top = _LinearLogProbs.apply(x, weight, bias, opts)
    return _lp_result(lp, ent, top, target.shape, return_entropy, return_top1)


# --------------------------------------------------------------------------------------------
# Distillation divergences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DivOpts:
    params: DivergenceParams
    valid: torch.Tensor  # (M) bool: tokens that count
    token_weight: torch.Tensor  # (M) t_i, 0 on tokens that do not count
    inv_temp: torch.Tensor | float
    reduction: str
    denom: torch.Tensor | None  # the "mean"/"batchmean" denominator
    chunk_tokens: int | None = None


def _check_distill_args(
    reduction: str, beta: float, normalizer
) -> tuple[float, torch.Tensor | float | None]:
    check_reduction(reduction, DISTILL_REDUCTIONS)
    b = float(beta)
    if not 0.0 <= b <= 1.0:  # NaN fails too
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    return b, check_normalizer(normalizer, reduction)


def _token_mask(
    target: torch.Tensor | None, shape: torch.Size, ignore_index: int, device: torch.device
) -> torch.Tensor:
    """``(M)`` bool: tokens that count (a bool mask as given, or ``target != ignore_index``)."""
    if target is None:
        return torch.ones(shape, dtype=torch.bool, device=device).reshape(-1)
    if tuple(target.shape) != tuple(shape):
        raise ValueError(
            f"target (or mask) must have the logits' shape without the vocabulary, {tuple(shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype == torch.bool:
        return target.reshape(-1).to(device)
    if target.is_floating_point() or target.is_complex():
        raise RuntimeError(f"target must be class indices or a bool mask, got {target.dtype}")
    return (target != ignore_index).reshape(-1).to(device)


def _div_opts(
    params: DivergenceParams,
    target,
    shape: torch.Size,
    batch: int,
    ignore_index: int,
    token_weight,
    temperature,
    reduction: str,
    normalizer,
    device: torch.device,
    cdtype: torch.dtype,
    chunk: int | None = None,
) -> _DivOpts:
    valid = _token_mask(target, shape, ignore_index, device)
    tw = valid.to(cdtype)
    if token_weight is not None:
        if tuple(token_weight.shape) != tuple(shape):
            raise ValueError(
                f"token_weight must have shape {tuple(shape)}, got {tuple(token_weight.shape)}"
            )
        tw = torch.where(valid, token_weight.detach().reshape(-1).to(device, cdtype), 0.0)
    denom = None
    if reduction == "mean":
        if normalizer is None:
            denom = tw.sum()
        elif isinstance(normalizer, torch.Tensor):
            denom = normalizer.detach().to(device=device, dtype=cdtype)
        else:
            denom = torch.full((), normalizer, dtype=cdtype, device=device)
    elif reduction == "batchmean":
        denom = torch.full((), float(batch), dtype=cdtype, device=device)
    inv_t = _inverse_temperature(temperature, shape, device, cdtype)
    return _DivOpts(params, valid, tw, inv_t, reduction, denom, chunk)


def _div_coef(opts: _DivOpts) -> torch.Tensor:
    """``c_i = ∂L/∂l_i`` for an upstream gradient of 1 (scalar reductions), 0 where not counted."""
    if opts.denom is None:
        return opts.token_weight
    return torch.where(opts.valid, opts.token_weight / opts.denom, 0.0)


def _div_reduce(per_token: torch.Tensor, opts: _DivOpts) -> torch.Tensor:
    """``t_i l_i`` per token, or their sum (divided by the denominator for the means)."""
    weighted = per_token * opts.token_weight
    if opts.reduction == "none":
        return weighted
    total = weighted.sum()
    return total if opts.denom is None else total / opts.denom


class _Divergence(torch.autograd.Function):
    """Divergence of ``(M, V)`` student logits from a teacher's; the student is the only
    differentiable input. A scalar loss has its gradient formed in the forward pass."""

    @staticmethod
    def forward(ctx, xs, xt, opts: _DivOpts):
        rows = _rows(opts.params.impl)
        grad = None
        if grad_in_forward(opts.reduction, xs.dtype) and ctx.needs_input_grad[0]:
            grad = torch.empty_like(xs)
        per = rows.divergence_rows(
            xs, xt, opts.inv_temp, opts.params, opts.valid, _div_coef(opts), grad
        )
        ctx.opts, ctx.grad = opts, grad
        ctx.save_for_backward(xs, xt)
        return _div_reduce(per, opts)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("distill_divergence")
        opts: _DivOpts = ctx.opts
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            scale_unless_one_((grad,), g, opts.params.impl)
            return grad, None, None
        xs, xt = ctx.saved_tensors
        coef = _div_coef(opts) * g.to(opts.token_weight.dtype)
        grad = torch.empty_like(xs)
        _rows(opts.params.impl).divergence_rows(
            xs, xt, opts.inv_temp, opts.params, opts.valid, coef, grad
        )
        return grad, None, None


@dataclass(frozen=True)
class _DivergenceSpec:
    """:func:`distill_divergence` under ``torch.func`` transforms (:mod:`xent._engine.transforms`)
    on ``(xs, xt, valid, token_weight, inv_temp, denom)``; the teacher gets no derivative.
    Forward mode: with ``G`` the row kernel's gradient for the loss's coefficients ``c_i``
    (``t_i``, or ``t_i / D`` for the means), ``L̇ = Σ_i Σ_v G_iv ẋ_iv`` (per row for ``"none"``)."""

    params: DivergenceParams
    reduction: str
    inv_temp: float | None  # a number; a per-row tensor is t[4]
    chunk_tokens: int | None = None
    name = "distill_divergence"
    num_diff = 1

    def opts(self, t) -> _DivOpts:
        valid, tw, inv_t, denom = t[-4:]
        inv = self.inv_temp if inv_t is None else inv_t
        return _DivOpts(self.params, valid, tw, inv, self.reduction, denom, self.chunk_tokens)

    def _rows(self, t, coef, grad):
        opts = self.opts(t)
        xs, xt = t[0].contiguous(), t[1].contiguous()
        return _rows(self.params.impl).divergence_rows(
            xs, xt, opts.inv_temp, self.params, opts.valid, coef, grad
        )

    def row_inputs(self, t):  # (xs, xt, valid, token_weight, inv_temp, denom)
        return (True, True, True, True, True, False) if self.reduction == "none" else None

    def value(self, t):
        opts = self.opts(t)
        _check_inv_temp(t[4])
        return (_div_reduce(self._rows(t, _div_coef(opts), None), opts),)

    def vjp(self, t, grads, need):
        opts = self.opts(t)
        grad = torch.empty_like(t[0], memory_format=torch.contiguous_format)
        self._rows(t, _div_coef(opts) * grads[0].to(opts.token_weight.dtype), grad)
        return (grad,)

    def jvp(self, t, tangents):
        opts, (dx,) = self.opts(t), tangents
        if dx is None:
            return (_div_reduce(torch.zeros_like(opts.token_weight), opts),)
        grad = torch.empty_like(t[0], memory_format=torch.contiguous_format)
        self._rows(t, _div_coef(opts), grad)
        per_row = (grad.to(opts.token_weight.dtype) * dx.to(opts.token_weight.dtype)).sum(-1)
        return (per_row if self.reduction == "none" else per_row.sum(),)


def _div_inputs(opts: _DivOpts) -> tuple:
    """``(valid, token_weight, inv_temp or None, denom)``: the tensors of ``opts`` for
    :mod:`xent._engine.transforms` (a number temperature rides in the spec)."""
    inv_t = opts.inv_temp if isinstance(opts.inv_temp, torch.Tensor) else None
    return opts.valid, opts.token_weight, inv_t, opts.denom


def _number(inv_temp: torch.Tensor | float) -> float | None:
    return None if isinstance(inv_temp, torch.Tensor) else inv_temp


def distill_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
    reduction: DistillReduction = "mean",
    normalizer: torch.Tensor | float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Distillation divergence between a student's and a teacher's per-token distributions.

    With ``p = softmax(u)`` the student's and ``q = softmax(v)`` the teacher's tempered
    distributions (each logit transformed as in the module's docstring, the same temperature
    on both sides) and the mixture ``m = (1 - β) p + β q``, per token

    .. math::

        l = \\begin{cases}
            \\mathrm{KL}(q \\| p) = \\sum_j q_j (\\log q_j - \\log p_j) & β = 0
                \\text{ (forward KL)}\\\\
            β\\,\\mathrm{KL}(q \\| m) + (1 - β)\\,\\mathrm{KL}(p \\| m) & 0 < β < 1
                \\text{ (generalised JSD)}\\\\
            \\mathrm{KL}(p \\| q) & β = 1 \\text{ (reverse KL)}
        \\end{cases}

    with ``0·log 0 = 0``. This is TRL's ``generalized_jsd_loss`` convention: the endpoints are
    *defined* as the two KLs. The mixture formula itself tends to 0 at both ends; what tends
    to the KLs is ``l/β → KL(q ‖ p)`` as ``β → 0`` and ``l/(1 - β) → KL(p ‖ q)`` as ``β → 1``.
    ``β = 1/2`` is the Jensen–Shannon divergence (symmetric, ≤ log 2). Hinton's ``T²`` factor
    is not applied.

    Reductions, with ``t_i`` the token weight (1 if none; 0 on ignored tokens):
    ``"none"``: ``t_i l_i``; ``"sum"``: ``Σ t_i l_i``; ``"mean"``: ``Σ t_i l_i / D`` with
    ``D = normalizer`` or ``Σ t_i`` (a token mean; TRL's ``"batchmean"`` with labels);
    ``"batchmean"``: ``Σ t_i l_i / B`` with ``B = student_logits.shape[0]`` (as
    ``torch.nn.functional.kl_div``).

    Args:
        student_logits: ``(..., V)``; the only input that receives a gradient.
        teacher_logits: ``(..., V)`` (detached; any floating dtype).
        target: optional ``(...)`` class indices (tokens equal to ``ignore_index`` are ignored)
            or a bool mask (True = counted).
        beta: ``β`` in ``[0, 1]``.
        temperature: ``T > 0``, a number or a tensor broadcastable to the token shape.
        logit_scale, softcap: the student's transform; ``teacher_logit_scale``,
            ``teacher_softcap`` the teacher's.
        token_weight: optional ``(...)`` per-token weights (no gradient).
        reduction: ``"mean"`` (default), ``"sum"``, ``"batchmean"`` or ``"none"``.
        normalizer: the ``"mean"`` denominator instead of ``Σ t_i`` (number or tensor).
        impl: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.

    Returns:
        fp32 (fp64 for fp64 inputs): a scalar, or the token shape for ``"none"``.

    Equals, for ``β = 0`` and fp32, ``F.kl_div(u.log_softmax(-1), v.log_softmax(-1),
    reduction="none", log_target=True).sum(-1)`` reduced as above.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the equivalent PyTorch composition gives; ``vmap`` makes one call per sample
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> s = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        >>> t = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
        >>> xent.distill_divergence(s, t, reduction="none")
        tensor([0.3681, 0.0000])
        >>> xent.distill_divergence(s, t, beta=1.0, reduction="sum")
        tensor(0.5108)
    """
    check_tensor_args(
        distill_divergence,
        floating=("student_logits", "teacher_logits"),
        real=("token_weight",),
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        target=target,
        token_weight=token_weight,
    )
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got "
            f"{tuple(teacher_logits.shape)}"
        )
    kind = resolve(impl, student_logits)
    b, norm = _check_distill_args(reduction, beta, normalizer)
    student = Transform(
        _check_positive("logit_scale", logit_scale),
        _check_positive("softcap", softcap, allow_none=True),
    )
    teacher = Transform(
        _check_positive("teacher_logit_scale", teacher_logit_scale),
        _check_positive("teacher_softcap", teacher_softcap, allow_none=True),
    )
    shape = student_logits.shape[:-1]
    cdtype = compute_dtype(student_logits.dtype)
    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    opts = _div_opts(
        DivergenceParams(student, teacher, b, impl=kind if kind != "reference" else "torch"),
        target,
        shape,
        batch,
        ignore_index,
        token_weight,
        temperature,
        reduction,
        norm,
        student_logits.device,
        cdtype,
    )
    if kind == "reference":
        return _divergence_reference(student_logits, teacher_logits, opts).reshape(
            shape if reduction == "none" else ()
        )
    vocab = student_logits.shape[-1]
    xs = student_logits.reshape(-1, vocab)
    xt = teacher_logits.detach().reshape(-1, vocab)
    if transforms.active():
        spec = _DivergenceSpec(opts.params, reduction, _number(opts.inv_temp))
        (out,) = transforms.apply(spec, xs, xt, *_div_inputs(opts))
        return out.reshape(shape) if reduction == "none" else out
    xs = xs if xs.stride(-1) == 1 else xs.contiguous()
    xt = xt if xt.stride(-1) == 1 else xt.contiguous()
    out = _Divergence.apply(xs, xt, opts)
    return out.reshape(shape) if reduction == "none" else out


class _DivergenceKernel:
    """The row kernel of :func:`linear_distill_divergence`: the teacher's logits of the chunk
    are taken from ``teacher_logits`` or formed from its hidden states and head."""

    def __init__(self, opts: _DivOpts, teacher: tuple, coef: torch.Tensor | None) -> None:
        self.opts, self.teacher, self.coef = opts, teacher, coef

    def teacher_logits(self, rows) -> torch.Tensor:
        if len(self.teacher) == 1:
            return self.teacher[0][rows]
        th, tw, tb = self.teacher
        hs = th[rows]
        if fp32_out_gemms(hs):  # bf16 on CUDA: fp32 logits straight from the tensor cores
            out = torch.empty(hs.shape[0], tw.shape[0], dtype=torch.float32, device=hs.device)
            return mm_fp32(hs, tw.t(), out, bias=tb)
        return torch.mm(hs, tw.t()) if tb is None else torch.addmm(tb, hs, tw.t())

    def __call__(self, z, rows, grad_out):
        o = self.opts
        zt = self.teacher_logits(rows)
        loss = _rows(o.params.impl).divergence_rows(
            z,
            zt,
            _index(o.inv_temp, rows),
            o.params,
            o.valid[rows],
            None if self.coef is None else self.coef[rows],
            grad_out,
        )
        return (loss,)


class _LinearDivergence(torch.autograd.Function):
    """Student ``(M, H)`` hidden states and head against a teacher: a scalar loss is finished,
    gradients included, in one walk; ``"none"`` walks again in backward."""

    @staticmethod
    def forward(ctx, x, w, b, opts: _DivOpts, teacher: tuple):
        skip = ~opts.valid
        scalar = opts.reduction != "none"
        need = tuple(ctx.needs_input_grad[:3]) if scalar else (False, False, False)
        step = opts.chunk_tokens
        if step is None:
            # A teacher's chunk of logits is a second chunk-sized array (fp32, or the teacher's
            # dtype), unless it is a view of the given logits (no token dropped).
            copied = len(teacher) == 3 or not host_reads_cheap(skip) or bool(skip.any())
            split = fp32_out_gemms(x) and any(need)  # ∂L/∂z in its own bf16 buffer
            per_logit = (6 if split else 4) + (4 if copied else 0)
            step = tokens_per_chunk(w.shape[0], x.device, per_logit, min_tokens=1)
        kernel = _DivergenceKernel(opts, teacher, _div_coef(opts) if any(need) else None)
        (per,), gx, gw, gb = linear_walk(
            x, w, b, kernel, num_outputs=1, need=need, skip=skip, chunk_tokens=step
        )
        ctx.opts, ctx.teacher, ctx.skip, ctx.step = opts, teacher, skip, step
        ctx.grads = (gx, gw, gb) if any(need) else None
        ctx.save_for_backward(x, w, b)
        return _div_reduce(per, opts)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("linear_distill_divergence")
        x, w, b = ctx.saved_tensors
        opts: _DivOpts = ctx.opts
        if ctx.grads is not None:
            gx, gw, gb = ctx.grads
            ctx.grads = None  # hand the buffers over: no copy
            scale_unless_one_((gx, gw, gb), g, opts.params.impl)
        else:
            coef = _div_coef(opts) * g.to(opts.token_weight.dtype)
            kernel = _DivergenceKernel(opts, ctx.teacher, coef)
            _, gx, gw, gb = linear_walk(
                x,
                w,
                b,
                kernel,
                num_outputs=1,
                need=tuple(ctx.needs_input_grad[:3]),
                skip=ctx.skip,
                chunk_tokens=ctx.step,
            )
        return (*in_dtypes_of((gx, gw, gb), (x, w, b)), None, None)


@dataclass(frozen=True)
class _LinearDivergenceSpec(_DivergenceSpec):
    """:func:`linear_distill_divergence` under ``torch.func`` transforms on ``(x, w, b, valid,
    token_weight, inv_temp, denom, *teacher)`` (the teacher's logits, or its hidden states,
    weight and bias): the walks of :class:`_LinearDivergence`, and forward mode chunk by chunk
    through :class:`xent._engine.transforms.HeadTangentRows`."""

    teacher_tensors: int = 1
    name = "linear_distill_divergence"
    num_diff = 3

    def opts(self, t) -> _DivOpts:
        return super().opts(t[: len(t) - self.teacher_tensors])

    def _walk(self, t, coef, need=(False, False, False), tangents=None):
        opts = self.opts(t)
        x, w, b = t[:3]
        kernel = _DivergenceKernel(opts, tuple(t[len(t) - self.teacher_tensors :]), coef)
        if tangents is not None:
            kernel = transforms.HeadTangentRows(kernel, 1, x, w, *tangents)
        step = self.chunk_tokens
        if step is None:  # a student's and a teacher's chunk of logits
            step = tokens_per_chunk(w.shape[0], x.device, 8, min_tokens=1)
        outputs, *grads = linear_walk(
            x, w, b, kernel, num_outputs=1 if tangents is None else 2, need=need,
            skip=~opts.valid, chunk_tokens=step,
        )  # fmt: skip
        return outputs, grads

    def row_inputs(self, t):  # (x, w, b, valid, token_weight, inv_temp, denom, *teacher)
        if self.reduction != "none":
            return None
        teacher = (True,) if self.teacher_tensors == 1 else (True, False, False)
        return (True, False, False, True, True, True, False, *teacher)

    def value(self, t):
        _check_inv_temp(t[5])
        (per,), _ = self._walk(t, None)
        return (_div_reduce(per, self.opts(t)),)

    def vjp(self, t, grads, need):
        opts = self.opts(t)
        coef = _div_coef(opts) * grads[0].to(opts.token_weight.dtype)
        _, (gx, gw, gb) = self._walk(t, coef, need)
        return in_dtypes_of((gx, gw, gb), t[:3])

    def jvp(self, t, tangents):
        (_, per_row), _ = self._walk(t, _div_coef(self.opts(t)), tangents=tangents)
        return (per_row if self.reduction == "none" else per_row.sum(),)


def linear_distill_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
    reduction: DistillReduction = "mean",
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`distill_divergence` of the student's logits ``student_hidden @ student_weight.T``
    against a teacher, never storing the ``N × V`` logits of either model.

    The teacher is given either as ``teacher_logits`` (``(..., V)``) or as its own
    ``teacher_hidden`` (``(..., H_t)``), ``teacher_weight`` (``(V, H_t)``) and optional
    ``teacher_bias``, whose logits are formed chunk by chunk beside the student's. The gradient
    reaches the student's hidden states, weight and bias only. For scalar reductions the loss
    and all gradients are finished in one walk over the tokens (6·N·H·V flops for the student);
    ``"none"`` walks again in backward. Ignored tokens are dropped before any product.

    Args:
        student_hidden: ``(..., H)``; student_weight: ``(V, H)``; student_bias: optional ``(V)``.
        target: optional ``(...)`` class indices (``ignore_index`` marks ignored tokens) or a
            bool mask (True = counted).
        teacher_logits, teacher_hidden, teacher_weight, teacher_bias: the teacher (one form).
        chunk_size: tokens per chunk; default as many as fit 48 MiB of fp32 logits of each model
            (512 MiB on CUDA). It changes speed and memory; the values only in the last bits of
            their float sums (grouped by chunk), not bit for bit.
        beta, temperature, logit_scale, softcap, teacher_logit_scale, teacher_softcap,
        ignore_index, token_weight, reduction, normalizer, impl: as in :func:`distill_divergence`.

    Returns:
        fp32 (fp64 for fp64): a scalar, or the token shape for ``"none"``.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the equivalent PyTorch composition gives; ``vmap`` makes one call per sample
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> h, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_distill_divergence(h, w, teacher_hidden=h, teacher_weight=2 * w)
        tensor(0.0671)
    """
    check_tensor_args(
        linear_distill_divergence,
        floating=(
            "student_hidden",
            "student_weight",
            "student_bias",
            "teacher_logits",
            "teacher_hidden",
            "teacher_weight",
            "teacher_bias",
        ),
        real=("token_weight",),
        student_hidden=student_hidden,
        student_weight=student_weight,
        target=target,
        student_bias=student_bias,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        token_weight=token_weight,
    )
    _check_head("student", student_hidden, student_weight, student_bias)
    kind = resolve(impl, student_hidden)
    shape = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give the teacher as teacher_logits or as teacher_hidden and "
                             "teacher_weight, not both")  # fmt: skip
        _check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (*shape, vocab):
            raise ValueError(
                f"teacher_logits must have shape {(*shape, vocab)}, got "
                f"{tuple(teacher_logits.shape)}"
            )
        teacher = (teacher_logits.detach().reshape(-1, vocab).contiguous(),)
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("give the teacher as teacher_logits or as teacher_hidden and "
                             "teacher_weight")  # fmt: skip
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if tuple(teacher_hidden.shape[:-1]) != tuple(shape) or teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"the teacher must cover the student's tokens {tuple(shape)} and vocabulary "
                f"{vocab}, got hidden {tuple(teacher_hidden.shape)} and weight "
                f"{tuple(teacher_weight.shape)}"
            )
        teacher = (
            teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
        )
    b, norm = _check_distill_args(reduction, beta, normalizer)
    student = Transform(
        _check_positive("logit_scale", logit_scale),
        _check_positive("softcap", softcap, allow_none=True),
    )
    teacher_tf = Transform(
        _check_positive("teacher_logit_scale", teacher_logit_scale),
        _check_positive("teacher_softcap", teacher_softcap, allow_none=True),
    )
    chunk = check_chunk_size(chunk_size)
    cdtype = compute_dtype(student_hidden.dtype)
    batch = student_hidden.shape[0] if student_hidden.dim() > 1 else 1
    opts = _div_opts(
        DivergenceParams(student, teacher_tf, b, impl=kind if kind != "reference" else "torch"),
        target,
        shape,
        batch,
        ignore_index,
        token_weight,
        temperature,
        reduction,
        norm,
        student_hidden.device,
        cdtype,
        chunk,
    )
    x = student_hidden.reshape(-1, student_hidden.shape[-1])
    if kind == "reference":
        zs = _linear_reference(x, student_weight, student_bias)
        zt = teacher[0] if len(teacher) == 1 else _linear_reference(*teacher)
        out = _divergence_reference(zs, zt, opts)
    elif transforms.active():
        spec = _LinearDivergenceSpec(
            opts.params, reduction, _number(opts.inv_temp), chunk, len(teacher)
        )
        tensors = (x, student_weight, student_bias, *_div_inputs(opts), *teacher)
        (out,) = transforms.apply(spec, *tensors)
    else:
        out = _LinearDivergence.apply(x, student_weight, student_bias, opts, teacher)
    return out.reshape(shape) if reduction == "none" else out


# --------------------------------------------------------------------------------------------
# References: the logits materialised, autograd through elementary operations
# --------------------------------------------------------------------------------------------


def _transform_reference(z: torch.Tensor, tf: Transform, inv_t) -> torch.Tensor:
    u = z.to(compute_dtype(z.dtype)) * tf.scale
    if tf.softcap is not None:
        u = tf.softcap * torch.tanh(u / tf.softcap)
    return u * (inv_t[:, None] if isinstance(inv_t, torch.Tensor) else inv_t)


def _log_softmax_reference(u: torch.Tensor) -> torch.Tensor:
    m = u.detach().amax(dim=1, keepdim=True)
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    return u - m - (u - m).exp().sum(dim=1, keepdim=True).log()


def _linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    cdtype = compute_dtype(x.dtype)
    z = x.to(cdtype) @ w.to(cdtype).t()
    return z if b is None else z + b.to(cdtype)


def log_probs_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_top1: bool = False,
) -> torch.Tensor | LogProbs:
    """The plain-PyTorch definition of :func:`log_probs`: full tempered log-softmax, autograd.

    The test oracle (run on fp64 inputs) and the benchmarks' naive baseline.

    Example:
        >>> import torch
        >>> from xent.posttrain import log_probs_reference
        >>> log_probs_reference(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor([-0.6931])
    """
    vocab = logits.shape[-1]
    cdtype = compute_dtype(logits.dtype)
    inv_t = _inverse_temperature(temperature, target.shape, logits.device, cdtype)
    u = _transform_reference(logits.reshape(-1, vocab), Transform(logit_scale, softcap), inv_t)
    log_p = _log_softmax_reference(u)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    lp = torch.where(valid, log_p.gather(1, safe[:, None]).squeeze(1), 0.0)
    ent = top = None
    if return_entropy:
        p = log_p.exp()
        plogp = p * torch.where(p > 0, log_p, 0.0)  # 0·log 0 = 0, with a zero gradient there
        ent = torch.where(valid, -plogp.sum(dim=1), 0.0)
    if return_top1:
        top = valid & (u.argmax(dim=1) == safe)
    return _lp_result(lp, ent, top, target.shape, return_entropy, return_top1)


def linear_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | LogProbs:
    """:func:`log_probs_reference` of ``hidden @ weight.T + bias``, the logits materialised.

    Example:
        >>> import torch
        >>> from xent.posttrain import linear_log_probs_reference
        >>> linear_log_probs_reference(torch.eye(2), torch.eye(2), torch.tensor([0, 0]))
        tensor([-0.3133, -1.3133])
    """
    z = _linear_reference(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return log_probs_reference(z.reshape(*target.shape, weight.shape[0]), target, **options)


def _divergence_reference(zs: torch.Tensor, zt: torch.Tensor, opts: _DivOpts) -> torch.Tensor:
    """Per-token divergence with the logits in memory, reduced as :func:`distill_divergence`."""
    vocab = zs.shape[-1]
    prm = opts.params
    ls = _log_softmax_reference(
        _transform_reference(zs.reshape(-1, vocab), prm.student, opts.inv_temp)
    )
    with torch.no_grad():
        lt = _log_softmax_reference(
            _transform_reference(zt.reshape(-1, vocab).detach(), prm.teacher, opts.inv_temp)
        )
    p, q = ls.exp(), lt.exp()

    def kl(w, la, lb):  # Σ w (la - lb) with 0·anything = 0, and no NaN in its gradient
        return torch.where(w > 0, w * (la - torch.where(w > 0, lb, 0.0)), 0.0).sum(dim=1)

    beta = prm.beta
    if beta == 0.0:
        per = kl(q, lt, ls)
    elif beta == 1.0:
        per = kl(p, torch.where(p > 0, ls, 0.0), lt)
    else:
        lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
        per = beta * kl(q, lt, lm) + (1 - beta) * kl(p, torch.where(p > 0, ls, 0.0), lm)
    per = torch.where(opts.valid, per, 0.0)
    return _div_reduce(per, opts)


def linear_policy_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    entropy_coef: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: torch.Tensor | float | None = None,
    return_stats: bool = False,
) -> torch.Tensor | PolicyLoss:
    """The plain-PyTorch definition of :func:`linear_policy_loss`: the logits materialised,
    ``torch.minimum`` of the two surrogate terms, autograd through everything.

    Example:
        >>> import torch
        >>> from xent.posttrain import linear_policy_loss_reference
        >>> h, y, adv = torch.eye(2), torch.tensor([0, 1]), torch.tensor([1.0, 3.0])
        >>> linear_policy_loss_reference(h, torch.eye(2), y, adv)
        tensor(-2.)
    """
    out = linear_log_probs_reference(
        hidden, weight, target, bias=bias, temperature=temperature, logit_scale=logit_scale,
        softcap=softcap, ignore_index=ignore_index, return_entropy=True,
    )  # fmt: skip
    lp, ent = out.log_probs, out.entropy
    a = advantages.detach().to(lp.dtype).broadcast_to(lp.shape)
    old = lp.detach() if old_log_probs is None else old_log_probs.detach().to(lp.dtype)
    hi = clip_low if clip_high is None else clip_high
    r = torch.exp(lp - old)
    ra, ca = r * a, r.clamp(1.0 - clip_low, 1.0 + hi) * a
    valid = target != ignore_index
    per = torch.where(valid, -torch.minimum(ra, ca) - entropy_coef * ent, 0.0)
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        denom = valid.sum() if normalizer is None else normalizer
        loss = per.sum() / denom
    loss = loss.to(hidden.dtype)
    if not return_stats:
        return loss
    return PolicyLoss(loss, lp.detach(), ent.detach(), valid & (ca < ra))
