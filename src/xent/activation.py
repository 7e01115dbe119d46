"""Softmax, log-softmax and log-sum-exp from elementary operations, stable for any logits.

All three rest on one identity: for any constant ``m``,

.. math::

    \\log \\sum_c e^{x_c} = m + \\log \\sum_c e^{x_c - m},

and choosing ``m = max_c x_c`` makes every exponent ``≤ 0``, so nothing overflows and the largest
term is exactly 1, so the sum never underflows to 0. Gradients come from autograd through these
operations (``∂ lse / ∂x = softmax(x)``; the max is a constant shift and is detached).
"""

from __future__ import annotations

import warnings

import torch

from xent._engine.policy import autocast_like_torch
from xent._numerics import compute_dtype, stable_max
from xent._validation import DtypeError, check_number, check_tensor_args


def _implicit_dim(function: str, ndim: int, stacklevel: int) -> int:
    """The dimension PyTorch's ``softmax``/``log_softmax`` take when ``dim`` is left out (0 for
    0-, 1- and 3-d inputs, else 1), with PyTorch's deprecation ``UserWarning``; ``stacklevel``
    counts as PyTorch's ``_stacklevel`` does (3: the caller of the public function)."""
    warnings.warn(
        f"Implicit dimension choice for {function} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        UserWarning,
        stacklevel=stacklevel + 1,  # one frame more: the autocast wrapper
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_input(function: str, input: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``input`` cast to ``dtype`` if given; :class:`DtypeError` unless the result is floating.

    PyTorch's softmax kernels exist only for floating dtypes: an integer, boolean or complex
    input raises ``NotImplementedError`` unless ``dtype=`` names a floating dtype to compute in
    (a complex input then loses its imaginary part, with PyTorch's warning).
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"{function}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}"
            )
        if not dtype.is_floating_point:
            raise DtypeError(f"{function}(): dtype must be a floating dtype, got {dtype}")
        return input.to(dtype)
    if not input.is_floating_point():
        raise DtypeError(
            f"{function}(): input must have a floating dtype, got {input.dtype}; "
            "pass dtype= (e.g. dtype=torch.float32) to compute in one"
        )
    return input


@autocast_like_torch("logsumexp")
def logsumexp(
    input: torch.Tensor,
    dim: int | tuple[int, ...],
    keepdim: bool = False,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log of the sum of exponentials along ``dim``, computed without overflow.

    .. math::

        \\operatorname{lse}(x) = m + \\log \\sum_c e^{x_c - m}, \\qquad m = \\max_c x_c

    Args:
        input: tensor of any shape. Integer and boolean inputs are computed in the default
            dtype (``torch.get_default_dtype()``), as PyTorch does; complex inputs give the
            complex ``log Σ exp`` (principal branch), shifted by the largest real part.
        dim: dimension (or dimensions) to reduce.
        keepdim: keep the reduced dimension with size 1.
        out: optional tensor the result is written into (resized to fit, cast to its floating
            or complex dtype) and returned; as in PyTorch, not with inputs that require grad.

    Returns:
        ``input``'s shape without ``dim`` (or with size 1 there if ``keepdim``), ``input``'s dtype
        (the default dtype for integer or boolean inputs), or ``out``. A row of all ``-inf``
        gives ``-inf``; a row holding ``+inf`` gives ``+inf``; reducing a size-0 dimension gives
        ``-inf`` (the log of an empty sum), as in PyTorch.

    Equals ``torch.logsumexp(input, dim, keepdim, out=out)``.

    Example:
        >>> import torch, xent
        >>> xent.logsumexp(torch.tensor([1000.0, 1000.0]), dim=0)
        tensor(1000.6932)
    """
    check_tensor_args(logsumexp, input=input, out=out)
    if out is not None:
        if torch.is_grad_enabled() and (input.requires_grad or out.requires_grad):
            raise RuntimeError(
                "logsumexp(): out= does not support autograd, and an argument requires grad; "
                "call it without out=, or under torch.no_grad()"
            )
        if not (out.is_floating_point() or out.is_complex()):
            raise DtypeError(f"logsumexp(): out must have a floating dtype, got {out.dtype}")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if input.is_complex():
        # exp(z - m) with m real: |exp(z - m)| = exp(Re z - m) ≤ 1, so the real shift suffices.
        x = input
        m = stable_max(x.real, dims)
    else:
        if not input.is_floating_point():
            input = input.to(torch.get_default_dtype())
        x = input.to(compute_dtype(input.dtype))
        m = stable_max(x, dims)
    # Unlike log-softmax, log-sum-exp has a finite-or-infinite answer for ±inf rows: shift by 0.
    # (An empty dimension is shifted by 0 too: its sum is 0 and its log-sum-exp -inf.)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    result = (x - m).exp().sum(dim=dims, keepdim=True).log() + m
    if not keepdim:
        result = result.squeeze(dims)
    result = result.to(input.dtype)
    if out is None:
        return result
    out.resize_(result.shape)
    return out.copy_(result)


@autocast_like_torch("log_softmax")
def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logarithm of the softmax along ``dim``: ``x - logsumexp(x)``.

    .. math::

        \\log \\operatorname{softmax}(x)_c = x_c - m - \\log \\sum_k e^{x_k - m},
        \\qquad m = \\max_k x_k

    Args:
        input: tensor of any shape and floating dtype (any dtype with a floating ``dtype=``).
        dim: the class dimension. Left out (``None``), PyTorch's deprecated implicit choice: 0
            for 0-, 1- and 3-d inputs, else 1, with PyTorch's ``UserWarning``.
        _stacklevel: the warning's stack level, as in PyTorch (3: the caller).
        dtype: if given, a floating dtype ``input`` is cast to first (as in PyTorch).

    Returns:
        Same shape as ``input``; ``input``'s dtype (or ``dtype``). Half-precision inputs are
        computed in fp32 and rounded once at the end.

    Raises:
        NotImplementedError: an integer, boolean or complex ``input`` without a floating
            ``dtype=``, or a non-floating ``dtype=`` (as in PyTorch; also a ``TypeError``).

    Equals ``torch.nn.functional.log_softmax(input, dim, _stacklevel, dtype)``; shifting every logit
    in a row by the same constant leaves the result unchanged, even for offsets of 1e4 in fp32.

    Example:
        >>> import torch, xent
        >>> xent.log_softmax(torch.tensor([1.0, 2.0, 3.0]), dim=0)
        tensor([-2.4076, -1.4076, -0.4076])
    """
    check_tensor_args(log_softmax, input=input)
    if dim is None:
        dim = _implicit_dim("log_softmax", input.dim(), _stacklevel)
    dim = check_number(log_softmax, "dim", dim, "int")
    input = _softmax_input("log_softmax", input, dtype)
    x = input.to(compute_dtype(input.dtype))
    shifted = x - stable_max(x, dim)
    out = shifted - shifted.exp().sum(dim=dim, keepdim=True).log()
    return out.to(input.dtype)


@autocast_like_torch("softmax")
def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Normalised exponentials along ``dim``: ``exp(x - m) / Σ exp(x - m)``.

    .. math::

        \\operatorname{softmax}(x)_c = \\frac{e^{x_c - m}}{\\sum_k e^{x_k - m}},
        \\qquad m = \\max_k x_k

    Args:
        input: tensor of any shape and floating dtype (any dtype with a floating ``dtype=``).
        dim: the class dimension. Left out (``None``), PyTorch's deprecated implicit choice: 0
            for 0-, 1- and 3-d inputs, else 1, with PyTorch's ``UserWarning``.
        _stacklevel: the warning's stack level, as in PyTorch (3: the caller).
        dtype: if given, a floating dtype ``input`` is cast to first (as in PyTorch).

    Returns:
        Same shape and dtype as ``input`` (or ``dtype``); each slice along ``dim`` sums to 1
        (an empty input, also over a size-0 ``dim``, gives an empty result, as in PyTorch).

    Raises:
        NotImplementedError: an integer, boolean or complex ``input`` without a floating
            ``dtype=``, or a non-floating ``dtype=`` (as in PyTorch; also a ``TypeError``).

    Equals ``torch.nn.functional.softmax(input, dim, _stacklevel, dtype)``.

    Example:
        >>> import torch, xent
        >>> xent.softmax(torch.tensor([1.0, 2.0, 3.0]), dim=0)
        tensor([0.0900, 0.2447, 0.6652])
    """
    check_tensor_args(softmax, input=input)
    if dim is None:
        dim = _implicit_dim("softmax", input.dim(), _stacklevel)
    dim = check_number(softmax, "dim", dim, "int")
    input = _softmax_input("softmax", input, dtype)
    x = input.to(compute_dtype(input.dtype))
    e = (x - stable_max(x, dim)).exp()
    return (e / e.sum(dim=dim, keepdim=True)).to(input.dtype)
