"""The engine's decisions, each taken in one place with one message."""

from __future__ import annotations

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


INPLACE_CONSUMED = (
    "inplace_backward=True overwrote the logits with their gradient, which the first backward "
    "consumed; recompute the loss (or call it without inplace_backward) to backward again"
)
