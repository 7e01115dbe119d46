"""Shared argument checks: every public function validates its arguments here, first.

Every check raises the exception type PyTorch raises for the same mistake, with the offending value
in the message, before any arithmetic happens.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from xent._numerics import concrete, host_reads_cheap

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


def _finite(value: float) -> bool:
    """``math.isfinite`` in comparisons, which ``torch.compile`` folds on constants (it traces
    ``math.isfinite`` as a graph operator returning a bool, which breaks the graph)."""
    return -math.inf < value < math.inf


def check_reduction(reduction: str, choices: tuple[str, ...] = REDUCTIONS) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``choices``."""
    if reduction not in choices:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction; choose one of "
            + ", ".join(repr(c) for c in choices)
        )


# PyTorch's text, verbatim, so warning filters written for it still match.
LEGACY_REDUCTION_WARNING = (
    "size_average and reduce args will be deprecated, please use reduction='{}' instead."
)
ELEMENTWISE_MEAN_WARNING = (
    "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."
)


def legacy_reduction(
    size_average: bool | None, reduce: bool | None, reduction: str, *, stacklevel: int = 3
) -> str:
    """The reduction a call asks for, the deprecated ``size_average`` and ``reduce`` included.

    Both ``None``: ``reduction`` itself (``"elementwise_mean"``, PyTorch's deprecated name, is
    ``"mean"`` with PyTorch's warning). Otherwise they override it, as in PyTorch: each ``None``
    counts as true, and then ``reduce`` false gives ``"none"``, ``size_average`` false ``"sum"``,
    both true ``"mean"`` (truthiness, so ``0`` and ``1`` work as in PyTorch), with PyTorch's
    ``UserWarning`` naming the equivalent ``reduction=``. ``stacklevel`` 3 points the warning at
    the caller of the public function that asks.
    """
    if size_average is None and reduce is None:
        if reduction == "elementwise_mean":  # PyTorch's older name of "mean", still accepted
            warnings.warn(ELEMENTWISE_MEAN_WARNING, UserWarning, stacklevel=stacklevel)
            return "mean"
        return reduction
    average = True if size_average is None else size_average
    keep = True if reduce is None else reduce
    legacy = "none" if not keep else "mean" if average else "sum"
    warnings.warn(LEGACY_REDUCTION_WARNING.format(legacy), UserWarning, stacklevel=stacklevel)
    return legacy


def check_label_smoothing(
    label_smoothing: float, function: Callable[..., Any] | None = None
) -> float:
    """Return ``label_smoothing`` as a float; :class:`InvalidValueError` outside ``[0, 1]`` or NaN.

    PyTorch raises ``RuntimeError`` above 1 and silently ignores negative and NaN values; xent
    refuses all three (a deliberate deviation).
    """
    value = check_number(function, "label_smoothing", label_smoothing, "float")
    if not 0.0 <= value <= 1.0:  # NaN fails it too (no math.isnan: torch.compile traces this)
        raise InvalidValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return value


