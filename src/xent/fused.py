"""Linear layer + cross-entropy, fused so that the ``N × V`` logits never exist in full.

A language model's head maps ``N`` hidden states of width ``H`` to ``N × V`` logits. For
``V = 128k`` and ``N = 8k`` tokens those logits (and their gradient) take 4 GiB each in fp32,
far more than the weights. The fused operation walks through the tokens in chunks; per chunk it

1. forms the logits ``z = X_c Wᵀ + b`` (``n_c × V``, the only large buffer),
2. turns them, in place, into ``∂L/∂z`` with the one-pass cross-entropy kernel
   (:mod:`xent._onepass`), which also yields the chunk's losses,
3. accumulates ``∂L/∂X_c = (∂L/∂z) W`` and ``∂L/∂W += (∂L/∂z)ᵀ X_c`` (fp32) and
   ``∂L/∂b += Σ_rows ∂L/∂z``,

so a scalar loss is finished, gradients included, by the end of the forward: 6·N·H·V flops and
one chunk of logits of memory. For ``reduction="none"`` the forward keeps only each token's
log-sum-exp, and backward recomputes the logits chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xent._onepass import CEParams, pass_for, resolve_impl
from xent._validation import (
    Reduction,
    check_label_smoothing,
    check_reduction,
    compute_dtype,
    host_reads_cheap,
)
from xent.activation import logsumexp
from xent.classification import (
    _check_chunk_size,
    _check_softcap,
    _check_target_range,
    _check_weight,
    _check_z_loss,
)

# fp32 bytes of logits per token chunk when ``chunk_size`` is not given. 48 MiB keeps the chunk's
# logits within 64 MiB of the gradients' floor, while each chunk's matrix products stay large
# enough (~390 rows at V = 32k) to run near full speed: on a 2-core CPU (`xent bench lce`),
# 16 MiB chunks were ~15 % slower and 64 MiB ones ~5 % faster.
CHUNK_BYTES = 48 << 20
# On GPUs the products need far more rows to fill the tensor cores, and memory is plentiful: 512
# MiB of logits (and, on the bf16 path, their bf16 gradient) is ~680 tokens at V = 128k. Not yet
# tuned on a GPU.
CHUNK_BYTES_CUDA = 512 << 20


@dataclass(frozen=True)
class LCEParams:
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

    def tokens_per_chunk(self, vocab: int, device: torch.device, bytes_per_logit: int) -> int:
        """``chunk_size`` if given, else as many tokens as the device's budget holds at
        ``bytes_per_logit`` (4 for the fp32 logits; 6 with a bf16 copy of their gradient)."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES
        return max(1, budget // (bytes_per_logit * max(vocab, 1)))


# --------------------------------------------------------------------------------------------
# The chunked computation
# --------------------------------------------------------------------------------------------


def _fp32_out_gemms(x: torch.Tensor) -> bool:
    """Whether bf16 products here can write fp32 results directly.

    ``torch.mm(a, b, out_dtype=torch.float32)`` (CUDA, torch ≥ 2.8) runs a bf16 product on the
    tensor cores with fp32 accumulators and stores them unrounded. Then the logits, ``∂L/∂X``
    and the running ``∂L/∂W`` are fp32 while every product reads bf16: no fp32 (or TF32) GEMM
    and no widening copy of a chunk. Elsewhere bf16 takes the portable path below.
    """
    return x.dtype == torch.bfloat16 and x.is_cuda and _HAS_OUT_DTYPE


_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()
# Whether `addmm(acc, a, b, out_dtype=fp32, out=acc)` accepts an fp32 `acc` with bf16 `a`, `b`
# (it does in recent torch; earlier versions wanted `acc` in bf16). Learnt on first use.
_FP32_ACCUMULATE: list[bool] = [True]


def _mm_fp32(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """``out ← a b (+ bias)``, or ``out += a b``, for bf16 ``a``, ``b`` and an fp32 ``out``."""
    if accumulate:
        if _FP32_ACCUMULATE[0]:
            try:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:  # the dtype check refuses before anything runs
                _FP32_ACCUMULATE[0] = False
        # Row blocks bound the fp32 temporary to ~256 MiB whatever the weight's size.
        block = max(1, (256 << 20) // (4 * max(out.shape[1], 1)))
        for r in range(0, out.shape[0], block):
            out[r : r + block].add_(torch.mm(a[r : r + block], b, out_dtype=torch.float32))
        return out
    if bias is None:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.addmm(bias, a, b, out_dtype=torch.float32, out=out)


def _chunk_logits(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``x wᵀ + b`` for one chunk, written into ``out`` (fp32 statistics for bf16/fp16)."""
    if out.dtype != x.dtype:
        if _fp32_out_gemms(x):
            return _mm_fp32(x, w.t(), out, bias=b)
        # Half-precision product, then one widening copy.
        return out.copy_(torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()))
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def _chunked_pass(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    keep: torch.Tensor | None,
    opts: LCEParams,
    coef: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    lse_in: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]:
    """Loss and log-sum-exp of the kept tokens, and (if ``coef``) ``Σ_i c_i ∂l_i/∂(x, w, b)``.

    ``keep`` lists the rows of ``x`` that count (None: all of them); ignored tokens never enter
    a matrix product. Each chunk gathers its own rows, so nothing ``N``-sized is copied. The
    returned ``(M)`` loss and log-sum-exp follow ``keep``'s order; ``∂L/∂x`` is full-sized with
    zero rows for dropped tokens.

    Precision: the logits and all statistics are fp32 (fp64 for fp64). ``∂L/∂z`` is fp32 too,
    except on the bf16 tensor-core path (:func:`_fp32_out_gemms`), where the kernel writes it in
    bf16, the operand the products read; the products accumulate in fp32 either way.
    """
    n_kept = x.shape[0] if keep is None else keep.numel()
    vocab = w.shape[0]
    cdtype = compute_dtype(x.dtype)
    need_x, need_w, need_b = need if coef is not None else (False, False, False)
    loss = torch.empty(n_kept, dtype=cdtype, device=x.device)
    lse = torch.empty(n_kept, dtype=cdtype, device=x.device)
    # ∂L/∂X in the compute dtype (fp32 for half inputs), rounded only after backward applies
    # the upstream factor: fp16's narrow range would otherwise flush small entries to zero.
    grad_x = None
    if need_x:
        make = torch.empty if keep is None else torch.zeros
        grad_x = make(x.shape, dtype=cdtype, device=x.device)
    # ∂L/∂W is a sum over all tokens: accumulate it in fp32 whatever the weight's dtype. The
    # first chunk overwrites it, so it starts uninitialised; an empty batch zeroes it.
    grad_w = torch.empty(w.shape, dtype=cdtype, device=w.device) if need_w else None
    if grad_w is not None and n_kept == 0:
        grad_w.zero_()
    grad_b = torch.zeros(vocab, dtype=cdtype, device=w.device) if need_b else None
    target = opts.target
    tensor_cores = _fp32_out_gemms(x)
    w_fp32 = w.to(cdtype) if need_x and w.dtype == torch.float16 else None
    wants_grad = coef is not None and (need_x or need_w or need_b)
    split = tensor_cores and wants_grad  # ∂L/∂z in its own bf16 buffer
    step = opts.tokens_per_chunk(vocab, x.device, 6 if split else 4)
    # One buffer per chunk-sized array for all chunks: allocated once per call, not per chunk.
    size = (min(step, n_kept), vocab)
    logits = torch.empty(size, dtype=cdtype, device=x.device)
    dlogits = torch.empty(size, dtype=x.dtype, device=x.device) if split else logits
    # Every token is computed (keep_all): ignored ones get zero hidden states, so that whatever
    # their rows hold (even NaN padding) adds exactly nothing to ∂W and ∂b.
    ignored = None
    if keep is None and not _drop_ignored(opts.target) and wants_grad:
        ignored = (opts.target == opts.ce.ignore_index)[:, None]
    for start in range(0, n_kept, step):
        stop = min(start + step, n_kept)
        rows = slice(start, stop) if keep is None else keep[start:stop]
        xs = x[rows]
        if ignored is not None:
            xs = xs.masked_fill(ignored[rows], 0.0)
        z = _chunk_logits(xs, w, b, logits[: stop - start])
        dz = dlogits[: stop - start]  # ∂L/∂z: over z itself, or a bf16 buffer
        chunk_loss, chunk_lse = pass_for(opts.ce)(
            z,
            target[rows],
            opts.class_weight,
            None if coef is None else coef[rows],
            opts.ce,
            lse_in=None if lse_in is None else lse_in[start:stop],
            grad_out=dz if wants_grad else None,
        )
        loss[start:stop] = chunk_loss
        lse[start:stop] = chunk_lse
        if not wants_grad:
            continue
        if grad_x is not None:
            if tensor_cores and keep is None:
                _mm_fp32(dz, w, grad_x[rows])
            else:
                if tensor_cores:
                    dx = _mm_fp32(dz, w, torch.empty_like(xs, dtype=cdtype))
                elif w_fp32 is not None:
                    # fp16 cannot hold the small entries of ∂L/∂z (they are ~p/N): that
                    # product runs in fp32 on an fp32 copy of the weight.
                    dx = torch.mm(dz, w_fp32)
                else:
                    dx = torch.mm(dz.to(w.dtype), w).to(cdtype)
                if keep is None:
                    grad_x[rows] = dx
                else:
                    grad_x.index_copy_(0, rows, dx)
        if grad_w is not None:
            if tensor_cores:
                _mm_fp32(dz.t(), xs, grad_w, accumulate=start > 0)
            else:
                grad_w.addmm_(dz.t(), xs if xs.dtype == cdtype else xs.to(cdtype), beta=start > 0)
        if grad_b is not None:
            grad_b += dz.sum(dim=0, dtype=cdtype)
    return loss, lse, grad_x, grad_w, grad_b


def _coefficients(
    target: torch.Tensor, opts: LCEParams, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c, D)``: per-token ``∂L/∂l_i`` (upstream 1) and the mean's denominator.

    ``c_i = t_i / D`` for ``"mean"`` and ``t_i`` otherwise, with ``t_i`` the token weight (1 if
    none, 0 on ignored tokens) and ``D`` the normalizer if given, else ``Σ_i t_i w_{y_i}``.
    """
    valid = target != opts.ce.ignore_index
    tw = valid.to(dtype)
    if opts.token_weight is not None:
        tw = torch.where(valid, opts.token_weight.to(dtype), 0.0)
    if opts.ce.reduction != "mean":
        return tw, None
    if opts.normalizer is not None:
        norm = opts.normalizer
        denom = (
            norm.to(device=target.device, dtype=dtype)
            if isinstance(norm, torch.Tensor)
            else torch.full((), norm, dtype=dtype, device=target.device)
        )
    elif opts.class_weight is None:
        denom = tw.sum()
    else:
        safe = torch.where(valid, target, torch.zeros_like(target))
        denom = (tw * opts.class_weight.to(dtype)[safe]).sum()
    # `where`, not a product: ignored tokens get exactly 0 even when D is 0 (all ignored).
    return torch.where(valid, tw / denom, 0.0), denom


def _drop_ignored(target: torch.Tensor) -> bool:
    """Whether ignored tokens are dropped before the matrix products.

    Listing the kept tokens needs their count on the host: free on the CPU, one wait for the
    queue on a GPU, which the products it saves repay whenever a few percent of the tokens are
    ignored. While a CUDA graph is being captured nothing may be read back, so every token is
    computed instead (ignored ones with a zero coefficient): the capture stays valid.
    """
    return host_reads_cheap(target) or not (
        target.is_cuda and torch.cuda.is_current_stream_capturing()
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Linear + cross-entropy on ``(N, H)`` inputs and ``(N)`` targets.

    Only ``x``, ``w`` and ``b`` are differentiable; everything else rides in ``opts``.
    """

    @staticmethod
    def forward(ctx, x, w, b, opts: LCEParams):
        ce, target = opts.ce, opts.target
        cdtype = compute_dtype(x.dtype)
        coef, denom = _coefficients(target, opts, cdtype)
        keep = keep_or_all = None
        if _drop_ignored(target):
            keep = (target != ce.ignore_index).nonzero().squeeze(1)
            keep_or_all = None if keep.numel() == target.numel() else keep
        scalar = ce.reduction != "none"
        need = tuple(ctx.needs_input_grad[:3])
        loss_k, lse_k, grad_x, gw, gb = _chunked_pass(
            x, w, b, keep_or_all, opts, coef if scalar else None, need
        )
        tw = coef if ce.reduction != "mean" else coef * denom  # the token weights t_i
        if keep is None:  # every token went through (ignored ones with loss 0 and weight 0)
            per_token = loss_k * tw
        else:
            per_token = torch.zeros(target.shape[0], dtype=cdtype, device=x.device)
            per_token.index_copy_(0, keep, loss_k * tw.index_select(0, keep))
        if ce.reduction == "mean":
            out = per_token.sum() / denom
        elif ce.reduction == "sum":
            out = per_token.sum()
        else:
            out = per_token
        ctx.opts, ctx.grads = opts, (grad_x, gw, gb)
        ctx.keep = keep_or_all
        ctx.save_for_backward(x, w, b, coef, lse_k)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "linear_cross_entropy's gradient is not differentiable (create_graph=True); "
                "use impl='reference' for double backward"
            )
        x, w, b, coef, lse_k = ctx.saved_tensors
        opts: LCEParams = ctx.opts
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
            _, _, grad_x, grad_w, grad_b = _chunked_pass(
                x, w, b, ctx.keep, opts, c, need, lse_in=None if scalar else lse_k
            )
        if scalar and opts.ce.impl == "triton" and not host_reads_cheap(g):
            from xent._triton_ce import scale_unless_one_  # skips g == 1 on the device

            grad_x, grad_w = scale_unless_one_(grad_x, g), scale_unless_one_(grad_w, g)
            grad_b = scale_unless_one_(grad_b, g)
        elif scalar and not (host_reads_cheap(g) and bool(g == 1)):
            grad_x = None if grad_x is None else grad_x.mul_(g.to(grad_x.dtype))
            grad_w = None if grad_w is None else grad_w.mul_(g)
            grad_b = None if grad_b is None else grad_b.mul_(g)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None else grad_b.to(b.dtype),
            None,
        )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

IMPLS = ("auto", "torch", "triton", "reference")


def _check_linear_args(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
) -> None:
    if not input.is_floating_point() or input.dim() == 0:
        raise TypeError(
            f"input must be a floating tensor of shape (..., H), got {input.dtype} "
            f"of shape {tuple(input.shape)}"
        )
    hidden = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != hidden:
        raise ValueError(
            f"linear_weight must have shape (V, H) with H = {hidden} (the input's last "
            f"dimension), got {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(
            f"input and linear_weight must have the same dtype, got {input.dtype} and "
            f"{linear_weight.dtype}"
        )
    vocab = linear_weight.shape[0]
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise RuntimeError(
            f"input and linear_bias must have the same dtype, got {input.dtype} and "
            f"{linear_bias.dtype}"
        )
    if linear_bias is not None and tuple(linear_bias.shape) != (vocab,):
        raise ValueError(f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have the input's shape without its last dimension, "
            f"{tuple(input.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"expected an integer dtype for class-index targets, got {target.dtype}")
    if token_weight is not None and tuple(token_weight.shape) != tuple(target.shape):
        raise ValueError(
            f"token_weight must have the target's shape {tuple(target.shape)}, "
            f"got {tuple(token_weight.shape)}"
        )


def _check_normalizer(
    normalizer: torch.Tensor | float | None, reduction: str
) -> torch.Tensor | float | None:
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"normalizer replaces the denominator of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape "
                f"{tuple(normalizer.shape)}"
            )
        return normalizer.reshape(())  # no host sync: its value is used on its device
    value = float(normalizer)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    return value


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: torch.Tensor | float | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "reference",
) -> torch.Tensor:
    """The plain-PyTorch definition of :func:`linear_cross_entropy`, logits and all.

    Materialises the ``N × V`` logits in fp32 and lets autograd differentiate elementary
    operations: the specification that the fused paths are tested against, and the baseline
    they are measured against. ``chunk_size`` and ``impl`` are accepted and ignored.

    Example:
        >>> import torch, xent
        >>> x, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_cross_entropy_reference(x, w, torch.tensor([0, 1]))
        tensor(0.3133)
    """
    x = input.reshape(-1, input.shape[-1])
    cdtype = compute_dtype(input.dtype)
    z = x.to(cdtype) @ linear_weight.to(cdtype).t()
    if linear_bias is not None:
        z = z + linear_bias.to(cdtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target.reshape(-1)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    w = (
        torch.ones(z.shape[1], dtype=cdtype, device=z.device)
        if weight is None
        else weight.to(cdtype)
    )
    lse = logsumexp(z, dim=1)
    log_p = z - lse[:, None]
    nll = -w[safe] * log_p.gather(1, safe[:, None]).squeeze(1)
    smooth = -(log_p * w).sum(dim=1)
    eps = label_smoothing
    per_token = (1 - eps) * nll + (eps / z.shape[1]) * smooth + z_loss * lse**2
    tw = torch.ones_like(lse) if token_weight is None else token_weight.reshape(-1).to(cdtype)
    per_token = torch.where(valid, per_token * tw, 0.0)
    if reduction == "none":
        return per_token.reshape(target.shape).to(input.dtype)
    if reduction == "sum":
        return per_token.sum().to(input.dtype)
    denom = normalizer if normalizer is not None else torch.where(valid, tw * w[safe], 0.0).sum()
    return (per_token.sum() / denom).to(input.dtype)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: torch.Tensor | float | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without storing those logits.

    With ``z_i = W x_i + b`` (soft-capped to ``s·tanh(z/s)`` if ``softcap``), per token

    .. math::

        l_i = t_i \\Big[(1-ε)\\,w_{y_i}(\\operatorname{lse}(z_i) - z_{i,y_i})
              + \\frac{ε}{V}\\sum_c w_c(\\operatorname{lse}(z_i) - z_{i,c})
              + ζ\\,\\operatorname{lse}(z_i)^2\\Big],

    with ``t_i`` the token weight (``token_weight``, else 1; 0 for ``ignore_index`` targets),
    ``w`` the class weights, ``ε`` the label smoothing and ``ζ`` the z-loss coefficient. Then

    .. math::

        L_{\\text{sum}} = \\sum_i l_i, \\qquad
        L_{\\text{mean}} = \\frac{\\sum_i l_i}{D}, \\qquad
        D = \\texttt{normalizer} \\text{ or } \\sum_{i \\text{ not ignored}} t_i w_{y_i}.

    ``normalizer`` lets micro-batches add up to the full-batch mean: give every micro-batch (or
    data-parallel rank) the total count of target tokens of the whole step and sum their losses.
    ``token_weight`` scales each token's loss and gradients (e.g. per-sequence or
    per-document weights); it receives no gradient.

    Args:
        input: hidden states ``(..., H)``; fp32, bf16, fp16 or fp64.
        linear_weight: ``(V, H)``, same dtype as ``input``.
        target: class indices ``(...)`` (the input's shape without ``H``).
        linear_bias: optional ``(V)``.
        weight: optional ``(V)`` class weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape of ``target``).
        ignore_index: targets equal to it are dropped before any matrix product (except while
            a CUDA graph is being captured: then they are computed with weight 0).
        label_smoothing: ``ε`` in ``[0, 1]``, over the whole vocabulary.
        z_loss: ``ζ ≥ 0``, coefficient of ``lse²`` (PaLM's auxiliary loss).
        softcap: ``s > 0`` caps logits to ``s·tanh(z/s)`` (Gemma 2).
        normalizer: denominator of ``"mean"`` instead of the token count: a number or a
            one-element tensor (never read on the host).
        token_weight: optional ``(...)`` per-token weights.
        chunk_size: tokens per chunk; default: as many as fit 48 MiB of fp32 logits (on CUDA,
            512 MiB of logits and, for bf16, their bf16 gradient).
        impl: ``"auto"`` (the chunked path; its logits-to-gradient kernel in Triton on CUDA
            when installed), ``"torch"`` or ``"triton"`` (that kernel chosen explicitly; the
            matrix products are torch's, cuBLAS on GPUs), or ``"reference"`` (materialise the
            logits: :func:`linear_cross_entropy_reference`).

    Returns:
        The loss in ``input``'s dtype: a scalar, or ``target``'s shape for ``"none"``.

    Equals ``xent.cross_entropy(torch.nn.functional.linear(input, linear_weight, linear_bias)
    .flatten(0, -2), target.flatten(), weight, ...)`` (and PyTorch 2.13's
    ``F.linear_cross_entropy`` for the options it has); statistics are always fp32, and the
    weight's gradient is accumulated in fp32 and rounded once at the end.

    Memory: besides the gradients of ``input`` and ``linear_weight`` (the floor), one chunk of
    fp32 logits; for bf16/fp16 weights also an fp32 accumulator for their gradient.

    Example:
        >>> import torch, xent
        >>> x, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]))
        tensor(0.3133)
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]), reduction="sum", normalizer=None)
        tensor(0.6265)
    """
    check_reduction(reduction)
    eps = check_label_smoothing(label_smoothing)
    kernel = "torch" if impl == "reference" else resolve_impl(impl, input, IMPLS)
    _check_linear_args(input, linear_weight, target, linear_bias, token_weight)
    _check_weight(weight, linear_weight.shape[0])
    norm = _check_normalizer(normalizer, reduction)
    ce = CEParams(
        int(ignore_index),
        reduction,
        eps,
        _check_z_loss(z_loss),
        _check_softcap(softcap),
        impl=kernel,
    )
    chunk = _check_chunk_size(chunk_size)
    flat_target = target.reshape(-1).long()  # int64: no wrap-around against ignore_index
    _check_target_range(flat_target, linear_weight.shape[0], ignore_index)
    if impl == "reference":
        return linear_cross_entropy_reference(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=eps,
            z_loss=z_loss,
            softcap=softcap,
            normalizer=norm,
            token_weight=token_weight,
        )
    opts = LCEParams(
        ce,
        flat_target,
        None if weight is None else weight.detach(),
        None if token_weight is None else token_weight.detach().reshape(-1),
        norm,
        chunk,
    )
    loss = _LinearCrossEntropy.apply(
        input.reshape(-1, input.shape[-1]), linear_weight, linear_bias, opts
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
