"""Triton row kernels of the post-training quantities: one program per row of logits.

Same contract as :mod:`xent._engine.logprob_rows` (same functions, arguments and results), so
the dispatcher (:func:`xent._engine.dispatch.logprob_backend`) switches backends by choosing the
module. Imported only for ``impl="triton"``; with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how they are tested without a GPU). The
transform and the algebra are derived in :mod:`xent._engine.logprob_rows`.

* Log-probabilities: one pass over the row keeps an *online* log-sum-exp (``s ← s·e^{m_old -
  m_new} + Σ e^{u - m_new}``), the entropy's ``w = Σ e^{u - m} (u - m)`` moved to each new max
  (``w ← e^{m_old - m_new} (w + (m_old - m_new) s) + Σ …``) and the first arg-max; then
  ``log p_y = (u_y - m) - log s`` (≤ 0: ``u_y ≤ m`` and ``s ≥ 1``) and ``H = log s - w / s``.
  Without a cap the shift is taken on the raw logits (``u - max u = (x - max x)·a/T``), and
  ``(m, log s)`` are kept apart, never as ``lse``: no step subtracts two numbers of the
  logits' size.
  Backward: one pass writing ``c [j = y] - p_j (c + e (log p_j + H))`` times ``∂u/∂x``.
* The clipped policy-gradient loss: the log-probabilities' pass, the token's coefficients
  (``c = -A r [not clipped]`` times the reduction's weight, ``e = -β`` times it) in registers,
  then backward's pass, in one program: the gradient is formed with the loss.
* Divergences: a pass for both models' log-sum-exps, a pass for the loss (and, for the forward
  KL, the gradient ``c (p - q)``), and for ``β > 0`` a third for the gradient, which needs the
  row's ``KL(p ‖ m)`` (or ``KL(p ‖ q)``) first.

Offsets are int64; nothing is read back to the host, so a launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xent._engine.options import DivergenceParams, LogProbParams, PolicyParams

# Columns per block (the whole row up to this size) and the warps to run it: the cross-entropy
# kernel's table (4096 fp32 columns stay in registers across 8 warps on Hopper-class GPUs).
# Tests lower MAX_BLOCK to exercise many blocks per row.
MAX_BLOCK = 4096
WARPS = {1024: 4, 4096: 8}


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (e^{2u} + 1): exact limits ±1 when e^{2u} overflows or underflows.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _transform(x, scale, cap, inv_t, HAS_CAP: tl.constexpr):
    """``(u, tanh)``: ``u = cap·tanh(scale·x / cap)·inv_t`` (``scale·x·inv_t`` without a cap)."""
    a = x * scale
    if HAS_CAP:
        t = _tanh(a / cap)
        return cap * t * inv_t, t
    return a * inv_t, a


@triton.jit
def _shiftable(x, scale, cap, inv_t, HAS_CAP: tl.constexpr):
    """``(v, f, tanh)``: the value whose row max is the shift ``m``, and the factor with
    ``u - max u = (v - m)·f``. Through a cap ``v = u`` (``f = 1``); without one the raw logit
    ``x`` itself (``u = f·x``, ``f = scale·inv_t > 0``), so that ``x - m`` is formed before any
    rounding of ``f·x``: exact near the max and 0 at it, whatever the logits' size. Both
    branches return ``f`` in ``x``'s dtype (a compiled kernel's returns must agree in type)."""
    if HAS_CAP:
        t = _tanh(x * scale / cap)
        return cap * t * inv_t, tl.full((), 1.0, x.dtype), t
    return x, scale * inv_t, x


@triton.jit
def _chain(g, t, scale, inv_t, HAS_CAP: tl.constexpr):
    """``g·∂u/∂x``: ``× scale·inv_t``, and ``× (1 - tanh²)`` through the cap."""
    if HAS_CAP:
        g = g * (1.0 - t * t)
    return g * (scale * inv_t)


@triton.jit
def _row_stats(x_row, V, scale, cap, inv_t, HAS_CAP: tl.constexpr, HAS_ENT: tl.constexpr,
               HAS_TOP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One pass over a row: ``(shift, s, w, best)``, the online statistics of the module
    docstring (``w`` and ``best`` only when asked for); ``shift`` is the max of
    :func:`_shiftable`'s ``v`` and ``s = Σ e^{(v - shift)·f}``."""
    m = tl.full((), float("-inf"), ACC)
    shift = tl.zeros((), ACC)  # m, or 0 while every logit so far is -inf
    s = tl.zeros((), ACC)
    w = tl.zeros((), ACC)
    best = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        v, f, _t = _shiftable(tl.load(x_row + cols, mask=mask, other=0.0).to(ACC), scale, cap,
                              inv_t, HAS_CAP)  # fmt: skip
        v = tl.where(mask, v, float("-inf"))  # lanes past the row end take no part
        block_max = tl.max(v, axis=0)
        if HAS_TOP:
            # Strictly greater: of tied maxima the earliest stays the arg-max.
            best = tl.where(block_max > m, start + tl.argmax(v, axis=0).to(tl.int64), best)
        m_new = tl.maximum(m, block_max)
        new_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        moved = (shift - new_shift) * f
        alpha = tl.exp(moved)
        d = (v - new_shift) * f
        e = tl.exp(d)
        if HAS_ENT:
            # w = Σ e (u - max u), moved to the new shift; e = 0 lanes add 0 (never 0·-inf),
            # and so does the old part once its factor underflows (moved may then be -inf).
            old = tl.where(alpha > 0, alpha * (w + moved * s), 0.0)
            w = old + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m, shift = m_new, new_shift
    return shift, s, w, best