def check_number(function: Callable[..., Any] | None, name: str, value: object, kind: str) -> Any:
    """``value`` as the Python ``float``, ``int`` or ``bool`` (``kind``) a numeric option holds.

    Accepts what PyTorch's argument parser accepts for such an option: for ``"float"`` a real
    number (bool, int, float, a NumPy real scalar) or a 0-d real tensor without a gradient; for
    ``"int"`` an integer (not a bool), a NumPy integer or a 0-d integer tensor; for ``"bool"``
    only ``True`` or ``False``. Anything else (complex, strings, ``None``, NumPy 0-d arrays,
    ``Decimal``) raises ``TypeError`` in PyTorch's words, naming the argument, its position and
    the type. Complex 0-d tensors, which PyTorch reads by their real part, are refused too.
    """
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))) or (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and not value.is_floating_point()
            and not value.is_complex()
            and value.dtype != torch.bool
        )
    else:
        ok = isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)) or (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and not value.is_complex()
            and not value.requires_grad
        )
    if not ok:
        prefix, where = "", ""
        if function is not None:
            position, _ = _slot(function, name)
            prefix = f"{function.__name__}(): "
            where = "" if position is None else f" (position {position})"
        shown = "Tensor" if isinstance(value, torch.Tensor) else type_name(value)
        raise TypeError(
            f"{prefix}argument '{name}'{where} must be {kind}, not {shown} (got {value!r})"
        )
    return {"bool": bool, "int": int, "float": float}[kind](value)


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`DtypeError` unless ``tensor`` has a floating dtype (``TypeError`` for a
    non-tensor)."""
    if not isinstance(tensor, torch.Tensor):
        raise NotATensorError(f"{name} must be a torch.Tensor, got {type_name(tensor)}")
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


def check_logits(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 0:  # PyTorch: RuntimeError (cross_entropy) or ValueError (nll_loss)
        raise InvalidValueError(
            "input must have a class dimension: expected (C), (N, C) or "
            "(N, C, d1, ..., dK), got a 0-d tensor"
        )
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {input.dtype}")


def check_class_weight(
    weight: torch.Tensor | None, num_classes: int, differentiable: bool = False
) -> None:
    """A ``(C)`` class weight; one that requires grad only where ``differentiable`` (PyTorch:
    cross-entropy with probability targets), else PyTorch's ``RuntimeError``."""
    if weight is None:
        return
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if weight.requires_grad and torch.is_grad_enabled() and not differentiable:
        raise RuntimeError(
            "class weights are not differentiable here (nor in PyTorch, which differentiates "
            "them for probability targets only); pass weight.detach() instead of a tensor that "
            "requires grad"
        )


def check_weight_dtype(weight: torch.Tensor | None, input: torch.Tensor) -> None:
    """:class:`InvalidValueError` unless the class weights of a class-index loss have the
    input's dtype: PyTorch refuses a mismatch (``RuntimeError: expected scalar type Float but
    found Double``) rather than promoting, and so does xent."""
    if weight is not None and weight.dtype != input.dtype:
        raise InvalidValueError(
            f"weight must have the input's dtype {input.dtype} for class-index targets, got "
            f"{weight.dtype}; cast it with weight.to(input.dtype)"
        )


def _scalar_type_name(dtype: torch.dtype) -> str:
    """PyTorch's C++ name of ``dtype`` (``Int`` for int32, ``Byte`` for uint8, ``Float``, ...),
    the word its error messages use."""
    return torch.empty(0, dtype=dtype, device="cpu").type().removeprefix("torch.")[: -len("Tensor")]


def check_index_target_dtype(target: torch.Tensor, reduction: str) -> None:
    """PyTorch's rule for the dtype of a class-index target of ``cross_entropy`` / ``nll_loss``.

    int64 always; uint8 for a 0-d or 1-D target (the ``(C)`` and ``(N, C)`` inputs), and for a
    spatial ``(N, d1, …, dK)`` one only when it is empty and reduced (no element is read). Any
    other dtype raises PyTorch's ``RuntimeError`` with its words, followed by the dtype.
    """
    if target.dtype == torch.int64:
        return
    if target.dtype != torch.uint8:
        raise RuntimeError(
            "expected target dtype to be Long or Byte, but got "
            f"{_scalar_type_name(target.dtype)} ({target.dtype})"
        )
    if target.dim() >= 2 and not (target.numel() == 0 and reduction != "none"):
        raise RuntimeError(
            f"expected scalar type Long but found Byte (a {target.dtype} target of shape "
            f"{list(target.shape)}: uint8 is taken for () and (N) targets only)"
        )


