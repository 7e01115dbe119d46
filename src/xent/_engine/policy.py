"""The engine's decisions, each taken in one place with one message."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from xent._numerics import host_reads_cheap


def is_probability_target(input: torch.Tensor, target: torch.Tensor) -> bool:
    """A target of the input's own shape holds class probabilities; otherwise class indices.

    The same rule as PyTorch's: ``(N, C)`` logits with an ``(N, C)`` target are probabilities,
    with an ``(N)`` target indices (the dtype is then checked to match).
    """
    return tuple(target.shape) == tuple(input.shape)


def grad_in_forward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the forward pass forms the gradient (scalar losses), or backward does.

    A scalar loss's gradient is known up to the upstream factor before backward starts, so the
    pass that reads the logits for the loss writes their gradient too. fp16 logits are the
    exception: formed early with a factor of 1 (and the mean's 1/N), fp16's narrow range would
    flush small entries to zero before a loss scale of 2¹² could rescue them, so their gradient
    is formed in backward, where the upstream factor is known.
    """
    return reduction != "none" and dtype != torch.float16


def under_transforms() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ...) is active.

    The one-pass kernels write their gradient into buffers during the forward pass and read
    options on the host; under a transform the inputs are wrapped (batched, dual) tensors for
    which neither is possible. There the engine takes a path of pure tensor operations
    (:class:`xent._engine.autograd.CrossEntropyFuncFn`) with a batching rule and forward-mode
    formulas; eager calls keep the one-pass kernels.
    """
    return torch._C._are_functorch_transforms_active()


def drop_ignored(target: torch.Tensor) -> bool:
    """Whether ignored tokens are dropped before the head's matrix products.

    Listing the kept tokens needs their count on the host: free on the CPU, one wait for the
    queue on a GPU, which the products it saves repay whenever a few percent of the tokens are
    ignored. While a CUDA graph is being captured nothing may be read back, so every token is
    computed instead (ignored ones with a zero coefficient): the capture stays valid.
    """
    return host_reads_cheap(target) or not (
        target.is_cuda and torch.cuda.is_current_stream_capturing()
    )


def refuse_double_backward(function: str) -> None:
    """Raise when backward is asked for a differentiable gradient (``create_graph=True``).

    The fused and vocabulary-parallel losses form their gradients with in-place kernels that
    autograd cannot differentiate again; their ``impl="reference"`` (or, on logits,
    :func:`xent.cross_entropy`) can.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{function}'s gradient is not differentiable (create_graph=True); "
            "use impl='reference' for double backward"
        )


def gradient_into_logits(x: torch.Tensor) -> bool:
    """Whether ``inplace_backward=True`` may write the gradient into the logits' own buffer.

    Only where that is safe: contiguous logits (each element its own memory: an expanded,
    stride-0 or otherwise overlapping tensor would have one row's gradient overwrite another
    row's logits before they are read), and not a leaf that requires grad (the caller's own
    parameter, whose values would be destroyed; PyTorch refuses in-place operations on such
    leaves). Elsewhere the gradient goes to a separate buffer, silently: the result is the same,
    only the memory saving is lost. Where it is written in place, the logits' version counter
    is bumped, so autograd raises if another consumer saved them for its backward.
    """
    return x.is_contiguous() and not (x.is_leaf and x.requires_grad)


INPLACE_CONSUMED = (
    "inplace_backward=True overwrote the logits with their gradient, which the first backward "
    "consumed; recompute the loss (or call it without inplace_backward) to backward again"
)


# --------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------

# The losses PyTorch's autocast runs in fp32, per device type (its "fp32" op lists; on CUDA the
# softmax family is "fp32 unless dtype= is given"). Elsewhere an op keeps its inputs' dtype.
AUTOCAST_FP32: dict[str, frozenset[str]] = {
    "cpu": frozenset(
        {
            "cross_entropy",
            "nll_loss",
            "binary_cross_entropy",
            "binary_cross_entropy_with_logits",
            "kl_div",
            "huber_loss",
        }
    ),
    "cuda": frozenset(
        {
            "cross_entropy",
            "nll_loss",
            "binary_cross_entropy_with_logits",
            "kl_div",
            "huber_loss",
            "logsumexp",
            "softmax",
            "log_softmax",
        }
    ),
}
# Refused under CUDA autocast, as PyTorch refuses it (a probability input rounded to half
# precision is unsafe); its logits form is the safe one.
AUTOCAST_REFUSED: dict[str, frozenset[str]] = {"cuda": frozenset({"binary_cross_entropy"})}

_F = TypeVar("_F", bound=Callable[..., Any])


def _autocast_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The device type of the first tensor argument, if autocast is enabled there."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            kind = value.device.type
            return kind if kind in AUTOCAST_FP32 and torch.is_autocast_enabled(kind) else None
    return None


def _to_fp32(value: Any, device: str) -> Any:
    """An fp16/bf16 tensor on the autocast device as fp32; anything else unchanged (fp64 and
    fp32 stay, as PyTorch's autocast leaves them)."""
    if (
        isinstance(value, torch.Tensor)
        and value.dtype in (torch.float16, torch.bfloat16)
        and value.device.type == device
    ):
        return value.float()
    return value


def autocast_like_torch(name: str) -> Callable[[_F], _F]:
    """Make a public function behave under ``torch.autocast`` as its PyTorch namesake ``name``.

    Where PyTorch runs ``name`` in fp32 on the autocast device type (:data:`AUTOCAST_FP32`), its
    half-precision tensor arguments are cast to fp32 and the function runs with autocast off
    (its own matrix products and reductions must not drop back to half precision), so it
    returns fp32 as PyTorch does; the gradients reach the half-precision inputs in their own
    dtype through the casts. A softmax given ``dtype=`` is left alone (PyTorch respects it).
    Where PyTorch refuses ``name`` under autocast (:data:`AUTOCAST_REFUSED`) this raises its
    ``RuntimeError``. Outside autocast nothing changes.
    """

    def wrap(function: _F) -> _F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            device = _autocast_device(args, kwargs)
            if device is None:
                return function(*args, **kwargs)
            if name in AUTOCAST_REFUSED.get(device, ()):
                raise RuntimeError(
                    f"{name} is unsafe to autocast on {device}: its probabilities lose precision "
                    "in half precision; use binary_cross_entropy_with_logits (safe to autocast) "
                    "or compute it outside the autocast region"
                )
            if name not in AUTOCAST_FP32[device] or kwargs.get("dtype") is not None:
                return function(*args, **kwargs)
            args = tuple(_to_fp32(a, device) for a in args)
            kwargs = {k: _to_fp32(v, device) for k, v in kwargs.items()}
            with torch.autocast(device, enabled=False):
                return function(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def autocast_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype | None]:
    """Autocast for ``linear_cross_entropy``, as ``F.linear`` then ``F.cross_entropy`` behave:
    inside an autocast region the input, weight and bias in the region's dtype, and the loss's
    dtype, fp32; else unchanged (and None).

    The products then read the autocast dtype and accumulate in fp32; the casts are
    differentiable, so each parameter's gradient comes back in its own dtype. As in autocast,
    fp64 tensors are left alone.
    """
    device = input.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return input, weight, bias, None
    dtype = torch.get_autocast_dtype(device)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    input, weight, bias = cast(input), cast(weight), cast(bias)
    return input, weight, bias, torch.float32  # type: ignore[return-value]