@triton.jit
def _row_grad(x_row, g_row, V, y, valid, shift, log_s, c, ce, h, scale, cap, inv_t,
              HAS_CAP: tl.constexpr, HAS_ENT: tl.constexpr, ACC: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    """One pass writing ``c [j = y] - p_j (c + e (log p_j + H))`` times ``∂u/∂x`` over a row,
    from the row's ``(m, log s)``: ``log p = (u - m) - log s``, never ``u - lse``."""
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        v, f, t = _shiftable(tl.load(x_row + cols, mask=mask, other=0.0).to(ACC), scale, cap,
                             inv_t, HAS_CAP)  # fmt: skip
        log_p = (v - shift) * f - log_s
        p = tl.exp(log_p)
        # p_j = 0 lanes add 0 (never 0·-inf).
        a = c
        if HAS_ENT:
            a = c + ce * (tl.where(p > 0, log_p, 0.0) + h)
        g = tl.where(cols == y, c, 0.0) - p * a
        g = _chain(g, t, scale, inv_t, HAS_CAP)
        g = tl.where(valid, g, 0.0)  # ignored rows: exactly 0, whatever their logits
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _logprob_fwd_kernel(
    X,
    stride_x,
    T,
    INV_T,
    OPTS,
    LP,
    ENT,
    TOP,
    M,
    LOG_S,
    V,
    ignore_index,
    HAS_ROW_TEMP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_TOP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(OPTS).to(ACC)
    cap = tl.load(OPTS + 1).to(ACC)
    inv_t = tl.load(OPTS + 2).to(ACC)
    if HAS_ROW_TEMP:
        inv_t = tl.load(INV_T + row).to(ACC)
    x_row = X + row * stride_x
    y = tl.load(T + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    shift, s, w, best = _row_stats(x_row, V, scale, cap, inv_t, HAS_CAP, HAS_ENT, HAS_TOP, ACC,
                                   BLOCK)  # fmt: skip
    log_s = tl.log(s)  # ≥ 0: the max term is exactly 1
    v_y, f, _t = _shiftable(tl.load(x_row + y_safe).to(ACC), scale, cap, inv_t, HAS_CAP)
    tl.store(LP + row, tl.where(valid, (v_y - shift) * f - log_s, 0.0))
    tl.store(M + row, shift)
    tl.store(LOG_S + row, log_s)
    if HAS_ENT:
        h = tl.maximum(log_s - w / s, 0.0)  # a rounding below 0 is clamped (H ≥ 0 exactly)
        tl.store(ENT + row, tl.where(valid, h, 0.0))
    if HAS_TOP:
        tl.store(TOP + row, tl.where(valid & (best == y_safe), 1.0, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    X,
    stride_x,
    T,
    INV_T,
    OPTS,
    M,
    LOG_S,
    ENT,
    C_LP,
    C_ENT,
    G,
    stride_g,
    V,
    ignore_index,
    HAS_ROW_TEMP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_ENT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(OPTS).to(ACC)
    cap = tl.load(OPTS + 1).to(ACC)
    inv_t = tl.load(OPTS + 2).to(ACC)
    if HAS_ROW_TEMP:
        inv_t = tl.load(INV_T + row).to(ACC)
    y = tl.load(T + row).to(tl.int64)
    shift = tl.load(M + row).to(ACC)
    log_s = tl.load(LOG_S + row).to(ACC)
    c = tl.load(C_LP + row).to(ACC)
    ce = tl.zeros((), ACC)
    h = tl.zeros((), ACC)
    if HAS_ENT:
        ce = tl.load(C_ENT + row).to(ACC)
        h = tl.load(ENT + row).to(ACC)
    _row_grad(X + row * stride_x, G + row * stride_g, V, y, y != ignore_index, shift, log_s, c,
              ce, h, scale, cap, inv_t, HAS_CAP, HAS_ENT, ACC, BLOCK)  # fmt: skip


@triton.jit
def _policy_kernel(
    X,
    stride_x,
    T,
    INV_T,
    OPTS,
    ADV,
    OLD,
    COEF,
    LOSS,
    LP,
    ENT,
    CLIP,
    G,
    stride_g,
    V,
    ignore_index,
    HAS_ROW_TEMP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_ENT: tl.constexpr,
    ENT_IN_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The clipped policy-gradient loss of one row, and with ``HAS_GRAD`` its gradient: the
    statistics pass, the token's coefficients (``logprob_rows.policy_terms``), the gradient
    pass. ``OPTS``: scale, cap, 1/T, 1 - clip_low, 1 + clip_high, entropy coefficient."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(OPTS).to(ACC)
    cap = tl.load(OPTS + 1).to(ACC)
    inv_t = tl.load(OPTS + 2).to(ACC)
    lo = tl.load(OPTS + 3).to(ACC)
    hi = tl.load(OPTS + 4).to(ACC)
    beta = tl.load(OPTS + 5).to(ACC)
    if HAS_ROW_TEMP:
        inv_t = tl.load(INV_T + row).to(ACC)
    x_row = X + row * stride_x
    y = tl.load(T + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    shift, s, w, _best = _row_stats(x_row, V, scale, cap, inv_t, HAS_CAP, HAS_ENT, False, ACC,
                                    BLOCK)  # fmt: skip
    log_s = tl.log(s)
    v_y, f, _t = _shiftable(tl.load(x_row + y_safe).to(ACC), scale, cap, inv_t, HAS_CAP)
    lp = tl.where(valid, (v_y - shift) * f - log_s, 0.0)
    h = tl.zeros((), ACC)
    if HAS_ENT:
        h = tl.where(valid, tl.maximum(log_s - w / s, 0.0), 0.0)
    a = tl.load(ADV + row).to(ACC)
    r = tl.full((), 1.0, ACC)
    if HAS_OLD:
        r = tl.exp(lp - tl.load(OLD + row).to(ACC))
    ra = r * a
    ca = tl.minimum(tl.maximum(r, lo), hi) * a
    clipped = valid & (ca < ra)
    loss = -tl.where(clipped, ca, ra)
    if ENT_IN_LOSS:
        loss = loss - beta * h
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LP + row, lp)
    tl.store(ENT + row, h)
    tl.store(CLIP + row, tl.where(clipped, 1.0, 0.0))
    if HAS_GRAD:
        c = tl.load(COEF + row).to(ACC)
        c_lp = tl.where(valid & (ca >= ra), -ra * c, 0.0)
        _row_grad(x_row, G + row * stride_g, V, y, valid, shift, log_s, c_lp, -beta * c, h,
                  scale, cap, inv_t, HAS_CAP, ENT_IN_LOSS, ACC, BLOCK)  # fmt: skip


@triton.jit
def _online_lse(x_row, V, scale, cap, inv_t, HAS_CAP: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """``(m, log s)``: the row's max (0 for an all -inf row) and ``log Σ e^{u - m}``. Kept apart
    (not as ``lse = m + log s``) so that ``log p = (u - m) - log s`` never subtracts two numbers
    of the logits' size."""
    m = tl.full((), float("-inf"), ACC)
    shift = tl.zeros((), ACC)
    s = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        u, _t = _transform(tl.load(x_row + cols, mask=mask, other=0.0).to(ACC), scale, cap, inv_t,
                           HAS_CAP)  # fmt: skip
        u = tl.where(mask, u, float("-inf"))
        m = tl.maximum(m, tl.max(u, axis=0))
        new_shift = tl.where(m == float("-inf"), 0.0, m)
        s = s * tl.exp(shift - new_shift) + tl.sum(tl.exp(u - new_shift), axis=0)
        shift = new_shift
    return shift, tl.log(s)


@triton.jit
def _log_mixture(ls, lt, log_1mb, log_b):
    """``log((1 - β) e^{ls} + β e^{lt})``, exact where either is -inf."""
    a = ls + log_1mb
    b = lt + log_b
    mx = tl.maximum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@triton.jit
def _divergence_kernel(
    XS,
    stride_s,
    XT,
    stride_t,
    INV_T,
    OPTS,
    VALID,
    COEF,
    LOSS,
    G,
    stride_g,
    V,
    HAS_ROW_TEMP: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    MODE: tl.constexpr,  # 0: forward KL (β = 0), 1: reverse KL (β = 1), 2: generalised JSD
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_scale = tl.load(OPTS).to(ACC)
    s_cap = tl.load(OPTS + 1).to(ACC)
    t_scale = tl.load(OPTS + 2).to(ACC)
    t_cap = tl.load(OPTS + 3).to(ACC)
    inv_t = tl.load(OPTS + 4).to(ACC)
    beta = tl.load(OPTS + 5).to(ACC)
    log_1mb = tl.load(OPTS + 6).to(ACC)
    log_b = tl.load(OPTS + 7).to(ACC)
    if HAS_ROW_TEMP:
        inv_t = tl.load(INV_T + row).to(ACC)
    valid = True
    if HAS_VALID:
        valid = tl.load(VALID + row) != 0
    s_row = XS + row * stride_s
    t_row = XT + row * stride_t
    m_s, log_s_s = _online_lse(s_row, V, s_scale, s_cap, inv_t, S_CAP, ACC, BLOCK)
    m_t, log_s_t = _online_lse(t_row, V, t_scale, t_cap, inv_t, T_CAP, ACC, BLOCK)
    c = tl.zeros((), ACC)
    g_row = G
    if WRITE_GRAD:
        c = tl.load(COEF + row).to(ACC)
        g_row = G + row * stride_g

    # Pass 2: the loss; for the forward KL also its gradient c (p - q).
    k_q = tl.zeros((), ACC)  # Σ q (log q - log p)  or  Σ q (log q - log m)
    k_p = tl.zeros((), ACC)  # Σ p (log p - log q)  or  Σ p (log p - log m)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        us, ts = _transform(tl.load(s_row + cols, mask=mask, other=0.0).to(ACC), s_scale, s_cap,
                            inv_t, S_CAP)  # fmt: skip
        ut, _t = _transform(tl.load(t_row + cols, mask=mask, other=0.0).to(ACC), t_scale, t_cap,
                            inv_t, T_CAP)  # fmt: skip
        ls = tl.where(mask, (us - m_s) - log_s_s, float("-inf"))
        lt = tl.where(mask, (ut - m_t) - log_s_t, float("-inf"))
        p = tl.exp(ls)
        q = tl.exp(lt)
        if MODE == 0:
            k_q += tl.sum(tl.where(q > 0, q * (lt - ls), 0.0), axis=0)
            if WRITE_GRAD:
                g = _chain(c * (p - q), ts, s_scale, inv_t, S_CAP)
                g = tl.where(valid, g, 0.0)
                tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)
        elif MODE == 1:
            k_p += tl.sum(tl.where(p > 0, p * (ls - lt), 0.0), axis=0)
        else:
            lm = _log_mixture(ls, lt, log_1mb, log_b)
            k_q += tl.sum(tl.where(q > 0, q * (lt - lm), 0.0), axis=0)
            k_p += tl.sum(tl.where(p > 0, p * (ls - lm), 0.0), axis=0)
    if MODE == 0:
        loss = k_q
    elif MODE == 1:
        loss = k_p
    else:
        loss = beta * k_q + (1.0 - beta) * k_p
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    if WRITE_GRAD and MODE != 0:
        # Pass 3: ∂/∂u_j = c' p_j (log p_j - log r_j - K), with r = q, K = KL(p ‖ q), c' = c
        # (reverse KL) or r = m, K = KL(p ‖ m), c' = (1 - β) c (JSD); 0 where p_j = 0 or c = 0.
        scale_c = c
        if MODE == 2:
            scale_c = c * (1.0 - beta)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            us, ts = _transform(tl.load(s_row + cols, mask=mask, other=0.0).to(ACC), s_scale,
                                s_cap, inv_t, S_CAP)  # fmt: skip
            ut, _t = _transform(tl.load(t_row + cols, mask=mask, other=0.0).to(ACC), t_scale,
                                t_cap, inv_t, T_CAP)  # fmt: skip
            ls = (us - m_s) - log_s_s
            lt = (ut - m_t) - log_s_t
            p = tl.exp(ls)
            if MODE == 1:
                lr = lt
            else:
                lr = _log_mixture(ls, lt, log_1mb, log_b)
            g = tl.where(p > 0, scale_c * p * (ls - lr - k_p), 0.0)
            g = _chain(g, ts, s_scale, inv_t, S_CAP)
            g = tl.where(valid & (scale_c != 0.0), g, 0.0)
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_and_warps(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 16)))
    warps = next((w for limit, w in sorted(WARPS.items()) if block <= limit), 8)
    return block, warps


def _acc(x: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    if x.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its rows are unit-stride (what the kernels index), else a copy."""
    return t if t is None or t.dim() < 2 or t.stride(-1) == 1 else t.contiguous()


def _options(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The numeric options as a small tensor of the compute dtype, by device-side fills (no
    host-to-device copy, so a call can be captured in a CUDA graph)."""
    opts = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        opts[i].fill_(value)
    return opts


def _temperature(
    inv_temp: torch.Tensor | float, dtype: torch.dtype
) -> tuple[float, torch.Tensor | None]:
    if isinstance(inv_temp, torch.Tensor):
        return 1.0, inv_temp.to(dtype).contiguous()
    return float(inv_temp), None


def log_prob_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: LogProbParams,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`xent._engine.logprob_rows.log_prob_rows` on Triton: same arguments, same results."""
    n, vocab = x.shape
    acc, tl_acc = _acc(x)
    x = _dense(x)
    tf = params.transform
    lp = torch.empty(n, dtype=acc, device=x.device)
    m = torch.empty(n, dtype=acc, device=x.device)
    log_s = torch.empty(n, dtype=acc, device=x.device)
    ent = torch.empty(n, dtype=acc, device=x.device) if params.entropy else None
    top = torch.empty(n, dtype=acc, device=x.device) if params.top1 else None
    inv_t, row_t = _temperature(inv_temp, acc)
    if n > 0:
        block, warps = _block_and_warps(vocab)
        _logprob_fwd_kernel[(n,)](
            x,
            x.stride(0),
            target.contiguous(),
            row_t,
            _options([tf.scale, tf.softcap or 1.0, inv_t], acc, x.device),
            lp,
            ent,
            top,
            m,
            log_s,
            vocab,
            params.ignore_index,
            HAS_ROW_TEMP=row_t is not None,
            HAS_CAP=tf.softcap is not None,
            HAS_ENT=ent is not None,
            HAS_TOP=top is not None,
            ACC=tl_acc,
            BLOCK=block,
            num_warps=warps,
        )
    return lp, ent, top, m, log_s


def log_prob_grad_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: LogProbParams,
    m: torch.Tensor,
    log_s: torch.Tensor,
    ent: torch.Tensor | None,
    coef_lp: torch.Tensor,
    coef_ent: torch.Tensor | None,
    grad_out: torch.Tensor,
) -> None:
    """:func:`xent._engine.logprob_rows.log_prob_grad_rows` on Triton."""
    n, vocab = x.shape
    acc, tl_acc = _acc(x)
    x = _dense(x)
    g = _dense(grad_out)
    tf = params.transform
    inv_t, row_t = _temperature(inv_temp, acc)
    if n > 0:
        block, warps = _block_and_warps(vocab)
        _logprob_bwd_kernel[(n,)](
            x,
            x.stride(0),
            target.contiguous(),
            row_t,
            _options([tf.scale, tf.softcap or 1.0, inv_t], acc, x.device),
            m.to(acc).contiguous(),
            log_s.to(acc).contiguous(),
            None if coef_ent is None else ent.contiguous(),
            coef_lp.to(acc).contiguous(),
            None if coef_ent is None else coef_ent.to(acc).contiguous(),
            g,
            g.stride(0),
            vocab,
            params.ignore_index,
            HAS_ROW_TEMP=row_t is not None,
            HAS_CAP=tf.softcap is not None,
            HAS_ENT=coef_ent is not None,
            ACC=tl_acc,
            BLOCK=block,
            num_warps=warps,
        )
    if g is not grad_out:
        grad_out.copy_(g)


def divergence_rows(
    xs: torch.Tensor,
    xt: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: DivergenceParams,
    valid: torch.Tensor | None = None,
    coef: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`xent._engine.logprob_rows.divergence_rows` on Triton."""
    n, vocab = xs.shape
    acc, tl_acc = _acc(xs)
    xs, xt = _dense(xs), _dense(xt)
    g = _dense(grad_out)
    beta = params.beta
    loss = torch.empty(n, dtype=acc, device=xs.device)
    inv_t, row_t = _temperature(inv_temp, acc)
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    mixture = (math.log(1.0 - beta), math.log(beta)) if mode == 2 else (0.0, 0.0)
    s, t = params.student, params.teacher
    values = [s.scale, s.softcap or 1.0, t.scale, t.softcap or 1.0, inv_t, beta, *mixture]
    if n > 0:
        block, warps = _block_and_warps(vocab)
        _divergence_kernel[(n,)](
            xs,
            xs.stride(0),
            xt,
            xt.stride(0),
            row_t,
            _options(values, acc, xs.device),
            None if valid is None else valid.to(torch.int8).contiguous(),
            None if g is None else coef.to(acc).contiguous(),
            loss,
            g,
            0 if g is None else g.stride(0),
            vocab,
            HAS_ROW_TEMP=row_t is not None,
            S_CAP=s.softcap is not None,
            T_CAP=t.softcap is not None,
            HAS_VALID=valid is not None,
            MODE=mode,
            WRITE_GRAD=g is not None,
            ACC=tl_acc,
            BLOCK=block,
            num_warps=warps,
        )
    if grad_out is not None and g is not grad_out:
        grad_out.copy_(g)
    return loss


def policy_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: PolicyParams,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`xent._engine.logprob_rows.policy_rows` on Triton: one program per row reads it
    twice, for its statistics and (with ``grad_out``) for its gradient."""
    n, vocab = x.shape
    acc, tl_acc = _acc(x)
    x = _dense(x)
    lpp = params.log_probs
    tf = lpp.transform
    loss, lp, ent, clipped = (torch.empty(n, dtype=acc, device=x.device) for _ in range(4))
    g = None if grad_out is None else _dense(grad_out)
    inv_t, row_t = _temperature(inv_temp, acc)
    if n > 0:
        block, warps = _block_and_warps(vocab)
        values = [tf.scale, tf.softcap or 1.0, inv_t, 1.0 - params.clip_low]
        values += [1.0 + params.clip_high, params.entropy_coef]
        _policy_kernel[(n,)](
            x,
            x.stride(0),
            target.contiguous(),
            row_t,
            _options(values, acc, x.device),
            advantages.to(acc).contiguous(),
            None if old_log_probs is None else old_log_probs.to(acc).contiguous(),
            None if coef is None else coef.to(acc).contiguous(),
            loss,
            lp,
            ent,
            clipped,
            g,
            0 if g is None else g.stride(0),
            vocab,
            lpp.ignore_index,
            HAS_ROW_TEMP=row_t is not None,
            HAS_CAP=tf.softcap is not None,
            HAS_ENT=lpp.entropy,
            ENT_IN_LOSS=params.entropy_coef != 0.0,
            HAS_OLD=params.off_policy,
            HAS_GRAD=g is not None,
            ACC=tl_acc,
            BLOCK=block,
            num_warps=warps,
        )
    if g is not None and g is not grad_out:
        grad_out.copy_(g)
    return loss, lp, ent, clipped
