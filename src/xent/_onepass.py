"""Cross-entropy in one pass over the logits: loss, log-sum-exp and gradient, chunk by chunk.

The rows of the ``(M, C)`` logits are visited in chunks small enough to stay in cache. Each chunk
is read from memory once; the max, the exponentials, their sum, the loss and the gradient are then
formed while it is still cached, and the gradient is written straight into its final buffer. No
``M × C`` temporary exists besides that gradient (and none at all with ``inplace``).

The algebra, per row, with ``z`` the (optionally soft-capped) logits, ``lse = log Σ_c e^{z_c}``,
``p = e^{z - lse}``, target ``y``, class weights ``w``, smoothing ``ε``, z-loss coefficient ``ζ``:

    loss  l = (1 - ε) w_y (lse - z_y) + (ε/C) (lse Σ_c w_c - Σ_c w_c z_c) + ζ lse²
    grad  ∂l/∂z_j = p_j A - B_j,   A = (1 - ε) w_y + (ε/C) Σ_c w_c + 2ζ lse,
                                   B_j = (1 - ε) w_y [j = y] + (ε/C) w_j

(because ∂lse/∂z_j = p_j). For probability targets ``q' = (1 - ε) q + ε/C`` replaces the two
target terms: ``l = lse S - Σ_c w_c q'_c z_c + ζ lse²`` with ``S = Σ_c w_c q'_c``, so
``∂l/∂z_j = p_j (S + 2ζ lse) - w_j q'_j`` and ``∂l/∂q_c = -(1 - ε) w_c (z_c - lse)``.
Soft-capping ``z = s tanh(x / s)`` multiplies the gradient by ``∂z/∂x = 1 - tanh²(x / s)``.
A reduction enters as one coefficient per row, ``c_i = ∂L/∂l_i``, known before the pass.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xent._validation import compute_dtype

# Bytes of fp32 logits per chunk: a few MiB keeps a chunk and its gradient in the L2/L3 caches of
# current CPUs while making each torch call long enough that its fixed cost (~10 µs) is noise.
# Measured with `xent bench ce` on a 2-core AMD EPYC (AVX-512): 1–8 MiB were within 5 % of each
# other; 64 KiB was 1.8× slower.
CHUNK_BYTES = 4 << 20
LOG2E = 1.4426950408889634  # 1 / ln 2


@dataclass(frozen=True)
class CEParams:
    """Options of one cross-entropy call; travels through autograd unchanged."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_rows: int | None = None
    impl: str = "torch"  # "torch" (this module) or "triton" (xent._triton_ce)

    def options(self) -> list[float]:
        """The numeric options as a flat list, the form ``torch.library`` operators accept."""
        return [
            float(self.ignore_index),
            self.label_smoothing,
            self.z_loss,
            0.0 if self.softcap is None else self.softcap,
            0.0 if self.chunk_rows is None else float(self.chunk_rows),
            1.0 if self.impl == "triton" else 0.0,
        ]

    @classmethod
    def from_options(cls, reduction: str, options: list[float]) -> CEParams:
        """Inverse of :meth:`options`."""
        ignore_index, eps, zeta, cap, rows, triton = options
        impl = "triton" if triton else "torch"
        return cls(int(ignore_index), reduction, eps, zeta, cap or None, int(rows) or None, impl)

    def rows_per_chunk(self, num_classes: int) -> int:
        if self.chunk_rows is not None:
            return max(1, int(self.chunk_rows))
        return max(1, CHUNK_BYTES // (4 * max(num_classes, 1)))


# --------------------------------------------------------------------------------------------
# Large buffers
# --------------------------------------------------------------------------------------------

_MADV_HUGEPAGE = 14
_HUGE = 2 << 20
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _libc = None


def empty_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for a large write-once result (the gradient).

    On Linux CPUs, buffers of at least 8 MiB are marked ``MADV_HUGEPAGE`` before first touch, so
    the kernel backs them with 2 MiB pages: a fresh 512 MiB gradient then costs ~260 page faults
    instead of ~130 000, which measured ~130 ms per call here. The advice is only a hint; where it
    is refused nothing changes.
    """
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    nbytes = out.numel() * out.element_size()
    if _libc is not None and out.device.type == "cpu" and nbytes >= 4 * _HUGE:
        start = (out.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
        end = (out.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _libc.madvise(start, end - start, _MADV_HUGEPAGE)
    return out


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def target_weights(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid, safe_target, w_y)`` for ``(M)`` class indices.

    ``valid`` marks rows that count; ``safe_target`` replaces ignored targets (which may lie
    outside ``[0, C)``) by 0 so they can be gathered; ``w_y`` is the weight of each row's target,
    exactly 0 on ignored rows. Indices are int64 so ``M·C > 2³¹`` addresses correctly.
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    if weight is None:
        w_y = valid.to(dtype)
    else:
        w_y = torch.where(valid, weight[safe], torch.zeros((), dtype=dtype, device=weight.device))
    return valid, safe, w_y


class _Scratch:
    """Chunk-sized fp32 work buffers, allocated once per call and only when needed."""

    def __init__(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.device, self.dtype = (rows, cols), device, dtype
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        return self._bufs[name][:rows]


def _capped_logits(
    xs: torch.Tensor, softcap: float | None, cdtype: torch.dtype, scratch: _Scratch
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
    lse_in: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    grad_target_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked pass over ``(M, C)`` logits ``x``.

    Args:
        x: logits ``(M, C)``, contiguous, any floating dtype.
        target: ``(M)`` class indices, or ``(M, C)`` probabilities (floating dtype).
        weight: ``(C)`` class weights or None.
        row_coef: ``(M)`` coefficients ``c_i = ∂L/∂l_i`` in the compute dtype (0 on ignored
            rows); required when a gradient is written.
        params: the options.
        lse_in: ``(M)`` log-sum-exp from an earlier pass; skips computing it again.
        grad_out: ``(M, C)`` buffer (``x``'s dtype; may be ``x`` itself) that receives
            ``c_i ∂l_i/∂x``; None to compute only loss and log-sum-exp.
        grad_target_out: ``(M, C)`` buffer for ``c_i ∂l_i/∂q`` (probability targets only).

    Returns:
        ``(loss, lse)``: per-row losses ``l_i`` (ignored rows 0) and log-sum-exps, both ``(M)`` in
        the compute dtype (fp32, or fp64 for fp64 logits).
    """
    num_rows, num_classes = x.shape
    cdtype = compute_dtype(x.dtype)
    device = x.device
    probs = target.dim() == 2
    eps, zeta, cap = params.label_smoothing, params.z_loss, params.softcap
    w = None if weight is None else weight.to(device=device, dtype=cdtype)
    w_sum = float(num_classes) if w is None else None  # Σ_c w_c, as a number or a tensor
    w_total = w.sum() if w is not None else None
    w_row = torch.ones(num_classes, device=device, dtype=cdtype) if w is None else w

    loss = torch.empty(num_rows, device=device, dtype=cdtype)
    lse_all = torch.empty(num_rows, device=device, dtype=cdtype)
    if not probs:
        valid, safe, w_y_all = target_weights(target, w, params.ignore_index, cdtype)

    inplace = grad_out is not None and grad_out.data_ptr() == x.data_ptr()
    rows = params.rows_per_chunk(num_classes)
    scratch = _Scratch(min(rows, max(num_rows, 1)), num_classes, device, cdtype)
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
            if eps > 0.0:
                wz = z.sum(dim=1, keepdim=True) if w is None else (z @ w).unsqueeze(1)
        m = None
        if lse_in is None:
            m = z.amax(dim=1, keepdim=True)
            m = torch.where(m == -torch.inf, torch.zeros_like(m), m)

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
        shift = m if m is not None else lse_in[start:stop, None]
        torch.sub(z, shift, out=e)
        if probs:
            # Σ w q' (z - m), relative to the max: the loss log(s)·S - Σ w q' (z - m) then never
            # subtracts two large numbers when the logits are far from 0.
            wz = torch.linalg.vecdot(wq, e, dim=1).unsqueeze(1)
        e.mul_(LOG2E).exp2_()
        if m is not None:
            s = e.sum(dim=1, keepdim=True)
            log_s = s.log()  # lse - m
            lse = m + log_s
        else:
            lse, s, log_s = shift, None, 0.0  # e is already normalised: e = p
        lse_all[start:stop] = lse.squeeze(1)

        if probs:
            row_loss = log_s * big_s - wz
            a_coef = big_s
        else:
            # Ignored rows are zeroed with `where` (their logits may be ±inf; 0·inf is NaN).
            row_loss = torch.where(row_valid, w_y * (lse - z_y), 0.0)
            a_coef = (1.0 - eps) * w_y
            if eps > 0.0:
                ws = w_sum if w is None else w_total
                smooth = torch.where(row_valid, lse * ws - wz, 0.0)
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
            # ∂l/∂q_c = -(1 - ε) w_c (z_c - lse), scaled by the row coefficient.
            gq = (z - lse).mul_(-(1.0 - eps) * row_coef[start:stop, None])
            grad_target_out[start:stop].copy_(gq if w is None else gq.mul_(w))

        if gs is None:
            continue
        # ∂l/∂z_j = p_j A - B_j, times c_i. p_j = e_j / s (or e_j when lse was given).
        c = row_coef[start:stop, None]
        scale = c * a_coef if s is None else c * a_coef / s
        e.mul_(scale)
        if probs:
            wq.mul_(c)
            e.sub_(wq)
        else:
            e.scatter_add_(1, ys, -(1.0 - eps) * c * w_y)
            if eps > 0.0:
                e.addr_(c.squeeze(1), w_row, alpha=-eps / num_classes)
        if tanh is not None:
            # Chain rule through z = s·tanh(x/s): ∂z/∂x = 1 - tanh².
            tanh.mul_(tanh).neg_().add_(1.0)
            e.mul_(tanh)
        if not direct:
            gs.copy_(e)
    return loss, lse_all


def pass_for(params: CEParams) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The kernel that runs ``params``: :func:`cross_entropy_pass` or its Triton twin."""
    if params.impl == "triton":
        from xent._triton_ce import cross_entropy_pass_triton  # Triton is imported on demand

        return cross_entropy_pass_triton
    return cross_entropy_pass


def resolve_impl(impl: str, x: torch.Tensor, choices: tuple[str, ...]) -> str:
    """``"auto"`` → ``"triton"`` on CUDA when Triton is installed, else ``"torch"``; checks."""
    if impl not in choices:
        raise ValueError(f"impl must be one of {', '.join(map(repr, choices))}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    if impl == "triton":
        if not _triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install 'xent[gpu]')")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' runs on CUDA tensors (got a {x.device.type} tensor); set "
                "TRITON_INTERPRET=1 to run the kernels through Triton's interpreter instead"
            )
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
