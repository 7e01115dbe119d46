"""Triton kernels for the one-pass cross-entropy, and the device-side scaling of its gradient.

The contract is that of :func:`xent._engine.torch_rows.cross_entropy_pass` (same arguments,
same results), so the dispatcher (:func:`xent._engine.dispatch.row_pass`) switches backends by
choosing which of the two functions to call. Imported only when ``impl="triton"`` is used; with
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (that is how they are tested without a
GPU; ``tests/engine/test_triton_compile.py`` compiles them for real GPUs ahead of time).

**The pass.** A persistent grid: each program walks rows ``pid, pid + P, …``. Per row:

* pass 1, block by block: the running max ``m`` and the sum of exponentials rescaled whenever
  the max grows (``s ← s·e^{m_old - m_new} + Σ e^{z - m_new}``: an *online* log-sum-exp, so the row
  is never held whole), the target logit and, for label smoothing, ``Σ_c w_c (z_c - m)``, moved
  to each new max as it grows (``+ (m_old - m_new) Σ_{c seen} w_c``; every term is ``≤ 0``, so
  nothing cancels);
* pass 2 (only when a gradient is wanted): ``∂l/∂z_j = c (p_j A - B_j)`` with
  ``p = e^{z - m} / s``, written in the output dtype, straight over the logits if asked (in place).

Every loss and gradient is formed relative to the row max (``l = (1 - ε) w_y (log s - (z_y - m))
+ …``), never as ``lse - z_y``, which cancels for logits far from 0; the statistics kept for a
later pass are ``(m, log s)``, not ``lse`` (see :mod:`xent._engine.torch_rows`).

Probability targets (a second ``M × C`` input ``q``) have their own kernel of the same shape,
which also writes ``∂l/∂q`` when the target requires a gradient. The algebra (``A``, ``B``,
z-loss, soft-capping, probability targets) is the one derived in :mod:`xent._engine.torch_rows`.

**Memory traffic.** Pass 2 re-reads the row; it should come from L2, not HBM. Three things make
it so. The number of programs ``P`` (rows in flight) is bounded so that ``P`` rows fill at most
:data:`L2_SHARE` of the L2 cache (but at least one program per SM): for ``V = 128 256`` bf16 rows
(256 KiB) on an H100 (132 SMs, 50 MB of L2) that is one program per SM, ~33 MB in flight, where
a grid of one program per row keeps ~800 rows (200 MB) in flight and pass 2 misses. Pass 2
walks the row's blocks in reverse, so the blocks pass 1 read last (the likeliest still cached)
are re-read first. Pass 1 loads with ``evict_last``, pass 2 loads with ``evict_first`` and the
gradient is stored with ``evict_first``, so the streamed gradient does not push the rows out.
Bytes moved per logit, ``b`` the logits' element size (2 for bf16), when pass 2 hits L2:

======================================  ============  =========================
path                                    HBM bytes     bf16 (per logit)
======================================  ============  =========================
forward only (no gradient wanted)       ``b``         2
forward + gradient (scalar loss)        ``2b``        4 (in place or not)
backward scaling by ``g == 1``          0             0 (:func:`scale_unless_one_`)
backward scaling by ``g != 1``          ``2b``        4
``"none"``: forward, then backward      ``b + 2b``    6 (backward reads once, writes once)
probability targets, both gradients     ``4b``        8 (reads x, q; writes ∂x, ∂q)
======================================  ============  =========================

In ``linear_cross_entropy`` each chunk's fp32 logits are read once (4 bytes) and, on the bf16
tensor-core path, ``∂logits`` written once in bf16 (2 bytes); the logits themselves come from the
product, not from a copy. Where pass 2 misses L2, add ``b`` per logit to every gradient-forming
row. In place or not moves the same bytes (in place saves the allocation, not the traffic).

**Vector loads at any alignment.** Variants are not keyed on alignment (every pointer is in
``do_not_specialize_on_alignment``, every integer in ``do_not_specialize``), so chunk slices at
any offset reuse one compiled kernel. Each row instead finds its own first 16-byte boundary: a
masked head of fewer than 16 bytes, a mask-free main loop of whole blocks from there (16-byte
vector loads, asserted by the compile test), a tail of whole vectors masked per vector (vector
loads too) and a scalar tail of fewer than 16 bytes. The gradient and the other row
inputs are declared aligned only when they share the logits' boundary (e.g. contiguous buffers of
one dtype); otherwise their accesses are scalar (still coalesced).

**Launches.** Under the logits' device; every tensor argument must be on it (a RuntimeError
naming the argument otherwise: a CPU class weight is *not* copied per call, which would wait
for the host and break CUDA-graph capture; move it once with ``weight.to(logits.device)``).
Offsets are int64 (``row * stride`` overflows int32 past 2³¹ elements), the grid never exceeds
:data:`GRID_LIMIT` programs whatever the number of rows, ``V = 0`` returns a zero loss,
``m = 0`` and ``log s = -inf`` without launching, and float8-e4m3 logits on GPUs before sm_89
raise a TypeError.
Nothing is read back to the host, so a launch can be captured in a CUDA graph; compile the
variants before capturing, with :func:`warm_up`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from xent._engine.options import CEParams

# Columns per block: the whole row up to this size (fewest passes), and the warps to run it.
# Block sizes are powers of two. 4096 columns on 16 warps (8 per thread: one 16-byte vector of
# bf16) compiles without spills for sm_80, sm_90a and sm_100a (at most 128 registers, the cap at
# 16 warps; from the compile test); on 8 warps the same block spilled on sm_90a. (Tests lower
# MAX_BLOCK to exercise many blocks per row.) Not yet tuned on a GPU: benchmarks/run_gpu.sh
# sweeps these constants.
MAX_BLOCK = 4096
WARPS = {1024: 4, 2048: 8, 4096: 16}
# At most this many programs on grid axis 0 (CUDA's limit); rows beyond it are looped over.
GRID_LIMIT = 2**31 - 1
# Fraction of the L2 cache the rows in flight may fill, so that pass 2 re-reads them from L2.
L2_SHARE = 0.5
# Programs per SM when rows are short enough that L2 does not bound them (enough warps in flight
# to cover memory latency: 4 × 8 warps).
PROGRAMS_PER_SM = 4
# Elements per block of the scaling kernel (each program loops over blocks).
SCALE_BLOCK = 4096

_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    }
)


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits ±1 when e^{2u} overflows to inf or underflows.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _aligned_head(ptr, n, ELEM: tl.constexpr):
    """Elements before ``ptr``'s first 16-byte boundary (at most ``n``)."""
    addr = ptr.to(tl.int64, bitcast=True)
    return tl.minimum((((addr + 15) // 16) * 16 - addr) // ELEM, n)


@triton.jit
def _aligned(ptr, head):
    """``ptr + head``, declared 16-byte aligned (the caller has checked that it is).

    Rebuilt from its address, rounded up to a multiple of 16 (a no-op there) and hinted on both
    the integer and the pointer: the compiler's alignment analysis loses a hint given only on
    ``ptr + head`` (checked in the PTX by the compile test: 16-byte vector loads).
    """
    ELEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    addr = ptr.to(tl.int64, bitcast=True) + head * ELEM
    addr = tl.multiple_of((addr + 15) // 16 * 16, 16)
    return tl.multiple_of(addr.to(ptr.dtype, bitcast=True), 16)


@triton.jit
def _is_aligned(ptr, head, ELEM: tl.constexpr):
    """Whether ``ptr + head`` lies on a 16-byte boundary."""
    return (ptr.to(tl.int64, bitcast=True) + head * ELEM) % 16 == 0


@triton.jit
def _online_lse(z, m, s):
    """Fold a block of (softcapped) logits into the running max ``m`` and ``s = Σ e^{z - m}``."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # An all -inf row so far is shifted by 0: exp(-inf - 0) = 0, never -inf - (-inf).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)


@triton.jit
def _ce_stats_block(
    x_ptr, w_ptr, mask, m, s, wz, w_seen, softcap, MASKED, HAS_WEIGHT, HAS_SOFTCAP, SMOOTH, ACC
):
    """Pass 1 on one block: ``m``, ``s`` and (smoothing) ``Σ w_c (z_c - m)`` over the columns
    seen so far, with ``Σ w_c`` over them (to move the sum to a new max)."""
    if MASKED:
        z = tl.load(x_ptr, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    else:
        z = tl.load(x_ptr, eviction_policy="evict_last").to(ACC)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    if MASKED:
        z = tl.where(mask, z, float("-inf"))  # lanes past the row end take no part
    old_shift = tl.where(m == float("-inf"), 0.0, m)
    m, s = _online_lse(z, m, s)
    if SMOOTH:
        shift = tl.where(m == float("-inf"), 0.0, m)
        d = z - shift
        wv = tl.full(z.shape, 1.0, ACC)
        if HAS_WEIGHT:
            if MASKED:
                wv = tl.load(w_ptr, mask=mask, other=0.0).to(ACC)
            else:
                wv = tl.load(w_ptr).to(ACC)
        if MASKED:
            d = tl.where(mask, d, 0.0)
            wv = tl.where(mask, wv, 0.0)
        # The earlier columns move from the old max to the new one: both terms are ≤ 0.
        wz = wz + (old_shift - shift) * w_seen + tl.sum(d * wv, axis=0)
        w_seen += tl.sum(wv, axis=0)
    return m, s, wz, w_seen


@triton.jit
def _ce_grad_block(
    x_ptr,
    g_ptr,
    w_ptr,
    cols,
    mask,
    y_safe,
    a,
    b_y,
    b_eps,
    shift,
    softcap,
    MASKED,
    HAS_WEIGHT,
    HAS_SOFTCAP,
    SMOOTH,
    ACC,
):
    """Pass 2 on one block: ``∂l/∂x = (p A - B) (∂z/∂x)`` times the row coefficient, with
    ``p A = e^{z - m} (A / s)`` (``shift`` is ``m``; ``a`` is ``c A / s``)."""
    if MASKED:
        x = tl.load(x_ptr, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    else:
        x = tl.load(x_ptr, eviction_policy="evict_first").to(ACC)
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    g = tl.exp(z - shift) * a
    g -= tl.where(cols == y_safe, b_y, 0.0)
    if SMOOTH:
        if HAS_WEIGHT:
            if MASKED:
                g -= b_eps * tl.load(w_ptr, mask=mask, other=0.0).to(ACC)
            else:
                g -= b_eps * tl.load(w_ptr).to(ACC)
        else:
            g -= b_eps
    if HAS_SOFTCAP:
        g *= 1.0 - t * t  # ∂z/∂x through z = s·tanh(x/s)
    g = g.to(g_ptr.dtype.element_ty)
    if MASKED:
        tl.store(g_ptr, g, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(g_ptr, g, eviction_policy="evict_first")


@triton.jit
def _ce_grad_row(
    x_row,
    xa,
    g_row,
    ga,
    W,
    V,
    head,
    n_full,
    vend,
    y_safe,
    a,
    b_y,
    b_eps,
    shift,
    softcap,
    HAS_WEIGHT,
    HAS_SOFTCAP,
    SMOOTH,
    ACC,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
):
    """Pass 2 over a row, in the reverse of pass 1's order (so the blocks read most recently,
    the likeliest still in cache, are re-read first): the scalar tail, the vector tail, the
    mask-free blocks from the last, the head. See :func:`_ce_row_kernel` for the segments."""
    hc = tl.arange(0, HEAD)
    offs = tl.arange(0, BLOCK)
    cols = head + vend + hc
    _ce_grad_block(
        x_row + cols,
        g_row + cols,
        W + cols,
        cols,
        cols < V,
        y_safe,
        a,
        b_y,
        b_eps,
        shift,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        SMOOTH,
        ACC,
    )
    rel = n_full * BLOCK + offs
    _ce_grad_block(
        xa + rel,
        ga + rel,
        W + head + rel,
        head + rel,
        rel < vend,
        y_safe,
        a,
        b_y,
        b_eps,
        shift,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        SMOOTH,
        ACC,
    )
    for i in range(0, n_full):
        rel = (n_full - 1 - i) * BLOCK + offs
        _ce_grad_block(
            xa + rel,
            ga + rel,
            W + head + rel,
            head + rel,
            None,
            y_safe,
            a,
            b_y,
            b_eps,
            shift,
            softcap,
            False,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            SMOOTH,
            ACC,
        )
    _ce_grad_block(
        x_row + hc,
        g_row + hc,
        W + hc,
        hc,
        hc < head,
        y_safe,
        a,
        b_y,
        b_eps,
        shift,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        SMOOTH,
        ACC,
    )


@triton.jit(
    do_not_specialize=[
        "stride_x",
        "stride_g",
        "n_rows",
        "V",
        "ignore_index",
        "class_start",
        "n_classes",
    ],
    do_not_specialize_on_alignment=[
        "X",
        "T",
        "W",
        "W_Y",
        "W_SUM",
        "COEF",
        "LOSS",
        "MX",
        "LS",
        "G",
        "OPTS",
    ],
)
def _ce_row_kernel(
    X,
    stride_x,
    T,
    W,
    W_Y,
    W_SUM,
    COEF,
    LOSS,
    MX,
    LS,
    G,
    stride_g,
    OPTS,
    n_rows,
    V,
    ignore_index,
    class_start,
    n_classes,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
):
    """Index targets. ``MX`` and ``LS`` hold each row's ``m`` (the max, 0 for an all ``-inf``
    row) and ``log s``: written here, or read with ``HAS_STATS`` (a recomputing backward)."""
    eps = tl.load(OPTS).to(ACC)
    zeta = tl.load(OPTS + 1).to(ACC)
    softcap = tl.load(OPTS + 2).to(ACC)
    x_elem: tl.constexpr = X.dtype.element_ty.primitive_bitwidth // 8
    offs = tl.arange(0, BLOCK)
    hc = tl.arange(0, HEAD)
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = r + tl.zeros((), tl.int64)  # int64 offsets from here (loop variables may be ints)
        x_row = X + row * stride_x
        # A row in four segments, so that all but two short ones load whole 16-byte vectors:
        # the head up to the first 16-byte boundary (< HEAD elements, masked); mask-free blocks
        # from there; the vector tail, whole vectors of the rest (masked per vector); the
        # scalar tail (< HEAD elements, masked).
        head = _aligned_head(x_row, V, x_elem)
        n_full = (V - head) // BLOCK
        vend = (V - head) // HEAD * HEAD  # elements from the boundary in whole vectors
        xa = _aligned(x_row, head)
        # Targets are global class indices; the row holds classes [class_start, class_start + V)
        # of n_classes (all of them unless vocabulary-parallel). A target in another slice
        # weighs in A through w_y but puts no -B_y on this row.
        y = tl.load(T + row).to(tl.int64)
        valid = y != ignore_index
        y_loc = y - class_start
        mine = valid & (y_loc >= 0) & (y_loc < V)
        y_safe = tl.where(mine, y_loc, 0)
        z_y = tl.load(x_row + y_safe).to(ACC)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)
        w_y = 1.0
        w_sum = n_classes * 1.0
        if HAS_WEIGHT:
            w_y = tl.load(W_Y + tl.where(valid, y, 0)).to(ACC)
            w_sum = tl.load(W_SUM).to(ACC)
        w_y = tl.where(valid, w_y, 0.0)

        if HAS_STATS:
            shift = tl.load(MX + row).to(ACC)
            log_s = tl.load(LS + row).to(ACC)
            s = tl.exp(log_s)
        else:
            m = tl.full((), float("-inf"), ACC)
            s = tl.zeros((), ACC)
            wz = tl.zeros((), ACC)
            w_seen = tl.zeros((), ACC)
            m, s, wz, w_seen = _ce_stats_block(
                x_row + hc,
                W + hc,
                hc < head,
                m,
                s,
                wz,
                w_seen,
                softcap,
                True,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                SMOOTH,
                ACC,
            )
            for start in range(0, n_full * BLOCK, BLOCK):
                m, s, wz, w_seen = _ce_stats_block(
                    xa + start + offs,
                    W + head + start + offs,
                    None,
                    m,
                    s,
                    wz,
                    w_seen,
                    softcap,
                    False,
                    HAS_WEIGHT,
                    HAS_SOFTCAP,
                    SMOOTH,
                    ACC,
                )
            rel = n_full * BLOCK + offs
            m, s, wz, w_seen = _ce_stats_block(
                xa + rel,
                W + head + rel,
                rel < vend,
                m,
                s,
                wz,
                w_seen,
                softcap,
                True,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                SMOOTH,
                ACC,
            )
            cols = head + vend + hc
            m, s, wz, w_seen = _ce_stats_block(
                x_row + cols,
                W + cols,
                cols < V,
                m,
                s,
                wz,
                w_seen,
                softcap,
                True,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                SMOOTH,
                ACC,
            )
            shift = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            lse = shift + log_s  # the z-loss only
            # Relative to the max: log s - (z_y - m), never lse - z_y (which cancels).
            loss = (1.0 - eps) * w_y * (log_s - (z_y - shift)) + zeta * lse * lse
            if SMOOTH:
                loss += (eps / n_classes) * (log_s * w_sum - wz)
            tl.store(LOSS + row, tl.where(valid, loss, 0.0))
            tl.store(MX + row, shift)
            tl.store(LS + row, log_s)

        if WRITE_GRAD:
            c = tl.load(COEF + row).to(ACC)
            a = c * ((1.0 - eps) * w_y + zeta * 2.0 * (shift + log_s))
            if SMOOTH:
                a += c * (eps / n_classes) * w_sum
            a = a / s  # p A = e^{z - m} (A / s)
            b_y = tl.where(mine, c * (1.0 - eps) * w_y, 0.0)
            b_eps = c * (eps / n_classes)
            g_row = G + row * stride_g
            g_elem: tl.constexpr = G.dtype.element_ty.primitive_bitwidth // 8
            if _is_aligned(g_row, head, g_elem):  # the gradient shares the row's boundary
                ga = _aligned(g_row, head)
                _ce_grad_row(
                    x_row,
                    xa,
                    g_row,
                    ga,
                    W,
                    V,
                    head,
                    n_full,
                    vend,
                    y_safe,
                    a,
                    b_y,
                    b_eps,
                    shift,
                    softcap,
                    HAS_WEIGHT,
                    HAS_SOFTCAP,
                    SMOOTH,
                    ACC,
                    BLOCK,
                    HEAD,
                )
            else:
                _ce_grad_row(
                    x_row,
                    xa,
                    g_row,
                    g_row + head,
                    W,
                    V,
                    head,
                    n_full,
                    vend,
                    y_safe,
                    a,
                    b_y,
                    b_eps,
                    shift,
                    softcap,
                    HAS_WEIGHT,
                    HAS_SOFTCAP,
                    SMOOTH,
                    ACC,
                    BLOCK,
                    HEAD,
                )


@triton.jit
def _prob_stats_block(
    x_ptr,
    q_ptr,
    w_ptr,
    mask,
    m,
    s,
    shift,
    big_s,
    wqz,
    eps,
    eps_v,
    softcap,
    MASKED,
    HAS_WEIGHT,
    HAS_SOFTCAP,
    HAS_STATS,
    ACC,
):
    """Pass 1 of the probability kernel on one block (see :func:`_ce_prob_row_kernel`)."""
    if MASKED:
        q = tl.load(q_ptr, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    else:
        q = tl.load(q_ptr, eviction_policy="evict_last").to(ACC)
    wq = q * (1.0 - eps) + eps_v
    if HAS_WEIGHT:
        if MASKED:
            wq *= tl.load(w_ptr, mask=mask, other=0.0).to(ACC)
        else:
            wq *= tl.load(w_ptr).to(ACC)
    if MASKED:
        wq = tl.where(mask, wq, 0.0)
    if not HAS_STATS:
        if MASKED:
            z = tl.load(x_ptr, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
        else:
            z = tl.load(x_ptr, eviction_policy="evict_last").to(ACC)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        zm = z
        if MASKED:
            zm = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        # An all -inf row so far is shifted by 0: exp(-inf - 0) = 0, never -inf - (-inf).
        new_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - new_shift) + tl.sum(tl.exp(zm - new_shift), axis=0)
        # Earlier blocks move to the new reference; masked lanes add wq·z = 0.
        wqz += (shift - new_shift) * big_s + tl.sum(wq * (z - new_shift), axis=0)
        m, shift = m_new, new_shift
    big_s += tl.sum(wq, axis=0)
    return m, s, shift, big_s, wqz


@triton.jit
def _prob_grad_block(
    x_ptr,
    q_ptr,
    w_ptr,
    g_ptr,
    gq_ptr,
    mask,
    a,
    c,
    eps,
    eps_v,
    shift,
    log_s,
    softcap,
    MASKED,
    HAS_WEIGHT,
    HAS_SOFTCAP,
    WRITE_GRAD,
    WRITE_QGRAD,
    ACC,
):
    """Pass 2 of the probability kernel on one block: ``∂l/∂x`` and ``∂l/∂q``, relative to the
    max (``shift``): ``p A = e^{z - m} (A / s)`` (``a`` is ``c A / s``) and
    ``z - lse = (z - m) - log s``."""
    if MASKED:
        x = tl.load(x_ptr, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    else:
        x = tl.load(x_ptr, eviction_policy="evict_first").to(ACC)
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    w = 1.0
    if HAS_WEIGHT:
        if MASKED:
            w = tl.load(w_ptr, mask=mask, other=0.0).to(ACC)
        else:
            w = tl.load(w_ptr).to(ACC)
    if WRITE_QGRAD:
        gq = (-(1.0 - eps) * c * w * ((z - shift) - log_s)).to(gq_ptr.dtype.element_ty)
        if MASKED:
            tl.store(gq_ptr, gq, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(gq_ptr, gq, eviction_policy="evict_first")
    if WRITE_GRAD:
        if MASKED:
            q = tl.load(q_ptr, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        else:
            q = tl.load(q_ptr, eviction_policy="evict_first").to(ACC)
        g = tl.exp(z - shift) * a - c * w * (q * (1.0 - eps) + eps_v)
        if HAS_SOFTCAP:
            g *= 1.0 - t * t
        g = g.to(g_ptr.dtype.element_ty)
        if MASKED:
            tl.store(g_ptr, g, mask=mask, eviction_policy="evict_first")
        else:
            tl.store(g_ptr, g, eviction_policy="evict_first")


@triton.jit
def _prob_row(
    x_row,
    q_row,
    g_row,
    gq_row,
    W,
    V,
    head,
    shift_in,
    log_s_in,
    eps,
    zeta,
    softcap,
    LOSS,
    MX,
    LS,
    row,
    COEF,
    HINT: tl.constexpr,
    HAS_WEIGHT,
    HAS_SOFTCAP,
    HAS_STATS,
    WRITE_GRAD,
    WRITE_QGRAD,
    ACC,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
):
    """One row of the probability kernel: head, mask-free blocks, vector and scalar tails in
    pass 1, then the same in reverse in pass 2. With ``HINT`` every row pointer shares the
    logits' 16-byte boundary and is declared so."""
    eps_v = eps / V  # in the compute dtype (1.0 / V would be fp32)
    n_full = (V - head) // BLOCK
    vend = (V - head) // HEAD * HEAD  # the segments of :func:`_ce_row_kernel`
    offs = tl.arange(0, BLOCK)
    hc = tl.arange(0, HEAD)
    xa = _aligned(x_row, head)
    if HINT:
        qa = _aligned(q_row, head)
        ga = _aligned(g_row, head)
        gqa = _aligned(gq_row, head)
    else:
        qa, ga, gqa = q_row + head, g_row + head, gq_row + head
    wa = W + head

    # Pass 1: S always (it enters the gradient); unless (m, log s) are given, the running max m, the
    # sum s = Σ e^{z - m} and Σ w q' (z - m), kept relative to the running max so that the loss
    # log(s)·S - Σ w q' (z - m) never subtracts two large numbers (logits far from 0).
    big_s = tl.zeros((), ACC)
    wqz = tl.zeros((), ACC)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    shift = tl.zeros((), ACC)
    m, s, shift, big_s, wqz = _prob_stats_block(
        x_row + hc,
        q_row + hc,
        W + hc,
        hc < head,
        m,
        s,
        shift,
        big_s,
        wqz,
        eps,
        eps_v,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        HAS_STATS,
        ACC,
    )
    for start in range(0, n_full * BLOCK, BLOCK):
        m, s, shift, big_s, wqz = _prob_stats_block(
            xa + start + offs,
            qa + start + offs,
            wa + start + offs,
            None,
            m,
            s,
            shift,
            big_s,
            wqz,
            eps,
            eps_v,
            softcap,
            False,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            HAS_STATS,
            ACC,
        )
    rel = n_full * BLOCK + offs
    m, s, shift, big_s, wqz = _prob_stats_block(
        xa + rel,
        qa + rel,
        wa + rel,
        rel < vend,
        m,
        s,
        shift,
        big_s,
        wqz,
        eps,
        eps_v,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        HAS_STATS,
        ACC,
    )
    cols = head + vend + hc
    m, s, shift, big_s, wqz = _prob_stats_block(
        x_row + cols,
        q_row + cols,
        W + cols,
        cols < V,
        m,
        s,
        shift,
        big_s,
        wqz,
        eps,
        eps_v,
        softcap,
        True,
        HAS_WEIGHT,
        HAS_SOFTCAP,
        HAS_STATS,
        ACC,
    )
    if HAS_STATS:
        shift = shift_in
        log_s = log_s_in
        s = tl.exp(log_s)
    else:
        log_s = tl.log(s)  # lse - shift
        lse = shift + log_s  # the z-loss only
        tl.store(LOSS + row, log_s * big_s - wqz + zeta * lse * lse)
        tl.store(MX + row, shift)
        tl.store(LS + row, log_s)

    if WRITE_GRAD or WRITE_QGRAD:
        c = tl.load(COEF + row).to(ACC)
        a = c * (big_s + zeta * 2.0 * (shift + log_s)) / s
        _prob_grad_block(
            x_row + cols,
            q_row + cols,
            W + cols,
            g_row + cols,
            gq_row + cols,
            cols < V,
            a,
            c,
            eps,
            eps_v,
            shift,
            log_s,
            softcap,
            True,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            WRITE_GRAD,
            WRITE_QGRAD,
            ACC,
        )
        rel = n_full * BLOCK + offs
        _prob_grad_block(
            xa + rel,
            qa + rel,
            wa + rel,
            ga + rel,
            gqa + rel,
            rel < vend,
            a,
            c,
            eps,
            eps_v,
            shift,
            log_s,
            softcap,
            True,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            WRITE_GRAD,
            WRITE_QGRAD,
            ACC,
        )
        for i in range(0, n_full):
            start = (n_full - 1 - i) * BLOCK
            _prob_grad_block(
                xa + start + offs,
                qa + start + offs,
                wa + start + offs,
                ga + start + offs,
                gqa + start + offs,
                None,
                a,
                c,
                eps,
                eps_v,
                shift,
                log_s,
                softcap,
                False,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                WRITE_GRAD,
                WRITE_QGRAD,
                ACC,
            )
        _prob_grad_block(
            x_row + hc,
            q_row + hc,
            W + hc,
            g_row + hc,
            gq_row + hc,
            hc < head,
            a,
            c,
            eps,
            eps_v,
            shift,
            log_s,
            softcap,
            True,
            HAS_WEIGHT,
            HAS_SOFTCAP,
            WRITE_GRAD,
            WRITE_QGRAD,
            ACC,
        )


@triton.jit(
    do_not_specialize=["stride_x", "stride_q", "stride_g", "stride_gq", "n_rows", "V"],
    do_not_specialize_on_alignment=[
        "X",
        "Q",
        "W",
        "COEF",
        "LOSS",
        "MX",
        "LS",
        "G",
        "GQ",
        "OPTS",
    ],
)
def _ce_prob_row_kernel(
    X,
    stride_x,
    Q,
    stride_q,
    W,
    COEF,
    LOSS,
    MX,
    LS,
    G,
    stride_g,
    GQ,
    stride_gq,
    OPTS,
    n_rows,
    V,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_QGRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD: tl.constexpr,
):
    """Probability targets ``q``: with ``q' = (1 - ε) q + ε/V`` and ``S = Σ_c w_c q'_c``,

    ``l = log s · S - Σ_c w_c q'_c (z_c - m) + ζ lse²``, ``∂l/∂z_j = p_j (S + 2ζ lse) - w_j q'_j``
    and ``∂l/∂q_c = -(1 - ε) w_c ((z_c - m) - log s)``, each gradient times the row's coefficient.
    ``MX`` and ``LS`` hold each row's ``m`` and ``log s``: written, or read with ``HAS_STATS``.
    """
    eps = tl.load(OPTS).to(ACC)
    zeta = tl.load(OPTS + 1).to(ACC)
    softcap = tl.load(OPTS + 2).to(ACC)
    x_elem: tl.constexpr = X.dtype.element_ty.primitive_bitwidth // 8
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = r + tl.zeros((), tl.int64)  # int64 offsets from here (loop variables may be ints)
        x_row = X + row * stride_x
        q_row = Q + row * stride_q
        head = _aligned_head(x_row, V, x_elem)
        same = _is_aligned(q_row, head, Q.dtype.element_ty.primitive_bitwidth // 8)
        # Absent outputs (None) come in as a copy of X: aligned with it by construction.
        g_row = X + row * stride_x
        gq_row = X + row * stride_x
        if WRITE_GRAD:
            g_row = G + row * stride_g
            same = same & _is_aligned(g_row, head, G.dtype.element_ty.primitive_bitwidth // 8)
        if WRITE_QGRAD:
            gq_row = GQ + row * stride_gq
            gq_elem: tl.constexpr = GQ.dtype.element_ty.primitive_bitwidth // 8
            same = same & _is_aligned(gq_row, head, gq_elem)
        shift_in = tl.zeros((), ACC)
        log_s_in = tl.zeros((), ACC)
        if HAS_STATS:
            shift_in = tl.load(MX + row).to(ACC)
            log_s_in = tl.load(LS + row).to(ACC)
        if same:
            _prob_row(
                x_row,
                q_row,
                g_row,
                gq_row,
                W,
                V,
                head,
                shift_in,
                log_s_in,
                eps,
                zeta,
                softcap,
                LOSS,
                MX,
                LS,
                row,
                COEF,
                True,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                HAS_STATS,
                WRITE_GRAD,
                WRITE_QGRAD,
                ACC,
                BLOCK,
                HEAD,
            )
        else:
            _prob_row(
                x_row,
                q_row,
                g_row,
                gq_row,
                W,
                V,
                head,
                shift_in,
                log_s_in,
                eps,
                zeta,
                softcap,
                LOSS,
                MX,
                LS,
                row,
                COEF,
                False,
                HAS_WEIGHT,
                HAS_SOFTCAP,
                HAS_STATS,
                WRITE_GRAD,
                WRITE_QGRAD,
                ACC,
                BLOCK,
                HEAD,
            )


@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["G", "F"])
def _scale_kernel(G, F, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``G *= F[0]``; every program returns at once when the factor is 1."""
    f = tl.load(F).to(ACC)
    if f != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
            tl.store(G + offs, (g * f).to(G.dtype.element_ty), mask=mask)


def _block_and_warps(vocab: int, max_block: int | None = None) -> tuple[int, int]:
    """Block and warps for rows of ``vocab`` columns (the probability kernel, with five row
    arrays live, takes half the block: at 4096 columns on 16 warps it spills on sm_90a)."""
    block = min(max_block or MAX_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    warps = next((w for limit, w in sorted(WARPS.items()) if block <= limit), 8)
    return block, warps


def rows_in_flight(row_bytes: int, sms: int, l2_bytes: int) -> int:
    """Programs of the persistent grid: as many rows as fit in :data:`L2_SHARE` of the L2
    cache, at least one program per SM, at most :data:`PROGRAMS_PER_SM` per SM."""
    by_l2 = int(L2_SHARE * l2_bytes) // max(row_bytes, 1)
    return max(sms, min(by_l2, PROGRAMS_PER_SM * sms))


def _programs(rows: int, row_bytes: int, device: torch.device) -> int:
    """Grid size for ``rows`` rows: bounded by L2 on a GPU, one per row otherwise."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows = min(
            rows, rows_in_flight(row_bytes, props.multi_processor_count, props.L2_cache_size)
        )
    return max(1, min(rows, GRID_LIMIT))


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the logits' one."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _check_args(x: torch.Tensor, what: str = "logits", **tensors: torch.Tensor | None) -> None:
    """``x``'s dtype is supported here, and every tensor argument is on its device."""
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    _check_dtype(x.dtype, capability)
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"{name} is on {t.device} but the {what} are on {x.device}; move it there once "
                f"(e.g. {name}.to({what}.device)): a per-call copy would wait for the host"
            )


def _check_dtype(dtype: torch.dtype, capability: tuple[int, int] | None) -> None:
    """TypeError for logits Triton cannot compile for this GPU (``capability``; None: no GPU)."""
    if dtype not in _DTYPES:
        raise TypeError(f"impl='triton' does not support logits of dtype {dtype}")
    if dtype == torch.float8_e4m3fn and capability is not None and capability < (8, 9):
        major, minor = capability
        raise TypeError(
            f"float8_e4m3fn logits need a GPU of compute capability 8.9 or newer (this one is "
            f"{major}.{minor}); cast them to bfloat16"
        )


def _acc(x: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _empty_classes(
    loss: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], given: bool
) -> None:
    """``V = 0``: nothing to read or write; every row's loss is 0, its shift 0 and ``log s`` is
    log 0."""
    loss.zero_()
    if not given:
        stats[0].zero_()
        stats[1].fill_(float("-inf"))


def _stats_buffers(
    stats_in: tuple[torch.Tensor, torch.Tensor] | None, rows: int, acc: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, log s)``: the given ones (contiguous, in the compute dtype), or new buffers."""
    if stats_in is not None:
        return tuple(t.to(acc).contiguous() for t in stats_in)
    return (
        torch.empty(rows, dtype=acc, device=device),
        torch.empty(rows, dtype=acc, device=device),
    )


def cross_entropy_pass_triton(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    row_coef: torch.Tensor | None,
    params: CEParams,
    *,
    stats_in: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad_out: torch.Tensor | None = None,
    grad_target_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`xent._engine.torch_rows.cross_entropy_pass` on Triton: same arguments and results."""
    _check_args(
        x,
        target=target,
        weight=weight,
        row_coef=row_coef,
        row_max=None if stats_in is None else stats_in[0],
        log_s=None if stats_in is None else stats_in[1],
        grad_out=grad_out,
        grad_target_out=grad_target_out,
    )
    if target.dim() == 2:
        return _probability_pass(
            x, target, weight, row_coef, params, stats_in, grad_out, grad_target_out
        )
    rows, vocab = x.shape
    if params.sliced and stats_in is None:
        raise ValueError("a vocabulary slice needs the global statistics (m, log s)")
    first = params.class_start
    acc, tl_acc = _acc(x)
    target = target.contiguous()  # the kernel reads target[row] at offset row
    x = _dense_rows(x)
    loss = torch.empty(rows, dtype=acc, device=x.device)
    stats = _stats_buffers(stats_in, rows, acc, x.device)
    w = None if weight is None else weight.to(dtype=acc).contiguous()  # all classes
    w_sum = None if w is None else w.sum().reshape(1)
    w_slice = None if w is None else w[first : first + vocab]
    # Strided columns (e.g. transposed logits written in place): computed into dense rows, then
    # copied into the caller's buffer.
    g = _dense_rows(grad_out)
    if rows > 0 and vocab == 0:
        _empty_classes(loss, stats, stats_in is not None)
    elif rows > 0:
        block, warps = _block_and_warps(vocab)
        grid = (_programs(rows, vocab * x.element_size(), x.device),)
        with _on_device(x):
            _ce_row_kernel[grid](
                x,
                x.stride(0),
                target,
                x if w is None else w_slice,  # absent pointers stand in as x (never read)
                x if w is None else w,
                x if w_sum is None else w_sum,
                row_coef,
                loss,
                stats[0],
                stats[1],
                g,
                0 if g is None else g.stride(0),
                _options(params, acc, x.device),
                rows,
                vocab,
                params.ignore_index,
                first,
                params.num_classes if params.sliced else vocab,
                HAS_WEIGHT=w is not None,
                HAS_SOFTCAP=params.softcap is not None,
                SMOOTH=params.label_smoothing > 0.0,
                HAS_STATS=stats_in is not None,
                WRITE_GRAD=g is not None,
                ACC=tl_acc,
                BLOCK=block,
                HEAD=16 // x.element_size(),
                num_warps=warps,
            )
    if grad_out is not None and g is not grad_out:
        grad_out.copy_(g)
    if stats_in is not None:
        loss.zero_()  # the loss is not recomputed from given statistics (backward never needs it)
    return loss, stats[0], stats[1]


def _dense_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its rows are unit-stride (what the kernels index), else a copy."""
    return t if t is None or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _probability_pass(
    x: torch.Tensor,
    q: torch.Tensor,
    weight: torch.Tensor | None,
    row_coef: torch.Tensor | None,
    params: CEParams,
    stats_in: tuple[torch.Tensor, torch.Tensor] | None,
    grad_out: torch.Tensor | None,
    grad_target_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pass for ``(M, C)`` probability targets (:func:`_ce_prob_row_kernel`)."""
    rows, vocab = x.shape
    acc, tl_acc = _acc(x)
    x, q = _dense_rows(x), _dense_rows(q)
    loss = torch.empty(rows, dtype=acc, device=x.device)
    stats = _stats_buffers(stats_in, rows, acc, x.device)
    w = None if weight is None else weight.to(dtype=acc).contiguous()
    # Buffers with strided columns are written densely, then copied to the caller's buffer.
    g, gq = _dense_rows(grad_out), _dense_rows(grad_target_out)
    if rows > 0 and vocab == 0:
        _empty_classes(loss, stats, stats_in is not None)
    elif rows > 0:
        block, warps = _block_and_warps(vocab, max(16, MAX_BLOCK // 2))
        row_bytes = vocab * (x.element_size() + q.element_size())
        grid = (_programs(rows, row_bytes, x.device),)
        with _on_device(x):
            _ce_prob_row_kernel[grid](
                x,
                x.stride(0),
                q,
                q.stride(0),
                x if w is None else w,  # absent pointers stand in as x (never read)
                row_coef,
                loss,
                stats[0],
                stats[1],
                g,
                0 if g is None else g.stride(0),
                gq,
                0 if gq is None else gq.stride(0),
                _options(params, acc, x.device),
                rows,
                vocab,
                HAS_WEIGHT=w is not None,
                HAS_SOFTCAP=params.softcap is not None,
                HAS_STATS=stats_in is not None,
                WRITE_GRAD=g is not None,
                WRITE_QGRAD=gq is not None,
                ACC=tl_acc,
                BLOCK=block,
                HEAD=16 // x.element_size(),
                num_warps=warps,
            )
    for mine, theirs in ((g, grad_out), (gq, grad_target_out)):
        if theirs is not None and mine is not theirs:
            theirs.copy_(mine)
    if stats_in is not None:
        loss.zero_()
    return loss, stats[0], stats[1]


def scale_unless_one_(grad: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor | None:
    """``grad *= g`` in place, on the device, and free when ``g == 1``.

    ``g`` is a one-element tensor on ``grad``'s device (the upstream gradient of a scalar loss).
    Its value is never read on the host: every program of the kernel loads it and returns at
    once when it is 1 (a scalar loss's usual upstream gradient), so that case moves no ``M × C``
    bytes; otherwise the programs scale ``grad`` block by block, in fp32 (fp64 for fp64). A
    buffer that is not contiguous is scaled by ``grad.mul_(g)`` instead.

    Equals ``grad.mul_(g)``.

    Example:
        >>> import torch
        >>> from xent._engine.triton_rows import scale_unless_one_
        >>> scale_unless_one_(torch.ones(3), torch.tensor(2.0))  # doctest: +SKIP
        tensor([2., 2., 2.])

    (Skipped as a doctest: it needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before import.)
    """
    if grad is None:
        return None
    _check_args(grad, "gradients", g=g)
    if not grad.is_contiguous() or g.numel() != 1:
        return grad.mul_(g.to(grad.dtype))
    n = grad.numel()
    if n == 0:
        return grad
    acc, tl_acc = _acc(grad)
    factor = g.reshape(1).to(acc)
    programs = triton.cdiv(n, SCALE_BLOCK)
    if grad.is_cuda:
        sms = torch.cuda.get_device_properties(grad.device).multi_processor_count
        programs = min(programs, PROGRAMS_PER_SM * sms)
    with _on_device(grad):
        _scale_kernel[(min(programs, GRID_LIMIT),)](
            grad, factor, n, ACC=tl_acc, BLOCK=SCALE_BLOCK, num_warps=4
        )
    return grad


_T = TypeVar("_T")


def warm_up(step: Callable[[], _T]) -> _T:
    """Run ``step`` once before a CUDA graph captures it, so that every Triton kernel it launches
    is compiled (and every cached constant made) outside the capture.

    A kernel variant compiled for the first time inside a capture fails. Variants depend on the
    dtypes, the option flags (weights, smoothing, soft-cap, reduction, in place) and the block
    size (from ``C``), not on the number of rows, pointer alignment or strides (except where a
    row count or stride passes 2³¹ and travels as int64), so one step with the shapes and
    options of the captured one compiles them all. Run on a side stream, as
    capture requires of the warm-up; on the CPU ``step`` is just called. Returns what ``step``
    returns.

    Example:
        >>> import torch, xent
        >>> from xent._engine.triton_rows import warm_up
        >>> x = torch.randn(4, 10, requires_grad=True)
        >>> t = torch.tensor([1, 2, 3, 4])
        >>> loss = warm_up(lambda: xent.cross_entropy(x, t))
        >>> bool(torch.allclose(loss, xent.cross_entropy(x, t)))
        True
    """
    if not torch.cuda.is_available():
        return step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = step()
    torch.cuda.current_stream().wait_stream(side)
    return out


_OPTIONS: dict[tuple, torch.Tensor] = {}


def _options(params: CEParams, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ε, ζ and the cap as a small tensor of the compute dtype (scalar arguments would be fp32,
    and fp64 inputs are computed in fp64 throughout).

    Made by device-side fills (no host-to-device copy, so a call can be captured in a CUDA
    graph) once per distinct options, and kept for the life of the process (a captured graph may
    hold it). One made during a capture is not kept: its fills run only when the graph is
    replayed. Past 64 distinct options, new ones are made per call instead of kept.
    """
    values = (params.label_smoothing, params.z_loss, params.softcap or 1.0)
    key = (values, dtype, device)
    opts = _OPTIONS.get(key)
    if opts is None:
        opts = torch.empty(3, dtype=dtype, device=device)
        for i, value in enumerate(values):
            opts[i].fill_(value)
        capturing = opts.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and len(_OPTIONS) < 64:
            _OPTIONS[key] = opts
    return opts
