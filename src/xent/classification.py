"""Cross-entropy and negative log-likelihood, each with a closed-form gradient.

Both losses look at one *row* of ``C`` class scores at a time. Inputs of shape ``(N, C, d1, …, dK)``
are viewed as ``M = N·d1·…·dK`` rows of ``C`` columns (the class axis moved last), a 1-D input
``(C)`` as a single row; every formula below is written for one row ``x`` with target ``y``.

Each public function validates its arguments and hands the rows to the engine
(:mod:`xent._engine`), whose one-pass kernel forms loss and gradient together; backward is
written out by hand, and a differentiable version of it makes double backward (Hessian-vector
products, gradient penalties) work too.
"""

from __future__ import annotations

import math

import torch

from xent._engine import dispatch, parallel, policy
from xent._engine.autograd import NLLFn
from xent._engine.compile import cross_entropy_rows
from xent._engine.options import CEParams
from xent._engine.policy import autocast_like_torch
from xent._validation import (
    Reduction,
    check_chunk_size,
    check_class_weight,
    check_index_target,
    check_label_smoothing,
    check_logits,
    check_number,
    check_prob_target,
    check_reduction,
    check_softcap,
    check_target_range,
    check_tensor_args,
    check_weight_dtype,
    check_z_loss,
    legacy_reduction,
)

# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(C)`` → ``(1, C)``; ``(N, C)`` unchanged; ``(N, C, d1, …)`` → ``(N·d1·…, C)``."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    rows = x.shape[0] * math.prod(x.shape[2:])  # explicit: -1 is ambiguous when C = 0
    return x.movedim(1, -1).reshape(rows, x.shape[1])


