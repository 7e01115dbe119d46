"""Cross-entropy in one pass over the logits: loss, log-sum-exp and gradient, chunk by chunk.

The rows of the ``(M, C)`` logits are visited in chunks small enough to stay in cache. Each chunk
is read from memory once; the max, the exponentials, their sum, the loss and the gradient are then
formed while it is still cached, and the gradient is written straight into its final buffer. No
``M × C`` temporary exists besides that gradient (and none at all with ``inplace``).

The algebra, per row, with ``z`` the (optionally soft-capped) logits, ``m = max_c z_c``,
``s = Σ_c e^{z_c - m}``, ``lse = m + log s``, ``p = e^{z - m} / s``, target ``y``, class weights
``w``, smoothing ``ε``, z-loss coefficient ``ζ``:

    loss  l = (1 - ε) w_y (log s - (z_y - m)) + (ε/C) (log s Σ_c w_c - Σ_c w_c (z_c - m)) + ζ lse²
    grad  ∂l/∂z_j = p_j A - B_j,   A = (1 - ε) w_y + (ε/C) Σ_c w_c + 2ζ lse,
                                   B_j = (1 - ε) w_y [j = y] + (ε/C) w_j

(because ∂lse/∂z_j = p_j). For probability targets ``q' = (1 - ε) q + ε/C`` replaces the two
target terms: ``l = log s · S - Σ_c w_c q'_c (z_c - m) + ζ lse²`` with ``S = Σ_c w_c q'_c``, so
``∂l/∂z_j = p_j (S + 2ζ lse) - w_j q'_j`` and ``∂l/∂q_c = -(1 - ε) w_c ((z_c - m) - log s)``.

**Everything relative to the row max.** No term is formed from ``lse`` and a logit: ``lse - z_y``
would subtract two numbers of the logits' magnitude (at logits near 10⁷ in fp32 the loss would
keep no correct digit, and at ``[fmax, fmax, 0]`` ``e^{z - lse}`` rounds to 1 for both maxima).
``z - m`` is formed first (exact when the two are within a factor of 2 of each other, and where
the large terms live), and ``log s`` and ``z - m`` are both of the size of the loss itself. Only
the z-loss uses ``lse = m + log s``, where ``lse`` itself is the quantity. The statistics a later
pass needs are therefore kept as the pair ``(m, log s)``, not as ``lse``: backward forms
``p = e^{z - m} / s`` with ``s = e^{log s}`` by the forward's own arithmetic.
Soft-capping ``z = s tanh(x / s)`` multiplies the gradient by ``∂z/∂x = 1 - tanh²(x / s)``.
A reduction enters as one coefficient per row, ``c_i = ∂L/∂l_i``, known before the pass.
"""

from __future__ import annotations

import torch

from xent._engine.options import CEParams
from xent._numerics import Scratch, compute_dtype, target_weights

LOG2E = 1.4426950408889634  # 1 / ln 2


