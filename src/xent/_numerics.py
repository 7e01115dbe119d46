"""The numerics every loss shares, each written once.

* the dtype arithmetic runs in (:func:`compute_dtype`), when the host may read a value
  (:func:`host_reads_cheap`) and the values under ``torch.func``'s wrappers (:func:`concrete`);
* the stable row max (:func:`stable_max`);
* per-row target weights and the coefficients ``c_i = ∂L/∂l_i`` of a reduction
  (:func:`target_weights`, :func:`row_coefficients`), and the reduction itself
  (:func:`reduce_rows`, :func:`reduce`);
* large write-once buffers (:func:`empty_buffer`).
"""

from __future__ import annotations

import ctypes
import sys

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp64 stays fp64, everything else (fp16, bf16, fp32) is fp32.

    Half-precision sums over many rows lose all precision or overflow, so they are never
    accumulated in their own dtype.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def host_reads_cheap(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs nothing: true on the CPU.

    On an accelerator such a read (``.item()``, ``bool(t)``, ``nonzero``) waits for the device
    to drain its queue and cannot be captured in a CUDA graph, so callers take a device-side
    path there instead (an asynchronous assert, an unconditional multiply).
    """
    return t.device.type == "cpu"


def concrete(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a plain tensor, with ``torch.func``'s wrappers peeled off.

    Under ``vmap`` a tensor is a per-sample view of a batched one, and under ``grad``, ``jvp``
    and ``jacrev`` it is wrapped for the transform; neither may be read on the host. Peeling
    every wrapper gives the tensor underneath (under ``vmap``: all samples at once), whose
    values a check may read without touching the traced computation. Plain tensors come back
    as they are, and so does everything while ``torch.compile`` traces (its tensors are proxies
    with no values to read).
    """
    if torch.compiler.is_compiling():
        return t
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t) or functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t


def stable_max(x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = True) -> torch.Tensor:
    """``max(x, dim)``, detached, with all-``-inf`` rows shifted by 0 instead.

    Subtracting the row max makes every exponent ``≤ 0`` (no overflow) and the largest term 1 (the
    sum cannot underflow). ``-inf - (-inf)`` would be NaN: a row of all ``-inf`` is shifted by 0,
    so its exponentials stay 0, its log-sum-exp is ``-inf`` and its log-softmax NaN, as in
    PyTorch. A row holding ``+inf`` keeps its max and comes out NaN, also as in PyTorch.

    Reducing over a size-0 dimension (which ``amax`` refuses) gives a shift of 0: the slices are
    empty, so their sum of exponentials is 0 and their log-sum-exp ``-inf``, as in PyTorch.
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if x.dim() > 0 and any(x.shape[d] == 0 for d in dims):  # a 0-d tensor has no size-0 dim
        m = torch.zeros_like(x.detach()).sum(dim=dims, keepdim=keepdim)
        return m
    m = x.detach().amax(dim=dims, keepdim=keepdim)
    return torch.where(m == -torch.inf, torch.zeros_like(m), m)


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
        w = weight.to(dtype)
        w_y = torch.where(valid, w[safe], torch.zeros((), dtype=dtype, device=w.device))
    return valid, safe, w_y


def row_coefficients(
    target: torch.Tensor,
    *,
    reduction: str,
    dtype: torch.dtype,
    ignore_index: int = -100,
    class_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(t, c, D)``: per-row weights, ``c_i = ∂L/∂l_i`` for an upstream gradient of 1, and the
    mean's denominator (None unless ``reduction="mean"``).

    Class indices ``(M)``: ``t_i`` is the token weight (1 if none), exactly 0 on ignored rows;
    ``D`` is ``normalizer`` if given, else ``Σ_i t_i w_{y_i}``; ``c_i = t_i / D`` for ``"mean"``,
    ``t_i`` otherwise. ``c`` is formed with ``where``, not a product, so an all-ignored batch has a
    zero gradient although its mean is 0/0. Probability targets ``(M, C)``: ``t = 1``, ``D = M``.
    """
    rows, device = target.shape[0], target.device
    mean = reduction == "mean"
    if target.dim() == 2:
        t = torch.ones(rows, dtype=dtype, device=device)
        denom = torch.full((), float(rows), dtype=dtype, device=device) if mean else None
        return t, t / rows if mean and rows else t, denom
    valid, _, w_y = target_weights(target, class_weight, ignore_index, dtype)
    t = valid.to(dtype)
    if token_weight is not None:
        t = torch.where(valid, token_weight.to(device=device, dtype=dtype), 0.0)
    if not mean:
        return t, t, None
    if isinstance(normalizer, torch.Tensor):
        denom = normalizer.to(device=device, dtype=dtype).reshape(())  # never read on the host
    elif normalizer is not None:
        denom = torch.full((), float(normalizer), dtype=dtype, device=device)
    else:
        denom = (t * w_y).sum() if class_weight is not None else t.sum()
    return t, torch.where(valid, t / denom, 0.0), denom


def reduce_rows(
    per_row: torch.Tensor, reduction: str, denominator: torch.Tensor | None
) -> torch.Tensor:
    """``"none"``: ``per_row``; ``"sum"``: ``Σ l_i``; ``"mean"``: ``Σ l_i / D``."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / denominator if reduction == "mean" else total


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``"none"`` / ``"mean"`` / ``"sum"`` to an elementwise loss (mean of nothing is NaN)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def in_dtypes_of(
    grads: tuple[torch.Tensor | None, ...], likes: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients accumulated in the compute dtype, rounded once to their parameters' dtypes."""
    return tuple(
        None if g is None else g.to(like.dtype) for g, like in zip(grads, likes, strict=True)
    )


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


class Scratch:
    """Work buffers of one ``(rows, cols)`` shape for a kernel's blocks or chunks, allocated once
    per call and only when first asked for; ``get(name, n)`` is buffer ``name``'s first ``n``
    rows (the last block may be shorter)."""

    def __init__(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.device, self.dtype = (rows, cols), device, dtype
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        return self._bufs[name][:rows]