def _rows_to_target_shape(loss: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Per-row losses ``(M)`` back to the target's shape: ``()``, ``(N)`` or ``(N, d1, …)``."""
    if input.dim() == 1:
        return loss.reshape(())
    return loss.reshape((input.shape[0], *input.shape[2:]))


def _no_classes(
    rows: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """The loss of ``(M, 0)`` rows (no classes at all), as PyTorch defines it.

    Every class-index target must then be ``ignore_index`` (the range check runs first), so
    each row's negative log-likelihood is 0; smoothing adds ``(ε/C)·Σ_c(…) = (ε/0)·0``, NaN on
    every row, ignored or not, and in the sum or mean even of no rows, as in PyTorch. A
    probability target's row loss is an empty sum, ``-0``, and its ``"mean"`` divides by
    ``numel / C = 0/0``: NaN. The z-loss adds
    ``ζ·lse² = ζ·(−∞)² = +∞`` to each counted row (probability rows only). The gradients are
    the empty ``(M, 0)`` tensors; the result stays attached to the graph so backward gives them.
    """
    if target.dim() == 2:
        per_row = -(rows * target.to(rows.dtype)).sum(dim=1)
        if z_loss > 0.0:
            per_row = per_row + torch.inf
    else:
        per_row = rows.sum(dim=1)  # zeros, attached to the graph
        if label_smoothing > 0.0:
            per_row = per_row + torch.nan
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if target.dim() == 1 and label_smoothing > 0.0:
        total = total + torch.nan  # (ε/0)·0 even with no rows at all
    return total / 0.0 if reduction == "mean" else total  # mean: 0/0 (nothing counts)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


@autocast_like_torch("cross_entropy")
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy between logits and class indices or class probabilities.

    With ``log p = log_softmax(x)`` over the class axis and class weights ``w`` (all 1 if
    ``weight`` is None), each element's loss is, for a class-index target ``y``,

    .. math::

        l = (1 - ε)\\,(-w_y \\log p_y) + \\frac{ε}{C} \\sum_c (-w_c \\log p_c),

    and for a probability target ``q`` (smoothed to ``q' = (1 - ε) q + ε / C``),

    .. math::

        l = -\\sum_c w_c\\, q'_c \\log p_c .

    ``"mean"`` divides ``Σ l`` by ``Σ w_y`` over the elements whose target is not
    ``ignore_index`` (class indices) or by the number of elements (probabilities).

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; floating dtype. A DTensor
            sharded along the classes (``Shard(1)``, class indices only) takes the
            vocabulary-parallel path (:mod:`xent.distributed`); a replicated one is used as its
            local tensor.
        target: class indices ``()``, ``(N)`` or ``(N, d1, …, dK)`` with values in ``[0, C)``
            or equal to ``ignore_index``, int64 (or uint8 for ``()`` and ``(N)``; see
            :func:`xent._validation.check_index_target_dtype`), else ``RuntimeError`` as in
            PyTorch; or probabilities with ``input``'s shape and a floating dtype (no check that
            they sum to 1; differentiable).
        weight: optional ``(C)`` class weights, may be negative; the input's dtype for
            class-index targets (else ``RuntimeError``, as in PyTorch) and then not
            differentiable; differentiable with probability targets, as in PyTorch.
        size_average: deprecated, as in PyTorch: with ``reduce``, if either is not None, it
            overrides ``reduction`` (see :func:`xent._validation.legacy_reduction`) with
            PyTorch's ``UserWarning``.
        ignore_index: class-index targets equal to it contribute nothing and are left out of the
            ``"mean"`` denominator (their logits still enter every softmax). Any integer, also
            outside ``[0, C)``. Probability targets accept only negative values (unused).
        reduce: deprecated, as in PyTorch (see ``size_average``).
        reduction: ``"none"`` (shape of a class-index target), ``"mean"`` or ``"sum"`` (scalars).
        label_smoothing: ``ε`` in ``[0, 1]``.
        z_loss: ``ζ ≥ 0`` (keyword-only): adds ``ζ · lse(x)²`` to each counted element's loss
            (PaLM's auxiliary loss; ``lse`` the log-sum-exp over classes); under ``"mean"`` it
            shares the cross-entropy's denominator.
        softcap: ``s > 0`` (keyword-only): the logits are replaced by ``s · tanh(x / s)`` before
            everything else (Gemma 2); the gradient includes the ``1 - tanh²`` factor.
        inplace_backward: opt-in (keyword-only), 2-D inputs, scalar reductions: the gradient is
            written **into the logits buffer**, which is overwritten during the forward call, so
            no gradient-sized memory is allocated. Only for logits nothing else needs afterwards;
            double backward is then impossible. The logits' version counter is bumped, so if an
            earlier operation saved them for its backward (an auxiliary loss on the same
            logits), backward raises PyTorch's "modified by an inplace operation" error instead
            of a wrong gradient. Logits that cannot be written safely (not contiguous, e.g.
            expanded, transposed or overlapping; or a leaf that requires grad) silently get a
            separate gradient buffer: same result, no memory saved.
        chunk_size: rows per chunk of the one-pass kernel (keyword-only; default: ~4 MiB of
            logits). It changes speed and memory; the values only in their last bits: the
            loss and each gradient element are float sums whose grouping follows the chunks, so
            two chunk sizes agree within that sum's rounding (a few units in the last place),
            not bit for bit. One chunk size gives the same bits on every CPU run.
        impl: ``"auto"`` (Triton on CUDA when installed, else the torch kernel), ``"torch"``,
            ``"reference"`` (:func:`xent.reference.cross_entropy_reference`: plain PyTorch) or
            ``"triton"`` (CUDA tensors, or any tensors with ``TRITON_INTERPRET=1``).

    For ``"mean"``/``"sum"`` the gradient is formed in the forward pass, in one pass over the
    logits, and backward only scales it by the upstream gradient; for ``"none"`` the forward
    keeps the per-row log-sum-exp and backward recomputes the softmax from it. Under
    ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) the loss is
    formed by plain tensor operations with the same closed-form gradient, batched by ``vmap``
    and with a forward-mode formula; ``inplace_backward`` and ``impl`` are then ignored.

    Under ``torch.autocast`` (CPU or CUDA) half-precision arguments are computed in fp32 and the
    loss is fp32, as PyTorch's.

    Returns:
        The loss in ``input``'s dtype. All targets ignored: ``"mean"`` is NaN (with a zero
        gradient), ``"sum"`` is 0. An empty batch: ``"mean"`` is NaN, ``"sum"`` is 0.

    Equals ``torch.nn.functional.cross_entropy(input, target, weight, size_average, ignore_index,
    reduce, reduction, label_smoothing)`` (the same parameters in the same order; xent's own
    options are keyword-only), except (deliberate deviations):

    * ``label_smoothing`` outside ``[0, 1]`` or NaN raises an error that is both ``ValueError``
      and ``RuntimeError`` (PyTorch raises ``RuntimeError`` above 1 and silently ignores
      negative and NaN values);
    * fp16/bf16 inputs are computed and reduced in fp32 and rounded once, so a ``"mean"`` over
      many rows stays finite (PyTorch's CPU kernel overflows to inf/NaN past ~60 000 fp16 rows);

    Raises:
        IndexError: a target outside ``[0, C)`` that is not ``ignore_index``, e.g.
            ``Target 5 is out of bounds.``
        ValueError: an unknown ``reduction``, batch-size mismatch.
        ValueError and RuntimeError (:class:`xent._validation.InvalidValueError`): bad
            ``label_smoothing``; a class weight of another dtype than a class-index input's.
        RuntimeError: target size or weight length that does not fit ``input``; a wrong target
            dtype.
        TypeError: ``ignore_index`` that is not an integer, ``label_smoothing`` that is not a
            real number (as in PyTorch).

    Example:
        >>> import torch, xent
        >>> logits = torch.tensor([[0.4, 0.4, 0.2]]).log()  # the mastiff example
        >>> xent.cross_entropy(logits, torch.tensor([1]))
        tensor(0.9163)
        >>> xent.cross_entropy(logits, torch.tensor([1]), label_smoothing=0.1)
        tensor(0.9394)
    """
    check_tensor_args(
        cross_entropy, input=input, target=target, weight=weight, floating=("input", "weight")
    )
    reduction = legacy_reduction(size_average, reduce, reduction, stacklevel=4)  # past autocast
    check_reduction(reduction)
    ignore_index = check_number(cross_entropy, "ignore_index", ignore_index, "int")
    eps = check_label_smoothing(label_smoothing, cross_entropy)
    vocab_parallel = None
    if parallel.is_dtensor(input):  # vocabulary-sharded logits: the vocabulary-parallel path
        input, vocab_parallel = parallel.from_dtensor(input, 1 if input.dim() > 1 else 0, "input")
        target = parallel.local_tensor(target, "target")
        weight = parallel.local_tensor(weight, "weight")
    check_logits(input)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if vocab_parallel is not None:
        num_classes = vocab_parallel.vocab
    probs = policy.is_probability_target(input, target)
    check_class_weight(weight, num_classes, differentiable=probs)
    if not probs:
        check_index_target(input, target, ignore_index, reduction)
        check_weight_dtype(weight, input)
    impl = dispatch.resolve(impl, input)
    z_loss, softcap = check_z_loss(z_loss), check_softcap(softcap)
    if impl == "reference":
        from xent.reference import cross_entropy_reference

        return cross_entropy_reference(
            input, target, weight, ignore_index, reduction, eps, z_loss=z_loss, softcap=softcap
        )
    params = CEParams(
        ignore_index, reduction, eps, z_loss, softcap, check_chunk_size(chunk_size), impl
    )
    if probs:
        check_prob_target(input, target, ignore_index)
        if vocab_parallel is not None:
            raise ValueError("vocabulary-parallel cross-entropy takes class-index targets only")
        rows_target = _as_rows(target)
    else:
        # int64 from here on: compared in uint8, ignore_index=-100 would wrap to 156
        # and silently ignore a real class. Its range is checked by the engine, where it is read.
        rows_target = target.reshape(-1).long()
    if num_classes == 0 and vocab_parallel is None:
        if rows_target.dim() == 1:
            check_target_range(rows_target, 0, ignore_index)
        loss = _no_classes(_as_rows(input), rows_target, reduction, eps, z_loss)
        if weight is not None and weight.requires_grad:
            # No class, no term holds a weight: ∂L/∂w is the empty (0) gradient, as in PyTorch.
            loss = loss + weight.sum().to(loss.dtype)  # an empty sum: exactly 0
        return _rows_to_target_shape(loss, input) if reduction == "none" else loss
    inplace = bool(inplace_backward) and input.dim() == 2
    loss = cross_entropy_rows(
        _as_rows(input), rows_target, weight, params, inplace=inplace, parallel=vocab_parallel
    )
    return _rows_to_target_shape(loss, input) if reduction == "none" else loss


@autocast_like_torch("nll_loss")
def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of class indices under given log-probabilities.

    .. math::

        l = -w_y\\, x_y, \\qquad
        L_{\\text{mean}} = \\frac{\\sum_i l_i}{\\sum_{i:\\, y_i \\ne \\text{ignore}} w_{y_i}}

    ``cross_entropy(x, y)`` equals ``nll_loss(log_softmax(x, 1), y)``.

    Args:
        input: log-probabilities ``(C)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; floating dtype.
            Nothing checks that they are normalised: the loss is simply linear in ``input``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, …, dK)`` in ``[0, C)`` or
            ``ignore_index``; int64, or uint8 for ``()`` and ``(N)`` (as in PyTorch).
        weight: optional ``(C)`` class weights of the input's dtype (else ``RuntimeError``, as
            in PyTorch).
        size_average: deprecated, as in PyTorch: with ``reduce``, if either is not None, it
            overrides ``reduction``, with PyTorch's ``UserWarning``.
        ignore_index: targets equal to it contribute nothing and leave the mean's denominator.
        reduce: deprecated, as in PyTorch (see ``size_average``).
        reduction: ``"none"`` (target's shape), ``"mean"`` or ``"sum"``.

    Returns:
        The loss in ``input``'s dtype (fp16/bf16 are reduced in fp32: a deviation, as in
        :func:`cross_entropy`).

    Equals ``torch.nn.functional.nll_loss(input, target, weight, size_average, ignore_index,
    reduce, reduction)``.

    Raises:
        IndexError: a target outside ``[0, C)`` that is not ``ignore_index``.
        ValueError: an unknown ``reduction`` or a batch-size mismatch.

    Example:
        >>> import torch, xent
        >>> log_p = torch.tensor([[0.1, 0.12, 0.78]]).log()  # the horse example
        >>> xent.nll_loss(log_p, torch.tensor([2]))
        tensor(0.2485)
    """
    check_tensor_args(
        nll_loss, input=input, target=target, weight=weight, floating=("input", "weight")
    )
    reduction = legacy_reduction(size_average, reduce, reduction, stacklevel=4)  # past autocast
    check_reduction(reduction)
    ignore_index = check_number(nll_loss, "ignore_index", ignore_index, "int")
    check_logits(input)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    check_class_weight(weight, num_classes)
    check_index_target(input, target, ignore_index, reduction)
    check_weight_dtype(weight, input)
    check_target_range(target, num_classes, ignore_index)
    if num_classes == 0:
        loss = _no_classes(_as_rows(input), target.reshape(-1).long(), reduction)
        return _rows_to_target_shape(loss, input) if reduction == "none" else loss
    params = CEParams(ignore_index, reduction)
    loss = NLLFn.apply(_as_rows(input), target.reshape(-1).long(), weight, params)
    return _rows_to_target_shape(loss, input) if reduction == "none" else loss
