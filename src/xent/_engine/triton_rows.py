"""Triton kernels for the one-pass cross-entropy: one program per row of logits.

The contract is that of :func:`xent._engine.torch_rows.cross_entropy_pass` (same arguments,
same results), so the dispatcher (:func:`xent._engine.dispatch.row_pass`) switches backends by
choosing which of the two functions to call. Imported only when ``impl="triton"`` is used; with
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (that is how they are tested without a
GPU).

Per row the kernel reads the logits twice, never writing anything but the results:

* pass 1, block by block: the running max ``m`` and the sum of exponentials rescaled whenever
  the max grows (``s ← s·e^{m_old - m_new} + Σ e^{z - m_new}``: an *online* log-sum-exp, so the row
  is never held whole), the target logit and, for label smoothing, ``Σ_c w_c z_c``;
* pass 2 (only when a gradient is wanted): ``∂l/∂z_j = c (p_j A - B_j)`` with ``p = e^{z - lse}``,
  written in the output dtype, straight over the logits if asked (in place).

Probability targets (a second ``M × C`` input ``q``) have their own kernel of the same shape,
which also writes ``∂l/∂q`` when the target requires a gradient. The algebra (``A``, ``B``,
z-loss, soft-capping, probability targets) is the one derived in :mod:`xent._engine.torch_rows`.
Offsets are int64 (``row * stride`` overflows int32 past 2³¹ elements) and nothing is read back
to the host, so a launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xent._engine.options import CEParams

# Columns per block: the whole row up to this size (fewest passes), and the warps to run it.
# Block sizes are powers of two; 4096 fp32 columns per block keeps a block in registers across
# 8 warps on Hopper-class GPUs. (Tests lower MAX_BLOCK to exercise many blocks per row.)
MAX_BLOCK = 4096
WARPS = {1024: 4, 4096: 8}


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits ±1 when e^{2u} overflows to inf or underflows.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _ce_row_kernel(
    X,
    stride_x,
    T,
    W,
    W_SUM,
    COEF,
    LOSS,
    LSE,
    LSE_IN,
    G,
    stride_g,
    OPTS,
    V,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.load(OPTS).to(ACC)
    zeta = tl.load(OPTS + 1).to(ACC)
    softcap = tl.load(OPTS + 2).to(ACC)
    x_row = X + row * stride_x
    y = tl.load(T + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    z_y = tl.load(x_row + y_safe).to(ACC)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    w_y = 1.0
    w_sum = V * 1.0
    if HAS_WEIGHT:
        w_y = tl.load(W + y_safe).to(ACC)
        w_sum = tl.load(W_SUM).to(ACC)
    w_y = tl.where(valid, w_y, 0.0)

    if HAS_LSE:
        lse = tl.load(LSE_IN + row).to(ACC)
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        wz = tl.zeros((), ACC)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))  # lanes past the row end take no part
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # An all -inf row so far is shifted by 0: exp(-inf - 0) = 0, never -inf - (-inf).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
            if SMOOTH:
                z_in = tl.where(mask, z, 0.0)
                if HAS_WEIGHT:
                    z_in *= tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                wz += tl.sum(z_in, axis=0)
        lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
        loss = (1.0 - eps) * w_y * (lse - z_y) + zeta * lse * lse
        if SMOOTH:
            loss += (eps / V) * (lse * w_sum - wz)
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(LSE + row, lse)

    if WRITE_GRAD:
        c = tl.load(COEF + row).to(ACC)
        a = c * ((1.0 - eps) * w_y + zeta * 2.0 * lse)
        if SMOOTH:
            a += c * (eps / V) * w_sum
        g_row = G + row * stride_g
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse) * a
            g -= tl.where(cols == y_safe, c * (1.0 - eps) * w_y, 0.0)
            if SMOOTH:
                if HAS_WEIGHT:
                    g -= c * (eps / V) * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    g -= c * (eps / V)
            if HAS_SOFTCAP:
                g *= 1.0 - t * t  # ∂z/∂x through z = s·tanh(x/s)
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _ce_prob_row_kernel(
    X,
    stride_x,
    Q,
    stride_q,
    W,
    COEF,
    LOSS,
    LSE,
    LSE_IN,
    G,
    stride_g,
    GQ,
    stride_gq,
    OPTS,
    V,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_QGRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Probability targets ``q``: with ``q' = (1 - ε) q + ε/V`` and ``S = Σ_c w_c q'_c``,

    ``l = lse·S - Σ_c w_c q'_c z_c + ζ lse²``, ``∂l/∂z_j = p_j (S + 2ζ lse) - w_j q'_j`` and
    ``∂l/∂q_c = -(1 - ε) w_c (z_c - lse)``, each gradient times the row's coefficient.
    """
    row = tl.program_id(0).to(tl.int64)
    eps = tl.load(OPTS).to(ACC)
    zeta = tl.load(OPTS + 1).to(ACC)
    softcap = tl.load(OPTS + 2).to(ACC)
    x_row = X + row * stride_x
    q_row = Q + row * stride_q

    # Pass 1: S always (it enters the gradient); unless lse is given, the running max m, the
    # sum s = Σ e^{z - m} and Σ w q' (z - m), kept relative to the running max so that the loss
    # log(s)·S - Σ w q' (z - m) never subtracts two large numbers (logits far from 0).
    big_s = tl.zeros((), ACC)
    wqz = tl.zeros((), ACC)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    shift = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        wq = tl.load(q_row + cols, mask=mask, other=0.0).to(ACC) * (1.0 - eps) + eps / V
        if HAS_WEIGHT:
            wq *= tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        wq = tl.where(mask, wq, 0.0)
        if not HAS_LSE:
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            m_new = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), axis=0))
            # An all -inf row so far is shifted by 0: exp(-inf - 0) = 0, never -inf - (-inf).
            new_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - new_shift) + tl.sum(
                tl.where(mask, tl.exp(z - new_shift), 0.0), axis=0
            )
            # Earlier blocks move to the new reference; masked lanes add wq·z = 0.
            wqz += (shift - new_shift) * big_s + tl.sum(wq * (z - new_shift), axis=0)
            m, shift = m_new, new_shift
        big_s += tl.sum(wq, axis=0)
    if HAS_LSE:
        lse = tl.load(LSE_IN + row).to(ACC)
    else:
        log_s = tl.log(s)  # lse - shift
        lse = shift + log_s
        tl.store(LOSS + row, log_s * big_s - wqz + zeta * lse * lse)
        tl.store(LSE + row, lse)

    if WRITE_GRAD or WRITE_QGRAD:
        c = tl.load(COEF + row).to(ACC)
        a = c * (big_s + zeta * 2.0 * lse)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            if WRITE_QGRAD:
                gq = -(1.0 - eps) * c * w * (z - lse)
                tl.store(GQ + row * stride_gq + cols, gq.to(GQ.dtype.element_ty), mask=mask)
            if WRITE_GRAD:
                q = tl.load(q_row + cols, mask=mask, other=0.0).to(ACC)
                g = tl.exp(z - lse) * a - c * w * (q * (1.0 - eps) + eps / V)
                if HAS_SOFTCAP:
                    g *= 1.0 - t * t
                tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=mask)


