"""``torch.nn.Module`` wrappers: each stores its options and calls the matching xent function.

The constructors take PyTorch's parameters in PyTorch's order, the deprecated ``size_average``
and ``reduce`` included (if either is given it sets ``self.reduction`` at construction, with
PyTorch's warning), so ``torch.nn.CrossEntropyLoss(...)`` becomes
``xent.nn.CrossEntropyLoss(...)`` whether its arguments are positional or named. Class weights and
``pos_weight`` are registered as buffers, so they follow ``.to(device)`` and land in the
``state_dict`` exactly as in PyTorch.

Example:
    >>> import torch, xent
    >>> loss_fn = xent.nn.CrossEntropyLoss(label_smoothing=0.1)
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    >>> round(loss_fn(logits, torch.tensor([0, 1])).item(), 4)
    0.5047
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xent._validation import Reduction, legacy_reduction
from xent.binary import binary_cross_entropy, binary_cross_entropy_with_logits
from xent.classification import cross_entropy, nll_loss
from xent.divergence import kl_div
from xent.fused import linear_cross_entropy
from xent.regression import check_module_delta, huber_loss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "HuberLoss",
    "KLDivLoss",
    "LinearCrossEntropyLoss",
    "NLLLoss",
]


class _Loss(nn.Module):
    """Stores ``reduction``, or the one the deprecated ``size_average``/``reduce`` ask for."""

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        depth: int = 1,
    ) -> None:
        super().__init__()
        # The warning points at the line that builds the module: ``depth`` constructors up.
        self.reduction = legacy_reduction(size_average, reduce, reduction, stacklevel=3 + depth)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _WeightedLoss(_Loss):
    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None,
        size_average: bool | None,
        reduce: bool | None,
        reduction: str,
    ) -> None:
        super().__init__(size_average, reduce, reduction, depth=2)
        self.register_buffer("weight", weight)


class CrossEntropyLoss(_WeightedLoss):
    """Module form of :func:`xent.cross_entropy`; the parameters of ``torch.nn.CrossEntropyLoss``.

    Shapes: input ``(C)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; target class indices (the input's
    shape without the class axis) or probabilities (the input's shape).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class NLLLoss(_WeightedLoss):
    """Module form of :func:`xent.nll_loss`; the parameters of ``torch.nn.NLLLoss``."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class BCELoss(_WeightedLoss):
    """Module form of :func:`xent.binary_cross_entropy`; the parameters of ``torch.nn.BCELoss``."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_WeightedLoss):
    """Module form of :func:`xent.binary_cross_entropy_with_logits`.

    The parameters of ``torch.nn.BCEWithLogitsLoss``; ``pos_weight`` is a buffer like ``weight``.
    """

    pos_weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: Reduction = "mean",
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy_with_logits(
            input,
            target,
            weight=self.weight,
            reduction=self.reduction,
            pos_weight=self.pos_weight,
        )


class KLDivLoss(_Loss):
    """Module form of :func:`xent.kl_div`; the parameters of ``torch.nn.KLDivLoss``.

    As in PyTorch, ``size_average``/``reduce`` replace ``reduction`` at construction, so a module
    built with them never divides by the batch size.
    """

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        log_target: bool = False,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target}"


class HuberLoss(_Loss):
    """Module form of :func:`xent.huber_loss`; the parameters of ``torch.nn.HuberLoss``.

    As in PyTorch, a ``delta`` that is not a Python ``float`` or ``int`` raises ``TypeError`` at
    construction. ``forward`` also takes xent's per-element ``weight`` (keyword-only), which
    :func:`xent.huber_loss` takes.
    """

    def __init__(self, reduction: Reduction = "mean", delta: float = 1.0) -> None:
        check_module_delta(delta)
        super().__init__(reduction=reduction)
        self.delta = delta

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta, weight=weight)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, delta={self.delta}"


class LinearCrossEntropyLoss(nn.Module):
    """An output layer and its cross-entropy in one: :func:`xent.linear_cross_entropy`.

    The constructor is ``torch.nn.LinearCrossEntropyLoss``'s (``in_features, num_classes, *,
    out_features=(), bias=False, device=None, dtype=None, reduction="mean", weight=None,
    ignore_index=None, label_smoothing=0.0, options=None``), followed by xent's keyword-only
    ``z_loss``, ``softcap`` and ``chunk_size``. As there, the module owns the projection as
    ``self.linear = Linear(in_features, num_classes · prod(out_features))`` (flat storage, so
    ``state_dict`` keys and shapes are PyTorch's) and ``forward`` views its weight as
    ``(num_classes, *out_features, in_features)``: ``loss_fn(hidden, target)`` trains the head
    without ever storing its logits. ``forward`` also takes xent's per-call ``normalizer`` and
    ``token_weight``.

    Shapes: input ``(H)`` or ``(..., H)``; target class indices ``(..., *out_features)`` or
    probabilities ``(..., num_classes, *out_features)``; ``"none"`` gives
    ``(..., *out_features)``.

    Example:
        >>> import torch, xent
        >>> _ = torch.manual_seed(0)
        >>> head = xent.nn.LinearCrossEntropyLoss(16, 100, label_smoothing=0.1)
        >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
        >>> loss.backward()
        >>> head.linear.weight.grad.shape
        torch.Size([100, 16])
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: Reduction = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: object | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}"
            )
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        width = num_classes * math.prod(self.out_features)
        self.linear = nn.Linear(in_features, width, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        normalizer: torch.Tensor | float | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=None if bias is None else bias.reshape(shape),
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=normalizer,
            token_weight=token_weight,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction!r}"
        )
