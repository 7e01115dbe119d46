"""The chunk walker over ``hidden × head weight``: every output-layer loss from hidden states.

A language model's head maps ``M`` hidden states of width ``H`` to ``M × V`` logits. For
``V = 128k`` and ``M = 8k`` tokens those logits (and their gradient) take 4 GiB each in fp32, far
more than the weights. :func:`linear_walk` goes through the tokens in chunks; per chunk it

1. forms the raw logits ``z = X_c Wᵀ + b`` (``n × V``, the only large buffer),
2. hands them to a **row kernel**, which returns per-row results and, when asked, writes
   ``∂L/∂z`` over them (or into a second buffer),
3. accumulates ``∂L/∂X_c = (∂L/∂z) W``, ``∂L/∂W += (∂L/∂z)ᵀ X_c`` (fp32) and
   ``∂L/∂b += Σ_rows ∂L/∂z``,

so a scalar loss is finished, gradients included, by the end of the forward: 6·M·H·V flops and
one chunk of logits of memory. The walker knows nothing of the loss: cross-entropy is one row
kernel (:class:`xent._engine.rows.CrossEntropyRows`), log-probabilities or a divergence are others.

The row-kernel contract
-----------------------
A row kernel is a callable ``kernel(z, rows, grad_out) -> tuple[Tensor, ...]``, built once per
call with everything per-token it needs (targets, upstream coefficients ``c_i``, saved
statistics, options):

* ``z``: ``(n, V)`` raw logits of the chunk's tokens in the compute dtype (fp32; fp64 for fp64
  inputs), rows contiguous. The kernel applies its own transform (soft-cap, scale, temperature)
  with the chain rule in its gradient. It may overwrite ``z`` only when ``grad_out is z``.
* ``rows``: which of the call's ``M`` tokens these are: a ``slice``, or an int64 index tensor
  when skipped tokens were dropped. The kernel indexes its per-token inputs with it.
* ``grad_out``: None (no gradient wanted), or an ``(n, V)`` buffer (``z`` itself, or a separate
  bf16 buffer on the tensor-core path) that must be entirely written with ``Σ_i ∂L/∂z_i`` for
  the coefficients the kernel was built with.
* returns ``num_outputs`` per-row tensors of shape ``(n,)``; the walker stores them at the
  chunk's positions.
* with vocabulary parallelism (``parallel``), ``z`` is this rank's slice of the vocabulary; a
  parallel-aware kernel does its collectives inside the call (every rank walks the same chunks,
  since the chunk size depends on the global vocabulary only).

Precision: the logits and all statistics are fp32 (fp64 for fp64). ``∂L/∂z`` is fp32 too, except
on the bf16 tensor-core path (:func:`fp32_out_gemms`), where the kernel writes it in bf16, the
operand the products read; the products accumulate in fp32 either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from xent._engine import policy
from xent._numerics import compute_dtype

if TYPE_CHECKING:
    from xent._engine.parallel import VocabParallel

# Tokens per chunk when ``chunk_tokens`` is not given: at least CHUNK_MIN_TOKENS (the row count
# at which the chunk's matrix products run near their best speed), as long as their fp32 logits
# stay within CHUNK_BYTES_MAX; more if CHUNK_BYTES holds more (small vocabularies). Measured with
# linear_cross_entropy fwd+bwd at N = 4096, H = 512, V = 32 000, fp32, 2 threads:
#   2-core AVX2 AMD EPYC (Zen 3): 384-row chunks ran the products at 49–66 GFLOP/s, 1024-row
#   chunks at 94–124 GFLOP/s (1.9× faster);
#   2-core AVX-512 Intel Xeon: 384 rows 259, 1024 rows 266, 2048 rows 239 GFLOP/s (within noise
#   of ±15 %), 128 rows 63.
# So 1024 tokens: near the best on both kinds, at 125 MiB of fp32 logits for V = 32k and 256 MiB
# from V = 64k on (512 tokens at V = 128k). ``chunk_size=`` trades that memory for speed.
CHUNK_MIN_TOKENS = 1024
CHUNK_BYTES = 48 << 20
CHUNK_BYTES_MAX = 256 << 20
# On GPUs the products need far more rows to fill the tensor cores, and memory is plentiful: 512
# MiB of logits (and, on the bf16 path, their bf16 gradient) is ~680 tokens at V = 128k. Not yet
# tuned on a GPU.
CHUNK_BYTES_CUDA = 512 << 20


class RowKernel(Protocol):
    """See the module docstring: the contract every row kernel meets."""

    def __call__(
        self, z: torch.Tensor, rows: slice | torch.Tensor, grad_out: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]: ...


def tokens_per_chunk(
    vocab: int, device: torch.device, bytes_per_logit: int, *, min_tokens: int = CHUNK_MIN_TOKENS
) -> int:
    """Tokens per chunk at ``bytes_per_logit`` (4 for the fp32 logits; 6 with a bf16 copy of
    their gradient): on CUDA as many as :data:`CHUNK_BYTES_CUDA` holds; elsewhere
    ``min_tokens`` (:data:`CHUNK_MIN_TOKENS`) within :data:`CHUNK_BYTES_MAX`, or more when
    :data:`CHUNK_BYTES` holds more. A loss whose memory budget matters more than the last 15 %
    of product speed passes ``min_tokens=1`` (the CHUNK_BYTES budget alone)."""
    row = bytes_per_logit * max(vocab, 1)
    if device.type == "cuda":
        return max(1, CHUNK_BYTES_CUDA // row)
    return max(1, CHUNK_BYTES // row, min(min_tokens, CHUNK_BYTES_MAX // row))


# --------------------------------------------------------------------------------------------
# Products with fp32 outputs
# --------------------------------------------------------------------------------------------

_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()
# Whether `addmm(acc, a, b, out_dtype=fp32, out=acc)` accepts an fp32 `acc` with bf16 `a`, `b`
# (it does in recent torch; earlier versions wanted `acc` in bf16). Learnt on first use.
_FP32_ACCUMULATE: list[bool] = [True]


def fp32_out_gemms(x: torch.Tensor) -> bool:
    """Whether bf16 products here can write fp32 results directly.

    ``torch.mm(a, b, out_dtype=torch.float32)`` (CUDA, torch ≥ 2.8) runs a bf16 product on the
    tensor cores with fp32 accumulators and stores them unrounded. Then the logits, ``∂L/∂X``
    and the running ``∂L/∂W`` are fp32 while every product reads bf16: no fp32 (or TF32) GEMM
    and no widening copy of a chunk. Elsewhere bf16 takes the portable path.
    """
    return x.dtype == torch.bfloat16 and x.is_cuda and _HAS_OUT_DTYPE


def mm_fp32(
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
        if fp32_out_gemms(x):
            return mm_fp32(x, w.t(), out, bias=b)
        # Half-precision product, then one widening copy.
        return out.copy_(torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()))
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------


def linear_walk(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    kernel: RowKernel,
    *,
    num_outputs: int,
    need: tuple[bool, bool, bool] = (False, False, False),
    skip: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    parallel: VocabParallel | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run ``kernel`` over the logits of ``x @ w.T + b``, chunk by chunk, never all at once.

    Args:
        x: ``(M, H)`` hidden states (fp32, bf16, fp16 or fp64).
        w: ``(V, H)`` head weight (this rank's slice with ``parallel``), ``x``'s dtype.
        b: ``(V)`` head bias or None.
        kernel: the row kernel (module docstring).
        num_outputs: how many per-row results ``kernel`` returns.
        need: which of ``∂x``, ``∂w``, ``∂b`` to form; when any is, the kernel writes ``∂L/∂z``.
        skip: ``(M)`` bool, tokens that count for nothing (ignored targets). They are dropped
            before any product (:func:`policy.drop_ignored`) or, while a CUDA graph is being
            captured, computed with zeroed hidden states, so whatever their rows hold (even
            NaN padding) adds exactly nothing to ``∂W`` and ``∂b``; the kernel must give them a
            zero coefficient.
        keep: ``(K)`` int64 indices of the tokens to compute, instead of ``skip``.
        chunk_tokens: tokens per chunk; default :func:`tokens_per_chunk` of the global
            vocabulary.
        parallel: vocabulary parallelism: ``∂x`` is all-reduced over ``parallel.group`` at
            the end (the input feeds every rank's slice).

    Returns:
        ``(outputs, ∂x, ∂w, ∂b)``: the kernel's per-row results, each ``(M,)`` (0 on tokens
        not computed), and the gradients in the compute dtype (None where not needed): ``∂x``
        ``(M, H)`` with zero rows for dropped tokens, ``∂w`` ``(V, H)`` and ``∂b`` ``(V)``, both
        accumulated in fp32 over all chunks.
    """
    num_tokens, vocab = x.shape[0], w.shape[0]
    cdtype = compute_dtype(x.dtype)
    need_x, need_w, need_b = need
    wants_grad = need_x or need_w or need_b
    zeroed = None
    if keep is None and skip is not None:
        if policy.drop_ignored(skip):
            kept = (~skip).nonzero().squeeze(1)
            keep = None if kept.numel() == num_tokens else kept
        elif wants_grad:
            zeroed = skip[:, None]
    n_kept = num_tokens if keep is None else keep.numel()

    make = torch.empty if keep is None else torch.zeros
    outputs = tuple(make(num_tokens, dtype=cdtype, device=x.device) for _ in range(num_outputs))
    # ∂L/∂X in the compute dtype (fp32 for half inputs), rounded only after backward applies
    # the upstream factor: fp16's narrow range would otherwise flush small entries to zero.
    grad_x = make(x.shape, dtype=cdtype, device=x.device) if need_x else None
    # ∂L/∂W is a sum over all tokens: accumulate it in fp32 whatever the weight's dtype. The
    # first chunk overwrites it, so it starts uninitialised; an empty batch zeroes it.
    grad_w = torch.empty(w.shape, dtype=cdtype, device=w.device) if need_w else None
    if grad_w is not None and n_kept == 0:
        grad_w.zero_()
    grad_b = torch.zeros(vocab, dtype=cdtype, device=w.device) if need_b else None
    tensor_cores = fp32_out_gemms(x)
    w_fp32 = w.to(cdtype) if need_x and w.dtype == torch.float16 else None
    split = tensor_cores and wants_grad  # ∂L/∂z in its own bf16 buffer
    if chunk_tokens is None:
        chunk_tokens = tokens_per_chunk(
            vocab if parallel is None else parallel.vocab, x.device, 6 if split else 4
        )
    # One buffer per chunk-sized array for all chunks: allocated once per call, not per chunk.
    size = (min(chunk_tokens, n_kept), vocab)
    logits = torch.empty(size, dtype=cdtype, device=x.device)
    dlogits = torch.empty(size, dtype=x.dtype, device=x.device) if split else logits
    for start in range(0, n_kept, chunk_tokens):
        stop = min(start + chunk_tokens, n_kept)
        rows = slice(start, stop) if keep is None else keep[start:stop]
        xs = x[rows]
        if zeroed is not None:
            xs = xs.masked_fill(zeroed[rows], 0.0)
        z = _chunk_logits(xs, w, b, logits[: stop - start])
        dz = dlogits[: stop - start] if wants_grad else None  # over z itself, or bf16
        results = kernel(z, rows, dz)
        for out, res in zip(outputs, results, strict=True):
            out[rows] = res
        if dz is None:
            continue
        if grad_x is not None:
            if tensor_cores and keep is None:
                mm_fp32(dz, w, grad_x[rows])
            else:
                if tensor_cores:
                    dx = mm_fp32(dz, w, torch.empty_like(xs, dtype=cdtype))
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
                mm_fp32(dz.t(), xs, grad_w, accumulate=start > 0)
            else:
                grad_w.addmm_(dz.t(), xs if xs.dtype == cdtype else xs.to(cdtype), beta=start > 0)
        if grad_b is not None:
            grad_b += dz.sum(dim=0, dtype=cdtype)
    if grad_x is not None and parallel is not None:
        parallel.all_reduce_sum(grad_x)
    return outputs, grad_x, grad_w, grad_b