def _block_and_warps(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    warps = next((w for limit, w in sorted(WARPS.items()) if block <= limit), 8)
    return block, warps


def cross_entropy_pass_triton(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    row_coef: torch.Tensor | None,
    params: CEParams,
    *,
    lse_in: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    grad_target_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`xent._engine.torch_rows.cross_entropy_pass` on Triton: same arguments and results."""
    if target.dim() == 2:
        return _probability_pass(
            x, target, weight, row_coef, params, lse_in, grad_out, grad_target_out
        )
    rows, vocab = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    target = target.contiguous()  # the kernel reads target[row] at offset row
    x = _dense_rows(x)
    loss = torch.empty(rows, dtype=acc, device=x.device)
    lse = lse_in if lse_in is not None else torch.empty(rows, dtype=acc, device=x.device)
    w = None if weight is None else weight.to(device=x.device, dtype=acc).contiguous()
    w_sum = None if w is None else w.sum().reshape(1)
    # Strided columns (e.g. transposed logits written in place): computed into dense rows, then
    # copied into the caller's buffer.
    g = _dense_rows(grad_out)
    if rows > 0:
        block, warps = _block_and_warps(vocab)
        _ce_row_kernel[(rows,)](
            x,
            x.stride(0),
            target,
            w,
            w_sum,
            row_coef,
            loss,
            lse,
            lse,
            g,
            0 if g is None else g.stride(0),
            _options(params, acc, x.device),
            vocab,
            params.ignore_index,
            HAS_WEIGHT=w is not None,
            HAS_SOFTCAP=params.softcap is not None,
            SMOOTH=params.label_smoothing > 0.0,
            HAS_LSE=lse_in is not None,
            WRITE_GRAD=g is not None,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK=block,
            num_warps=warps,
        )
    if grad_out is not None and g is not grad_out:
        grad_out.copy_(g)
    if lse_in is not None:
        loss.zero_()  # the loss is not recomputed from a given lse (backward never needs it)
    return loss, lse


def _dense_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its rows are unit-stride (what the kernels index), else a copy."""
    return t if t is None or t.stride(1) == 1 else t.contiguous()


def _probability_pass(
    x: torch.Tensor,
    q: torch.Tensor,
    weight: torch.Tensor | None,
    row_coef: torch.Tensor | None,
    params: CEParams,
    lse_in: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    grad_target_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass for ``(M, C)`` probability targets (:func:`_ce_prob_row_kernel`)."""
    rows, vocab = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, q = _dense_rows(x), _dense_rows(q)
    loss = torch.empty(rows, dtype=acc, device=x.device)
    lse = lse_in if lse_in is not None else torch.empty(rows, dtype=acc, device=x.device)
    w = None if weight is None else weight.to(device=x.device, dtype=acc).contiguous()
    # Buffers with strided columns are written densely, then copied to the caller's buffer.
    g, gq = _dense_rows(grad_out), _dense_rows(grad_target_out)
    if rows > 0:
        block, warps = _block_and_warps(vocab)
        _ce_prob_row_kernel[(rows,)](
            x,
            x.stride(0),
            q,
            q.stride(0),
            w,
            row_coef,
            loss,
            lse,
            lse,
            g,
            0 if g is None else g.stride(0),
            gq,
            0 if gq is None else gq.stride(0),
            _options(params, acc, x.device),
            vocab,
            HAS_WEIGHT=w is not None,
            HAS_SOFTCAP=params.softcap is not None,
            HAS_LSE=lse_in is not None,
            WRITE_GRAD=g is not None,
            WRITE_QGRAD=gq is not None,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK=block,
            num_warps=warps,
        )
    for mine, theirs in ((g, grad_out), (gq, grad_target_out)):
        if theirs is not None and mine is not theirs:
            theirs.copy_(mine)
    if lse_in is not None:
        loss.zero_()
    return loss, lse


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
