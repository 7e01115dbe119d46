"""Shared argument checks and the one reduction helper every loss uses.

Every check raises the exception type PyTorch raises for the same mistake, with the offending value
in the message, before any arithmetic happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
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
    """Raise :class:`DtypeError` unless ``tensor`` has a floating dtype (``TypeError`` for a
    non-tensor)."""
    if not isinstance(tensor, torch.Tensor):
        raise NotATensorError(f"{name} must be a torch.Tensor, got {_type_name(tensor)}")
    if not tensor.is_floating_point():
        raise DtypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


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


# --------------------------------------------------------------------------------------------
# Misuse: non-tensor arguments and integer, boolean or complex dtypes
# --------------------------------------------------------------------------------------------


class NotATensorError(TypeError, AttributeError):
    """A list, array or number where a tensor belongs.

    PyTorch raises ``TypeError`` from its compiled bindings (``argument 'target' (position 2)
    must be Tensor, not list``) but ``AttributeError`` from its Python-level functions
    (``'list' object has no attribute 'size'``); this is both, so code written against either
    keeps catching it.
    """


class DtypeError(NotImplementedError, TypeError):
    """An integer, boolean or complex tensor where a floating one belongs.

    PyTorch raises ``NotImplementedError`` (a ``RuntimeError``) from its kernels or a plain
    ``RuntimeError`` from its dtype checks; xent raised ``TypeError``. This is all three.
    """


class ComplexDataError(ValueError, TypeError):
    """Complex values given to ``log_loss``: scikit-learn raises ``ValueError``, xent raised
    ``TypeError``; this is both."""


def _type_name(value: object) -> str:
    """``list``, ``float``, ``numpy.ndarray``: a type's name as PyTorch prints it."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def check_tensor(
    name: str, value: object, position: int | None, function: str, *, optional: bool = False
) -> None:
    """Raise :class:`NotATensorError` in PyTorch's words unless ``value`` is a tensor.

    ``position`` is the 1-based place of the argument in the signature (``None`` for a
    keyword-only one); ``optional`` lets ``None`` pass. The message reads like PyTorch's:
    ``cross_entropy(): argument 'target' (position 2) must be Tensor, not list``.
    """
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    where = "" if position is None else f" (position {position})"
    raise NotATensorError(
        f"{function}(): argument '{name}'{where} must be Tensor, not {_type_name(value)}"
    )


def _slot(function: Callable[..., Any], name: str) -> tuple[int | None, bool]:
    """Parameter ``name`` of ``function``: its 1-based position (``None`` if keyword-only) and
    whether its default is ``None``. Read off the code object, which ``torch.compile`` traces."""
    code = function.__code__
    index = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount].index(name)
    if index < code.co_argcount:
        defaults = function.__defaults__ or ()
        first = code.co_argcount - len(defaults)
        return index + 1, index >= first and defaults[index - first] is None
    kwdefaults = function.__kwdefaults__ or {}
    return None, name in kwdefaults and kwdefaults[name] is None


def check_tensor_args(
    function: Callable[..., Any],
    *,
    floating: tuple[str, ...] = (),
    real: tuple[str, ...] = (),
    **args: object,
) -> None:
    """Check a public function's tensor arguments before anything reads them.

    Each keyword in ``args`` must be a tensor (:func:`check_tensor`; its position, and whether
    ``None`` may stand for it, are read off ``function``'s signature). Those named in
    ``floating`` must have a floating dtype and those in ``real`` must not be complex (PyTorch
    promotes integer and boolean per-element weights), else :class:`DtypeError` naming the
    argument and its dtype.
    """
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):  # the signature is read only off this path
            position, optional = _slot(function, name)
            check_tensor(name, value, position, function.__name__, optional=optional)
    for name in floating:
        value = args[name]
        if value is not None and not value.is_floating_point():
            raise DtypeError(
                f"{function.__name__}(): {name} must have a floating dtype, got {value.dtype}"
            )
    for name in real:
        value = args[name]
        if value is not None and value.is_complex():
            raise DtypeError(
                f"{function.__name__}(): {name} must be real (floating, integer or boolean), "
                f"got {value.dtype}"
            )


def floating_or_default(
    name: str, value: torch.Tensor, function: Callable[..., Any]
) -> torch.Tensor:
    """``value`` as a floating tensor: integers and booleans become the default dtype (as
    PyTorch promotes them in ``xlogy`` or ``logsumexp``); complex raises :class:`DtypeError`."""
    check_tensor_args(function, **{name: value})
    if value.is_complex():
        raise DtypeError(f"{function.__name__}(): {name} must be real, got {value.dtype}")
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


def as_index_target(name: str, target: torch.Tensor, function: Callable[..., Any]) -> torch.Tensor:
    """A class-index ``target`` as int64, or :class:`DtypeError` for a floating, boolean or
    complex one (PyTorch: ``RuntimeError``). int64 so that a uint8 target is never read as a
    mask, nor compared with a negative ``ignore_index`` after wrapping around."""
    check_tensor_args(function, **{name: target})
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DtypeError(
            f"{function.__name__}(): {name} must hold class indices of an integer dtype, "
            f"got {target.dtype}"
        )
    return target.long()


def check_real_array(name: str, value: object) -> None:
    """Raise :class:`ComplexDataError` if the array-like ``value`` holds complex numbers.

    Ragged or non-numeric array-likes pass here and are judged where they are read.
    """
    if isinstance(value, torch.Tensor):
        is_complex = value.is_complex()
    else:
        try:
            is_complex = np.iscomplexobj(np.asarray(value))
        except (TypeError, ValueError):
            return
    if is_complex:
        dtype = value.dtype if isinstance(value, torch.Tensor) else np.asarray(value).dtype
        raise ComplexDataError(f"Complex data not supported: {name} has dtype {dtype}")
