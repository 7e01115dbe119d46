"""The one place that chooses a backend.

``IMPLS`` lists the implementations every public function accepts; :func:`resolve` turns the
user's ``impl=`` into a backend for the tensors at hand, and :func:`row_pass` returns the
one-pass cross-entropy kernel of that backend. The backends (:mod:`xent._engine.torch_rows`,
:mod:`xent._engine.triton_rows`) import only the options type, never each other; Triton is
imported the first time it is used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from xent._engine.options import CEParams

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
