"""The one place that chooses a backend.

``IMPLS`` lists the implementations every public function accepts; :func:`resolve` turns the
user's ``impl=`` into a backend for the tensors at hand; :func:`row_pass` returns the one-pass
cross-entropy kernel of that backend and :func:`logprob_backend` its log-probability and
divergence kernels; :func:`scale_unless_one_` applies an upstream gradient the backend's way.
The backends (``torch_rows``, ``triton_rows``, ``logprob_rows``, ``triton_logprob``) import only
the options types, never each other; Triton is imported the first time it is used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch

from xent._engine.options import CEParams
from xent._numerics import host_reads_cheap

# "reference" materialises everything in plain PyTorch (xent.reference): slow, differentiable
# twice, and the definition the kernels are tested against.
IMPLS = ("auto", "torch", "triton", "reference")


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve(impl: str, x: torch.Tensor) -> str:
    """``"auto"`` → ``"triton"`` on CUDA when Triton is installed, else ``"torch"``; checks.

    ``"triton"`` needs CUDA tensors, or any tensors with ``TRITON_INTERPRET=1`` (Triton's
    interpreter, how the kernels are tested without a GPU). ``"reference"`` is returned as is.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install 'xent[gpu]')")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' runs on CUDA tensors (got a {x.device.type} tensor); set "
                "TRITON_INTERPRET=1 to run the kernels through Triton's interpreter instead"
            )
    return impl


def row_pass(params: CEParams) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The one-pass cross-entropy kernel of ``params.impl`` (same contract in both backends)."""
    if params.impl == "triton":
        from xent._engine.triton_rows import cross_entropy_pass_triton

        return cross_entropy_pass_triton
    from xent._engine.torch_rows import cross_entropy_pass

    return cross_entropy_pass


def logprob_backend(impl: str) -> ModuleType:
    """The log-probability and divergence row kernels of ``impl``
    (:mod:`xent._engine.logprob_rows` or :mod:`xent._engine.triton_logprob`: same functions)."""
    if impl == "triton":
        from xent._engine import triton_logprob

        return triton_logprob
    from xent._engine import logprob_rows

    return logprob_rows


def scale_unless_one_(grads: tuple[torch.Tensor | None, ...], g: torch.Tensor, impl: str) -> None:
    """Multiply gradients formed in the forward pass, in place, by the upstream gradient ``g``.

    The usual upstream gradient of a loss is exactly 1 (``loss.backward()``), and then nothing
    should move. On the CPU reading ``g`` is free: the multiply is skipped when it is 1. On the
    Triton backend a kernel whose programs read ``g`` on the device and return at once when it
    is 1 skips it without a host read (:func:`xent._engine.triton_rows.scale_unless_one_`).
    Elsewhere the product is formed unconditionally, since reading ``g`` would wait for the device.
    """
    if host_reads_cheap(g):
        if bool(g == 1):
            return
    elif impl == "triton":
        from xent._engine.triton_rows import scale_unless_one_ as on_device

        for grad in grads:
            on_device(grad, g)
        return
    for grad in grads:
        if grad is not None:
            grad.mul_(g.to(grad.dtype))