def check_index_target(
    input: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """Shape, dtype and range of a class-index target; raises before any arithmetic.

    The shape is checked first, then the dtype (:func:`check_index_target_dtype`), in PyTorch's
    order and with its exception types.
    """
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(
                f"for an input of shape {tuple(input.shape)} the class-index target must be 0-d, "
                f"got shape {tuple(target.shape)}"
            )
    else:
        if target.dim() == 0 or target.shape[0] != input.shape[0]:
            n_target = target.shape[0] if target.dim() else "a 0-d target"
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({n_target})."
            )
        expected = (input.shape[0], *input.shape[2:])
        if input.dim() > 2 and input.shape[1] == 0 and target.numel() > 0:
            # PyTorch refuses these too (its spatial kernel cannot view them): no class to
            # score the spatial elements against, and no target can be valid.
            raise RuntimeError(
                f"input of shape {list(input.shape)} has no classes but {target.numel()} "
                f"spatial target elements (target shape {list(target.shape)})"
            )
        if tuple(target.shape) != expected:
            raise RuntimeError(
                f"Expected target size {list(expected)}, got {list(target.shape)} "
                f"(input shape {list(input.shape)})"
            )
    check_index_target_dtype(target, reduction)


def value_check(t: torch.Tensor) -> str:
    """How a check reads the values of ``t`` (taken beneath ``torch.func``'s wrappers by
    :func:`xent._numerics.concrete`).

    ``"host"``: on the CPU, eagerly, the values are read and the error names the first bad one.
    ``"device"``: on an accelerator, or in a graph ``torch.compile`` traces, an asynchronous
    assert checks them without a host sync. ``"none"``: a ``torch.func`` transform being
    compiled has neither values to read nor a batching rule for the assert; the check is left
    out.
    """
    if torch.compiler.is_compiling():
        return "none" if torch._C._are_functorch_transforms_active() else "device"
    return "host" if host_reads_cheap(t) else "device"


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """``IndexError`` naming the first target outside ``[0, C)`` that is not ``ignore_index``."""
    # Under torch.func transforms the values are read beneath the wrappers (all of vmap's
    # samples at once); int64 compares whatever the integer dtype (no wrap-around).
    target = concrete(target).long()
    how = value_check(target)
    if how == "none":
        return
    invalid = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if how == "host":
        if bool(invalid.any()):
            bad = target[invalid].flatten()[0].item()
            raise IndexError(f"Target {bad} is out of bounds.")
    else:
        # No host sync on accelerators: the check runs on the device and fails the stream.
        torch._assert_async(~invalid.any(), "xent: a class-index target is out of bounds")


def check_prob_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {target.dtype}"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"ignore_index={ignore_index} is not supported for probability targets "
            "(a floating target with the input's shape)"
        )


def check_z_loss(z_loss: float) -> float:
    value = float(z_loss)
    if not _finite(value) or value < 0.0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return value


def check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    value = float(softcap)
    if not _finite(value) or value <= 0.0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return value


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(
            f"chunk_size must be None or a positive number of rows, got {chunk_size!r}"
        )
    return None if chunk_size is None else int(chunk_size)


