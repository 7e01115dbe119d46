"""Row kernels of the post-training quantities: log-probabilities, entropy, divergences.

Each kernel takes raw logits ``x`` of shape ``(n, V)`` (any floating dtype, unit-stride rows),
applies the logit transform itself and visits the rows in blocks small enough to stay in cache,
with a few block-sized fp32 scratch buffers (fp64 for fp64): nothing ``n × V`` is allocated
besides what the caller hands in. They are called on a whole logits tensor by
:mod:`xent.posttrain` and, one chunk at a time, by the chunk walker of the fused versions.

The transform, per row ``i`` with temperature ``T_i``, scale ``a`` and soft cap ``s``:

    u = s·tanh(a·x / s) / T_i            (u = a·x / T_i without a cap)
    ∂u/∂x = a (1 - tanh²(a·x / s)) / T_i

Log-probabilities and entropy, with ``lse = log Σ_j e^{u_j}`` and ``p = e^{u - lse}``:

    log p_y = u_y - lse                          ∂/∂u_j = [j = y] - p_j
    H = lse - Σ_j p_j u_j = -Σ_j p_j log p_j     ∂H/∂u_j = -p_j (log p_j + H)

so with upstream coefficients ``c_i = ∂L/∂log p_y`` and ``e_i = ∂L/∂H``

    ∂L/∂u_j = c [j = y] - p_j (c + e (log p_j + H)).

The clipped policy-gradient loss of a token (PPO/GRPO) with advantage ``A``, ratio
``r = e^{log p_y - old}`` (``r = 1`` on-policy, where ``old = log p_y`` without gradient) and
entropy bonus ``β``:

    ℓ = -min(r A, clip(r, 1 - ε_lo, 1 + ε_hi) A) - β H

depends on the logits through ``log p_y`` and ``H`` only. ``∂r/∂log p_y = r``, and the clipped
term is constant in ``log p_y`` where it is the smaller (strictly) one, so

    ∂ℓ/∂log p_y = -A r [r A ≤ clip(r) A],        ∂ℓ/∂H = -β,

and the two lines above give ``∂ℓ/∂u_j = a [j = y] - p_j (a + b (log p_j + H))`` with
``a = -A r [not clipped]`` and ``b = -β`` (as ``∂H/∂u_j = -p_j (u_j - Σ_k p_k u_k)``). Both
coefficients are known once the row's statistics are, so a scalar loss's gradient is formed in
the same call that computes the loss.

Divergences between the student's ``p = softmax(u)`` and the teacher's ``q = softmax(v)``, with
the mixture ``m = (1 - β) p + β q`` and ``0·log 0 = 0``:

    β = 0  KL(q ‖ p) = Σ q (log q - log p)     ∂/∂u_j = p_j - q_j
    β = 1  KL(p ‖ q) = Σ p (log p - log q)     ∂/∂u_j = p_j (log p_j - log q_j - KL(p ‖ q))
    else   J = β KL(q ‖ m) + (1 - β) KL(p ‖ m)
                                               ∂/∂u_j = (1 - β) p_j (log p_j - log m_j - KL(p ‖ m))

(``∂J/∂p_j = (1 - β)(log p_j - log m_j)``: the terms through ``m`` cancel, since
``β q_j/m_j + (1 - β) p_j/m_j = 1``; then softmax's Jacobian gives the last column.)
"""

from __future__ import annotations

import math

import torch

from xent._engine.options import DivergenceParams, LogProbParams, PolicyParams, Transform
from xent._numerics import Scratch, compute_dtype, host_reads_cheap

