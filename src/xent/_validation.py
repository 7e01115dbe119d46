"""Shared argument checks and the one reduction helper every loss uses.

Every check raises the exception type PyTorch raises for the same mistake, with the offending value
in the message, before any arithmetic happens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


def check_reduction(reduction: str, choices: tuple[str, ...] = REDUCTIONS) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``choices``."""
    if reduction not in choices:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction; choose one of "
            + ", ".join(repr(c) for c in choices)
        )


def check_label_smoothing(label_smoothing: float) -> float:
    """Return ``label_smoothing`` as a float, or raise ``ValueError`` outside ``[0, 1]`` or NaN.

    PyTorch silently ignores negative and NaN values; xent refuses them (a deliberate deviation).
    """
    value = float(label_smoothing)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return value


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` has a floating dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` naming both shapes unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} size ({tuple(b.shape)}) must be the same as {name_a} size ({tuple(a.shape)})"
        )


def check_broadcastable(function: str, input: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``RuntimeError`` naming both shapes unless ``input`` and ``target`` broadcast."""
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise RuntimeError(
            f"{function}: input of shape {tuple(input.shape)} and target of shape "
            f"{tuple(target.shape)} cannot be broadcast together"
        ) from None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp64 stays fp64, everything else (fp16, bf16, fp32) is fp32.

    Half-precision sums over many rows lose all precision or overflow, so they are never
    accumulated in their own dtype.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``"none"`` / ``"mean"`` / ``"sum"`` to an elementwise loss (mean of nothing is NaN)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def host_reads_cheap(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs nothing: true on the CPU.

    On an accelerator such a read (``.item()``, ``bool(t)``, ``nonzero``) waits for the device
    to drain its queue and cannot be captured in a CUDA graph, so callers take a device-side
    path there instead (an asynchronous assert, an unconditional multiply).
    """
    return t.device.type == "cpu"