def check_linear_args(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    ignore_index: int | None = None,
) -> bool:
    """Shapes and dtypes of a linear cross-entropy call; returns whether ``target`` holds
    probabilities.

    ``linear_weight`` is ``(C, *out_features, H)``; the logits of ``(*batch, H)`` inputs are
    ``(*batch, C, *out_features)``. A target of exactly that shape is probabilities (then
    ``ignore_index`` must be None, as in PyTorch); otherwise it is class indices of shape
    ``(*batch, *out_features)``.
    """
    if not input.is_floating_point() or input.dim() == 0:
        raise TypeError(
            f"input must be a floating tensor of shape (..., H), got {input.dtype} "
            f"of shape {tuple(input.shape)}"
        )
    hidden = input.shape[-1]
    if linear_weight.dim() < 2 or linear_weight.shape[-1] != hidden:
        raise RuntimeError(
            f"linear_weight must have shape (V, H) or (V, *out_features, H) with H = {hidden} "
            f"(the input's last dimension), got {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(
            f"input and linear_weight must have the same dtype, got {input.dtype} and "
            f"{linear_weight.dtype}"
        )
    vocab, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    batch = tuple(input.shape[:-1])
    if out_features and not batch:
        raise RuntimeError(
            f"a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) needs "
            f"a batched input (N, {hidden}), got shape {tuple(input.shape)}"
        )
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise RuntimeError(
            f"input and linear_bias must have the same dtype, got {input.dtype} and "
            f"{linear_bias.dtype}"
        )
    if linear_bias is not None and tuple(linear_bias.shape) != (vocab, *out_features):
        raise RuntimeError(
            f"linear_bias must have shape {(vocab, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    index_shape = (*batch, *out_features)
    probs = tuple(target.shape) == (*batch, vocab, *out_features)
    if probs:
        if not target.is_floating_point():
            raise RuntimeError(
                "expected a floating dtype for a target of class probabilities (the logits' "
                f"shape {tuple(target.shape)}), got {target.dtype}"
            )
        if ignore_index is not None:
            raise RuntimeError(
                f"ignore_index cannot be given ({ignore_index}) when target holds probabilities"
            )
    else:
        if tuple(target.shape) != index_shape:
            raise ValueError(
                f"target must have the input's shape without its last dimension, "
                f"{index_shape} (class indices), or the logits' shape "
                f"{(*batch, vocab, *out_features)} (probabilities), got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise RuntimeError(
                f"expected an integer dtype for class-index targets, got {target.dtype}"
            )
    if token_weight is not None and tuple(token_weight.shape) != index_shape:
        raise ValueError(
            f"token_weight must have the target's shape {index_shape}, "
            f"got {tuple(token_weight.shape)}"
        )
    return probs


def check_normalizer(
    normalizer: torch.Tensor | float | None, reduction: str
) -> torch.Tensor | float | None:
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"normalizer replaces the denominator of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape "
                f"{tuple(normalizer.shape)}"
            )
        return normalizer.reshape(())  # no host sync: its value is used on its device
    value = float(normalizer)
    if not _finite(value) or value <= 0.0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    return value


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


class InvalidValueError(ValueError, RuntimeError):
    """A value xent refuses, with the value in the message, where PyTorch raises ``RuntimeError``
    (or computes silently): ``label_smoothing`` outside ``[0, 1]``, a Huber ``delta ≤ 0``,
    probabilities outside ``[0, 1]``. ``ValueError`` says what it is; ``RuntimeError`` keeps code
    written against PyTorch catching it.
    """


class ParameterError(ValueError, TypeError):
    """An argument of the wrong type where scikit-learn raises its ``InvalidParameterError``,
    which is both; xent raised ``TypeError``."""


class ComplexDataError(ParameterError):
    """Complex values given to ``log_loss``: scikit-learn raises ``ValueError``, xent raised
    ``TypeError``; this is both."""


def type_name(value: object) -> str:
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
        f"{function}(): argument '{name}'{where} must be Tensor, not {type_name(value)}"
    )


def _slot(function: Callable[..., Any], name: str) -> tuple[int | None, bool]:
    """Parameter ``name`` of ``function``: its 1-based position (``None`` if keyword-only) and
    whether its default is ``None``. Read off the code object, which ``torch.compile`` traces."""
    function = inspect.unwrap(function)  # a public function wrapped for autocast
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
    argument and its dtype. All of them must be on one device (:func:`check_same_device`).
    """
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):  # the signature is read only off this path
            position, optional = _slot(function, name)
            check_tensor(name, value, position, function.__name__, optional=optional)
    check_same_device(function.__name__, args)
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


def check_same_device(function: str, tensors: dict[str, object]) -> None:
    """Raise ``RuntimeError`` (PyTorch's type) naming both devices and arguments unless every
    tensor in ``tensors`` is on the first one's device.

    A 0-d CPU tensor may join tensors on any device, as in PyTorch's elementwise operations.
    ``None`` entries are skipped. Without this check a mismatch ends deep inside a kernel, in
    an exception of another type (``NotImplementedError`` for a meta tensor).
    """
    placed = [
        (name, value.device)
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor) and not (value.dim() == 0 and value.device.type == "cpu")
    ]
    for name, device in placed[1:]:
        if device != placed[0][1]:
            raise RuntimeError(
                f"{function}(): expected all tensors to be on the same device, but found at "
                f"least two devices, {placed[0][1]} ({placed[0][0]}) and {device} ({name})"
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