# Bytes of fp32 per scratch buffer when the caller gives no block size. Each block costs ~8 torch
# calls; on a CPU shared with other processes a call's thread hand-off was measured at up to
# ~4 ms (2 threads, load 6 on 2 cores), so blocks larger than the 4 MiB the cross-entropy kernel
# uses pay for the lost cache locality there. The chunk walker's callers pass the chunk itself
# as the block (one scratch buffer per chunk, counted in the chunk budget). The divergences hold
# six buffers, so their blocks are a sixth of this.
BLOCK_BYTES = 16 << 20
LOG2E = 1.4426950408889634  # 1 / ln 2
LN2 = 0.6931471805599453
# exp(-1e4) is exactly 0 in fp32 and fp64: log-probabilities clamped here give the same
# probabilities, and products p·log p stay 0·(finite) = 0 instead of 0·(-inf) = NaN.
LOG_FLOOR = -1.0e4


def _rows_per_block(block_rows: int | None, vocab: int, buffers_per_block: int = 1) -> int:
    if block_rows is not None:
        return max(1, int(block_rows))
    return max(1, BLOCK_BYTES // (4 * buffers_per_block * max(vocab, 1)))


def _row_factor(
    inv_temp: torch.Tensor | float, start: int, stop: int, factor: float
) -> torch.Tensor | float:
    """``factor / T_i`` for the rows of a block: a number, or an ``(n, 1)`` column."""
    if isinstance(inv_temp, torch.Tensor):
        return inv_temp[start:stop, None] * factor
    return inv_temp * factor


def _transform(
    x: torch.Tensor,
    tf: Transform,
    inv_t: torch.Tensor | float,
    out: torch.Tensor,
    tanh_out: torch.Tensor | None,
) -> torch.Tensor | None:
    """``out ← u`` for a block of raw logits ``x``; returns ``tanh(a·x / s)`` when capped.

    ``inv_t`` is ``1 / T`` for the block (a number or an ``(n, 1)`` column). Half-precision
    logits are widened first: an op with a half input computes in half even into an fp32 ``out``.
    """
    src = x
    if x.dtype != out.dtype:
        out.copy_(x)
        src = out
    if tf.softcap is None:
        torch.mul(src, tf.scale * inv_t, out=out)
        return None
    torch.mul(src, tf.scale / tf.softcap, out=tanh_out)
    tanh_out.tanh_()
    torch.mul(tanh_out, tf.softcap * inv_t, out=out)
    return tanh_out


def _chain(
    g: torch.Tensor, tf: Transform, inv_t: torch.Tensor | float, tanh: torch.Tensor | None
) -> None:
    """``g ← g·∂u/∂x``, in place: ``× a / T`` (and ``× (1 - tanh²)`` through the cap)."""
    if tanh is not None:
        tanh.mul_(tanh).neg_().add_(1.0)
        g.mul_(tanh)
    g.mul_(tf.scale * inv_t)


def _shift_by_max(d: torch.Tensor) -> torch.Tensor:
    """``d ← d - max`` row by row, in place; returns the ``(n, 1)`` max (0 for all -inf rows).

    Every exponent is then ≤ 0 (no overflow) and the largest term is exactly 1 (the sum cannot
    underflow, and ``log`` of it is ≥ 0, so log-probabilities are never above 0).
    """
    m = d.amax(dim=1, keepdim=True)
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    d.sub_(m)
    return m


def _exp(d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # e^d as 2^(d·log2 e): torch's exp2 is ~3× faster than its exp on AVX-512 CPUs (as measured
    # for the cross-entropy kernel); the product adds a relative error of ≤ |d|·2⁻²⁴.
    torch.mul(d, LOG2E, out=out)
    return out.exp2_()


def _targets(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, safe)``: rows that count, and targets with ignored ones replaced by 0."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target)).long()


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def _log2_shifted(
    x: torch.Tensor,
    tf: Transform,
    inv_t: torch.Tensor | float,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    d: torch.Tensor,
    tanh_out: torch.Tensor | None,
    raw_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d ← (u - max u)·log₂e`` for a block (forward), or ``d ← log₂ p`` from the row's saved
    ``stats = (m, log s)`` (backward).

    ``m`` is the shift the forward took: the row max of ``u`` through a cap, of the raw logits
    ``x`` without one (``u = f·x`` with ``f = a / T > 0``, so ``max u = f·max x``, and the
    shift is taken on ``x`` itself: ``d = (x - m)·(f log₂e)``, exact near the max and 0 at it,
    where ``f·x - f·m`` would subtract two rounded numbers of the logits' size).
    ``raw_max`` (no cap only): the ``(n, 1)`` max of ``x`` over the row, when it is known from
    elsewhere (the other slices of a split vocabulary).

    Returns ``(m, tanh)``. Backward forms ``log₂ p = (u - m)·log₂e - log s·log₂e``: the large
    ``u - m`` first, then the small ``log s``, never ``u - lse``. Working in base 2 lets
    ``exp2`` (~3× faster than ``exp`` on AVX-512 CPUs, as measured for the cross-entropy
    kernel) run without a separate multiply.
    """
    if tf.softcap is not None:
        _transform(x, tf, inv_t, d, tanh_out)
        if stats is None:
            shift = _shift_by_max(d)
            d.mul_(LOG2E)
            return shift, tanh_out
        shift, log_s = stats
        d.sub_(shift)
        torch.add(log_s * -LOG2E, d, alpha=LOG2E, out=d)
        return shift, tanh_out
    f = tf.scale * inv_t
    if stats is not None:
        shift, log_s = stats
        torch.sub(x, shift, out=d)
        if isinstance(f, torch.Tensor):
            torch.addcmul(log_s * -LOG2E, d, f * LOG2E, out=d)
        else:
            torch.add(log_s * -LOG2E, d, alpha=f * LOG2E, out=d)
        return shift, None
    mx = x.amax(dim=1, keepdim=True).to(d.dtype) if raw_max is None else raw_max
    mx = torch.where(mx == -torch.inf, torch.zeros_like(mx), mx)
    # The row's max gives exactly 0 here (x - mx = 0), so every exponent is ≤ 0 and the largest
    # term is exactly 1: no overflow, no underflow of the sum, log of it ≥ 0.
    torch.sub(x, mx, out=d)
    d.mul_(f * LOG2E)
    return mx, None


def _finite_dot_(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``Σ_j e_j d_j`` per row with ``0·(-inf) = 0`` (``e = 2^d``); overwrites ``e``.

    A ``-inf`` logit makes its product NaN; only rows where that happened are summed again
    without their NaNs (a NaN logit makes the row's ``log s``, and so its entropy, NaN anyway).
    One multiply and one sum: ``torch.special.xlogy(e, e)`` does the same in one call but
    measured ~3× slower than both together on a CPU.
    """
    w = e.mul_(d).sum(dim=1)
    if not host_reads_cheap(w):
        return torch.where(torch.isnan(w), torch.nansum(e, dim=1), w)
    bad = torch.isnan(w)
    if bool(bad.any()):
        w[bad] = torch.nansum(e[bad], dim=1)
    return w


def log_prob_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: LogProbParams,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(log p_y, H, top1, m, log s)`` of each row of ``x``, all ``(n)`` in the compute dtype.

    ``H`` and ``top1`` (1.0 where ``y`` is the row's arg-max, the first of tied maxima, else
    0.0) are None unless asked for. Ignored rows give 0 (``m`` and ``log s`` are still theirs).
    ``m`` is the row's shift (:func:`_log2_shifted`: the max of ``x`` without a cap, of ``u``
    through one; 0 for a row of only ``-inf``) and ``log s = log Σ e^{u - max u}``: kept apart,
    not as ``lse``, so that backward's ``log p = (u - max u) - log s`` never subtracts a rounded
    ``lse`` from a logit of its size.
    """
    n, vocab = x.shape
    cdtype = compute_dtype(x.dtype)
    tf = params.transform
    valid, safe = _targets(target, params.ignore_index)
    lp = torch.empty(n, dtype=cdtype, device=x.device)
    m_all = torch.empty(n, dtype=cdtype, device=x.device)
    log_s_all = torch.empty(n, dtype=cdtype, device=x.device)
    ent = torch.empty(n, dtype=cdtype, device=x.device) if params.entropy else None
    top = torch.empty(n, dtype=cdtype, device=x.device) if params.top1 else None
    step = _rows_per_block(params.block_rows, vocab)
    scratch = Scratch(min(step, max(n, 1)), vocab, x.device, cdtype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        d = scratch.get("u", rows)
        tanh = scratch.get("tanh", rows) if tf.softcap is not None else None
        inv_t = _row_factor(inv_temp, start, stop, 1.0)
        m, _ = _log2_shifted(x[start:stop], tf, inv_t, None, d, tanh)
        ok = valid[start:stop]
        d_y = d.gather(1, safe[start:stop, None]).squeeze(1)  # (u_y - max)·log₂e ≤ 0, exactly
        if top is not None:  # argmax's convention: the first maximum is the top-1
            top[start:stop] = (ok & (d.argmax(dim=1) == safe[start:stop])).to(cdtype)
        # e = e^{u - m}: over d when only the log-probabilities are wanted (one scratch buffer),
        # beside it for the entropy.
        e = d.exp2_() if ent is None else torch.exp2(d, out=scratch.get("e", rows))
        s = e.sum(dim=1)
        log_s = s.log()  # ≥ 0: the max term is exactly 1
        lp[start:stop] = torch.where(ok, d_y * LN2 - log_s, 0.0)
        m_all[start:stop] = m.squeeze(1)
        log_s_all[start:stop] = log_s
        if ent is not None:
            # H = log s - Σ e (u - m) / s; a rounding below 0 is clamped (H ≥ 0 exactly).
            h = log_s - _finite_dot_(e, d) * LN2 / s
            ent[start:stop] = torch.where(ok, h.clamp_(min=0.0), 0.0)
    return lp, ent, top, m_all, log_s_all


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
    owned: torch.Tensor | None = None,
) -> None:
    """``grad_out ← Σ_i ∂(c_i log p_{y_i} + e_i H_i)/∂x`` from the saved ``(m, log s)`` and ``H``.

    ``log p_j = (u_j - m) - log s``: ``u - m`` first (exact near the max, and 0 at it), then the
    small ``log s``, as the forward formed it.

    ``coef_lp`` (``c``) and ``coef_ent`` (``e``, or None when the entropy is not in the loss:
    then the kernel does the log-probability's work only) are ``(n)`` and 0 on ignored rows.
    ``grad_out`` may be ``x`` itself (each block is read before it is written). ``owned``
    (vocabulary parallelism: ``x`` is one slice of the classes, ``target`` local indices) marks
    the rows whose target lies in the slice; the others get no ``[j = y]`` term.
    """
    n, vocab = x.shape
    cdtype = compute_dtype(x.dtype)
    tf = params.transform
    valid, safe = _targets(target, params.ignore_index)
    step = _rows_per_block(params.block_rows, vocab)
    scratch = Scratch(min(step, max(n, 1)), vocab, x.device, cdtype)
    direct = grad_out.dtype == cdtype
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        inv_t = _row_factor(inv_temp, start, stop, 1.0)
        tanh = scratch.get("tanh", rows) if tf.softcap is not None else None
        g = grad_out[start:stop] if direct else scratch.get("g", rows)
        # Without the entropy, log₂ p is formed straight in the gradient's buffer (which may be
        # x's own: each element is read before it is written) and no scratch is needed.
        d = g if coef_ent is None else scratch.get("u", rows)
        stats = (m[start:stop, None], log_s[start:stop, None])
        _, tanh = _log2_shifted(x[start:stop], tf, inv_t, stats, d, tanh)
        # d = log₂ p. Without a cap the chain factor ∂u/∂x = a/T is a per-row number, folded
        # into the coefficients; through a cap it is per element, applied at the end.
        fac = tf.scale * inv_t if tanh is None else 1.0
        c = coef_lp[start:stop, None] * fac
        if coef_ent is None:
            g.exp2_().mul_(-c)  # ∂/∂u_j = c ([j = y] - p_j)
        else:
            torch.exp2(d, out=g)  # p
            # ∂/∂u_j = c [j = y] + p_j (-(c + e H) - e ln 2 · log₂ p_j)
            d.clamp_(min=LOG_FLOOR)  # p_j = 0 stays 0 and p_j·log p_j stays finite
            ce = coef_ent[start:stop, None] * fac
            torch.addcmul(-(c + ce * ent[start:stop, None]), d, ce * -LN2, out=d)
            g.mul_(d)
        if owned is not None:
            c = torch.where(owned[start:stop, None], c, 0.0)
        g.scatter_add_(1, safe[start:stop, None], c)
        if tanh is not None:
            _chain(g, tf, inv_t, tanh)
        ok = valid[start:stop]
        if ok.device.type != "cpu" or not bool(ok.all()):
            # Ignored rows get exactly 0, whatever their logits (even ±inf or NaN).
            g.masked_fill_(~ok[:, None], 0.0)
        if not direct:
            grad_out[start:stop].copy_(g)


# --------------------------------------------------------------------------------------------
# The clipped policy-gradient loss
# --------------------------------------------------------------------------------------------


def policy_terms(
    lp: torch.Tensor,
    ent: torch.Tensor | None,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    params: PolicyParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ, ∂ℓ/∂log p, clipped)`` per token from its log-probability and entropy.

    ``r = e^{log p - old}`` (1 on-policy), ``ℓ = -min(r A, clip(r) A) - β H``; the clipped term
    wins (``clipped``, and no gradient through ``log p``) only where it is strictly smaller, so
    ``∂ℓ/∂log p = -A r [not clipped]``. All three are 0 on ignored tokens.
    """
    a = advantages.to(lp.dtype)
    if params.off_policy:
        r = torch.exp(lp - old_log_probs.to(lp.dtype))
    else:
        r = torch.ones_like(lp)
    ra = r * a
    ca = r.clamp(1.0 - params.clip_low, 1.0 + params.clip_high) * a
    clipped = valid & (ca < ra)
    loss = -torch.where(clipped, ca, ra)
    if params.entropy_coef != 0.0:
        loss = loss - params.entropy_coef * ent
    loss = torch.where(valid, loss, 0.0)
    return loss, torch.where(valid & ~clipped, -ra, 0.0), clipped.to(lp.dtype)


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
    """``(ℓ, log p_y, H, clipped)`` per row (``(n)``, compute dtype; H is 0 unless
    ``params.log_probs.entropy``), and with ``grad_out`` also ``Σ_i c_i ∂ℓ_i/∂x`` written there.

    The loss of a token depends on the logits only through ``log p_y`` and ``H``, so its
    gradient is the log-probability kernel's with the coefficients known once the row's
    statistics are: ``∂L/∂log p_y = c_i·(-A r [not clipped])`` and ``∂L/∂H = -c_i β``
    (:func:`policy_terms`), and :func:`log_prob_grad_rows` turns them into
    ``∂L/∂u_j = a [j = y] - p_j (a + b (log p_j + H))`` and the transform's chain rule. ``coef``
    (``c``, 0 on ignored rows) is required with ``grad_out``; ``grad_out`` may be ``x`` itself.
    """
    lpp = params.log_probs
    lp, ent, _, m, log_s = log_prob_rows(x, target, inv_temp, lpp)
    valid = target != lpp.ignore_index
    loss, dlp, clipped = policy_terms(lp, ent, valid, advantages, old_log_probs, params)
    if grad_out is not None:
        c_ent = None if params.entropy_coef == 0.0 else coef * -params.entropy_coef
        log_prob_grad_rows(x, target, inv_temp, lpp, m, log_s, ent, coef * dlp, c_ent, grad_out)
    return loss, lp, torch.zeros_like(lp) if ent is None else ent, clipped


def log_prob_rows_parallel(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: LogProbParams,
    parallel,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`log_prob_rows` when ``x`` is this rank's slice ``[start, start + V_r)`` of the
    vocabulary (``parallel``: a :class:`xent._engine.parallel.VocabParallel`); ``target`` holds
    global class indices. Results are the global ones, the same on every rank.

    Communication, per call of ``n`` rows: an all-reduce MAX of ``n`` (the row max), one SUM of
    ``3n`` (``Σ e^{u-m}``, ``Σ e^{u-m}(u-m)``, the target's ``u_y - m`` from the rank that holds
    it) and, for ``top1``, a MAX of ``n`` (minus the first global index of the maximum).
    """
    n, vocab = x.shape
    cdtype = compute_dtype(x.dtype)
    tf = params.transform
    valid, safe = _targets(target, params.ignore_index)
    local = safe - parallel.start
    owned = valid & (local >= 0) & (local < vocab)
    local = torch.where(owned, local, torch.zeros_like(local))
    step = _rows_per_block(params.block_rows, vocab)
    scratch = Scratch(min(step, max(n, 1)), vocab, x.device, cdtype)
    # The global row max: of the raw logits without a cap (u = f·x with f > 0, and the shift
    # from it is exact), of u through one.
    m = torch.empty(n, 1, dtype=cdtype, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        if tf.softcap is None:
            m[start:stop] = x[start:stop].amax(dim=1, keepdim=True)
            continue
        d = scratch.get("u", stop - start)
        inv_t = _row_factor(inv_temp, start, stop, 1.0)
        _transform(x[start:stop], tf, inv_t, d, scratch.get("tanh", stop - start))
        m[start:stop] = d.amax(dim=1, keepdim=True)
    parallel.all_reduce_max(m)
    m_u = torch.empty(n, dtype=cdtype, device=x.device)  # the shift (of x, or of u when capped)
    sums = torch.zeros(3, n, dtype=cdtype, device=x.device)  # Σ e, Σ e ln e, d_y (base 2)
    first = torch.full((n,), float(-parallel.vocab), dtype=cdtype, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        d = scratch.get("u", rows)
        tanh = scratch.get("tanh", rows) if tf.softcap is not None else None
        inv_t = _row_factor(inv_temp, start, stop, 1.0)
        if tf.softcap is None:
            shift, _ = _log2_shifted(x[start:stop], tf, inv_t, None, d, None, m[start:stop])
        else:
            mu = m[start:stop]
            shift = torch.where(mu == -torch.inf, 0.0, mu)
            _transform(x[start:stop], tf, inv_t, d, tanh)
            d.sub_(shift).mul_(LOG2E)
        m_u[start:stop] = shift.squeeze(1)
        d_y = d.gather(1, local[start:stop, None]).squeeze(1)
        sums[2, start:stop] = torch.where(owned[start:stop], d_y, 0.0)
        if params.top1:
            # This slice's first maximum, if it reaches the global one; MAX of minus the index
            # then picks the first over all slices.
            best, idx = d.max(dim=1)
            first[start:stop] = torch.where(
                best >= 0, -(idx + parallel.start).to(cdtype), first[start:stop]
            )
        e = d.exp2_()
        sums[0, start:stop] = e.sum(dim=1)
        if params.entropy:
            sums[1, start:stop] = torch.special.xlogy(e, e, out=e).sum(dim=1)  # Σ e ln e
    parallel.all_reduce_sum(sums)
    s, w, d_y = sums
    log_s = s.log()
    lp = torch.where(valid, d_y * LN2 - log_s, 0.0)
    ent = top = None
    if params.entropy:
        ent = torch.where(valid, (log_s - w / s).clamp_(min=0.0), 0.0)
    if params.top1:
        parallel.all_reduce_max(first)
        top = (valid & (-first == safe)).to(cdtype)
    return lp, ent, top, m_u, log_s


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


def _log_softmax_(u: torch.Tensor, p_out: torch.Tensor) -> None:
    """``u ← log softmax(u)`` and ``p_out ← softmax(u)``, row by row, in place."""
    _shift_by_max(u)
    e = _exp(u, p_out)
    s = e.sum(dim=1, keepdim=True)
    u.sub_(s.log())
    e.div_(s)


def _weighted_sum(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor):
    """``Σ_j w_j (a_j - b_j)`` per row with ``0·anything = 0`` (``w = 0`` where ``a = -inf``)."""
    torch.sub(a, b, out=tmp)
    tmp.mul_(w).masked_fill_(w == 0, 0.0)
    return tmp.sum(dim=1)


def divergence_rows(
    xs: torch.Tensor,
    xt: torch.Tensor,
    inv_temp: torch.Tensor | float,
    params: DivergenceParams,
    valid: torch.Tensor | None = None,
    coef: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row divergence between student logits ``xs`` and teacher logits ``xt`` (both ``(n, V)``).

    Rows with ``valid`` False give 0. With ``grad_out`` (``xs``'s shape; may be ``xs`` itself),
    also writes ``Σ_i c_i ∂l_i/∂xs`` there, ``coef`` (``c``, ``(n)``) being 0 on invalid rows.
    The teacher gets no gradient.
    """
    n, vocab = xs.shape
    cdtype = compute_dtype(xs.dtype)
    beta = params.beta
    loss = torch.empty(n, dtype=cdtype, device=xs.device)
    step = _rows_per_block(params.block_rows, vocab, buffers_per_block=6)
    scratch = Scratch(min(step, max(n, 1)), vocab, xs.device, cdtype)
    direct = grad_out is not None and grad_out.dtype == cdtype
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        inv_t = _row_factor(inv_temp, start, stop, 1.0)
        ls, p = scratch.get("ls", rows), scratch.get("p", rows)
        tanh = _transform(
            xs[start:stop],
            params.student,
            inv_t,
            ls,
            scratch.get("tanh", rows) if params.student.softcap else None,
        )
        _log_softmax_(ls, p)
        lt, q = scratch.get("lt", rows), scratch.get("q", rows)
        _transform(
            xt[start:stop],
            params.teacher,
            inv_t,
            lt,
            scratch.get("tanh_t", rows) if params.teacher.softcap else None,
        )
        _log_softmax_(lt, q)
        tmp = scratch.get("tmp", rows)
        if beta == 0.0:
            row = _weighted_sum(q, lt, ls, tmp)
        elif beta == 1.0:
            row = _weighted_sum(p, ls, lt, tmp)
        else:
            # log m = logaddexp(log(1 - β) + log p, log β + log q): exact where either is -inf.
            lm = scratch.get("lm", rows)
            torch.add(ls, math.log(1.0 - beta), out=lm)
            torch.add(lt, math.log(beta), out=tmp)
            torch.logaddexp(lm, tmp, out=lm)
            kl_pm = _weighted_sum(p, ls, lm, tmp)
            row = beta * _weighted_sum(q, lt, lm, tmp) + (1.0 - beta) * kl_pm
        if valid is not None:
            row = torch.where(valid[start:stop], row, 0.0)
        loss[start:stop] = row
        if grad_out is None:
            continue
        g = grad_out[start:stop] if direct else scratch.get("g", rows)
        c = coef[start:stop, None]
        if beta == 0.0:
            torch.sub(p, q, out=g)
        elif beta == 1.0:
            torch.sub(ls, lt, out=g)
            g.sub_(row[:, None]).mul_(p).masked_fill_(p == 0, 0.0)
            # Where the teacher has no mass and the student has, KL(p ‖ q) = inf and its
            # gradient is undefined; a row with coefficient 0 still gets exactly 0.
            g.masked_fill_(c == 0, 0.0)
        else:
            torch.sub(ls, lm, out=g)
            g.sub_(kl_pm[:, None]).mul_(p).masked_fill_(p == 0, 0.0)
            c = c * (1.0 - beta)
        g.mul_(c)
        _chain(g, params.student, inv_t, tanh)
        if valid is not None:
            g.masked_fill_(~valid[start:stop, None], 0.0)
        if not direct:
            grad_out[start:stop].copy_(g)
    return loss