def _capped_logits(
    xs: torch.Tensor, softcap: float | None, cdtype: torch.dtype, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's logits ``z`` in the compute dtype, and ``tanh(x / s)`` when soft-capped."""
    rows = xs.shape[0]
    if softcap is not None:
        t = scratch.get("tanh", rows)
        torch.div(xs, softcap, out=t)
        t.tanh_()
        z = scratch.get("z", rows)
        torch.mul(t, softcap, out=z)
        return z, t
    if xs.dtype != cdtype:
        z = scratch.get("z", rows)
        z.copy_(xs)
        return z, None
    return xs, None


def cross_entropy_pass(
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
    """One chunked pass over ``(M, C)`` logits ``x``.

    Args:
        x: logits ``(M, C)``, contiguous, any floating dtype.
        target: ``(M)`` class indices, or ``(M, C)`` probabilities (floating dtype).
        weight: ``(C)`` class weights or None (all ``C`` classes, also for a slice).
        row_coef: ``(M)`` coefficients ``c_i = ∂L/∂l_i`` in the compute dtype (0 on ignored
            rows); required when a gradient is written.
        params: the options.
        stats_in: ``(m, log s)``, each ``(M)``, from an earlier pass (the row max, 0 for a row
            of only ``-inf``, and the log of ``Σ_c e^{z_c - m}``); skips computing them again.
        grad_out: ``(M, C)`` buffer (``x``'s dtype; may be ``x`` itself) that receives
            ``c_i ∂l_i/∂x``; None to compute only loss and log-sum-exp.
        grad_target_out: ``(M, C)`` buffer for ``c_i ∂l_i/∂q`` (probability targets only).

    With ``params.sliced`` the logits are one rank's slice of the vocabulary: the pass then
    forms only the gradient of that slice from the global ``stats_in`` (``A`` with the global
    ``w_y``, ``Σ_c w_c`` and ``C``; ``B_j`` on the slice's columns); its loss output is unused.

    Returns:
        ``(loss, m, log_s)``: per-row losses ``l_i`` (ignored rows 0), the row max (the shift;
        0 for an all ``-inf`` row) and ``log Σ_c e^{z_c - m}``, all ``(M)`` in the compute dtype
        (fp32, or fp64 for fp64 logits); ``lse = m + log_s``. With ``stats_in`` the last two are
        the given ones.
    """
    num_rows, width = x.shape
    # A vocabulary slice (params.sliced): these are classes [first, first + width) of C; the
    # class weights and the targets are global. Otherwise first = 0 and C = width.
    num_classes = params.num_classes if params.sliced else width
    first = params.class_start
    if params.sliced and (stats_in is None or target.dim() == 2):
        raise ValueError("a vocabulary slice needs the global log-sum-exp and class indices")
    cdtype = compute_dtype(x.dtype)
    device = x.device
    probs = target.dim() == 2
    eps, zeta, cap = params.label_smoothing, params.z_loss, params.softcap
    w_full = None if weight is None else weight.to(device=device, dtype=cdtype)
    w = None if w_full is None else w_full[first : first + width]  # this slice's classes
    w_sum = float(num_classes) if w is None else None  # Σ_c w_c, as a number or a tensor
    w_total = w_full.sum() if w_full is not None else None
    w_row = torch.ones(width, device=device, dtype=cdtype) if w is None else w

    loss = torch.empty(num_rows, device=device, dtype=cdtype)
    if stats_in is None:
        m_all = torch.empty(num_rows, device=device, dtype=cdtype)
        log_s_all = torch.empty(num_rows, device=device, dtype=cdtype)
    else:
        m_all, log_s_all = (t.to(cdtype) for t in stats_in)
    if not probs:
        valid, safe, w_y_all = target_weights(target, w_full, params.ignore_index, cdtype)
        if params.sliced:
            # Targets in another rank's slice still weigh in A (through w_y) but put no -B_y
            # here: their scatter lands on column 0 with a zero value.
            mine = valid & (safe >= first) & (safe < first + width)
            safe = torch.where(mine, safe - first, 0)
            hit = mine.to(cdtype)

    inplace = grad_out is not None and grad_out.data_ptr() == x.data_ptr()
    rows = params.rows_per_chunk(width)
    scratch = Scratch(min(rows, max(num_rows, 1)), width, device, cdtype)
    for start in range(0, num_rows, rows):
        stop = min(start + rows, num_rows)
        n = stop - start
        z, tanh = _capped_logits(x[start:stop], cap, cdtype, scratch)

        # What the loss needs from the logits themselves is read first, so that the
        # exponentials may overwrite them when the gradient buffer *is* the logits (inplace).
        if probs:
            wq = scratch.get("wq", n)
            if eps > 0.0:
                torch.mul(target[start:stop], 1.0 - eps, out=wq)
                wq.add_(eps / num_classes)
            else:
                wq.copy_(target[start:stop])
            if w is not None:
                wq.mul_(w)
            big_s = wq.sum(dim=1, keepdim=True)
        else:
            ys = safe[start:stop, None]
            row_valid = valid[start:stop, None]
            w_y = w_y_all[start:stop, None]
            z_y = z.gather(1, ys)
        if stats_in is None:
            m = z.amax(dim=1, keepdim=True)
            m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
        else:
            m = m_all[start:stop, None]

        # e = exp(z - m): m is the row max, so every exponent is ≤ 0 (no overflow) and the largest
        # term is 1 (the sum cannot underflow). An all -inf row is shifted by 0 instead of -inf.
        # The exponentials go straight into the gradient buffer unless its dtype differs, or it
        # is the logits and ∂l/∂q (which needs them after the exponentials) is also wanted.
        gs = None if grad_out is None else grad_out[start:stop]
        direct = (
            gs is not None and gs.dtype == cdtype and not (inplace and grad_target_out is not None)
        )
        e = gs if direct else scratch.get("exp", n)
        # exp(z - m) is computed as 2^((z - m)·log2 e): torch's exp2 is ~3× faster than its exp
        # on CPUs with AVX-512 (measured here), which pays for the extra multiply. The difference
        # z - m is formed first, so the max entry is exactly 0 and exp2 of it exactly 1; the
        # rounding of the product adds a relative error of at most |z - m|·2⁻²⁴ to each term.
        torch.sub(z, m, out=e)
        if probs:
            # Σ w q' (z - m), relative to the max: the loss log(s)·S - Σ w q' (z - m) then never
            # subtracts two large numbers when the logits are far from 0.
            wz = torch.linalg.vecdot(wq, e, dim=1).unsqueeze(1)
        elif eps > 0.0:
            wz = e.sum(dim=1, keepdim=True) if w is None else (e @ w).unsqueeze(1)  # Σ w (z - m)
        e.mul_(LOG2E).exp2_()
        if stats_in is None:
            s = e.sum(dim=1, keepdim=True)
            log_s = s.log()  # lse - m
            m_all[start:stop] = m.squeeze(1)
            log_s_all[start:stop] = log_s.squeeze(1)
        else:
            log_s = log_s_all[start:stop, None]
            s = log_s.exp()
        lse = m + log_s  # for the z-loss only, where lse itself is the quantity

        if probs:
            row_loss = log_s * big_s - wz
            a_coef = big_s
        else:
            # Ignored rows are zeroed with `where` (their logits may be ±inf; 0·inf is NaN).
            row_loss = torch.where(row_valid, w_y * (log_s - (z_y - m)), 0.0)
            a_coef = (1.0 - eps) * w_y
            if eps > 0.0:
                ws = w_sum if w is None else w_total
                smooth = torch.where(row_valid, log_s * ws - wz, 0.0)
                row_loss = (1.0 - eps) * row_loss + (eps / num_classes) * smooth
                a_coef = a_coef + (eps / num_classes) * ws
        if zeta != 0.0:
            z_term = zeta * lse * lse
            if not probs:
                z_term = torch.where(row_valid, z_term, 0.0)
            row_loss = row_loss + z_term
            a_coef = a_coef + 2.0 * zeta * lse
        loss[start:stop] = row_loss.squeeze(1)

        if grad_target_out is not None:
            # ∂l/∂q_c = -(1 - ε) w_c ((z_c - m) - log s), scaled by the row coefficient.
            gq = (z - m).sub_(log_s).mul_(-(1.0 - eps) * row_coef[start:stop, None])
            grad_target_out[start:stop].copy_(gq if w is None else gq.mul_(w))

        if gs is None:
            continue
        # ∂l/∂z_j = p_j A - B_j, times c_i, with p_j = e_j / s.
        c = row_coef[start:stop, None]
        scale = c * a_coef / s
        e.mul_(scale)
        if probs:
            wq.mul_(c)
            e.sub_(wq)
        else:
            b_y = -(1.0 - eps) * c * w_y
            e.scatter_add_(1, ys, b_y * hit[start:stop, None] if params.sliced else b_y)
            if eps > 0.0:
                e.addr_(c.squeeze(1), w_row, alpha=-eps / num_classes)
        if tanh is not None:
            # Chain rule through z = s·tanh(x/s): ∂z/∂x = 1 - tanh².
            tanh.mul_(tanh).neg_().add_(1.0)
            e.mul_(tanh)
        if not direct:
            gs.copy_(e)
    return loss, m_all, log_s_all
