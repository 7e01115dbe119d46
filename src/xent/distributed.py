"""Vocabulary-parallel cross-entropy on ``torch.distributed``.

When the output layer is split along the vocabulary (tensor parallelism), each rank holds the
logits (or the weight rows) of a contiguous slice of classes. These functions are the engine's
cross-entropy with its vocabulary-parallel option (:mod:`xent._engine.parallel`): per chunk of
``n`` tokens the ranks combine ``O(n)`` statistics (an all-reduce MAX of ``n`` numbers and an
all-reduce SUM of ``2n``), then every rank runs the same row kernels as single-process xent on
its slice with the global log-sum-exp. Logits never cross the network; class weights,
soft-capping, z-loss, label smoothing over the **global** vocabulary, the Triton kernels on CUDA
and the tensor-core products all work as in :func:`xent.cross_entropy` and
:func:`xent.linear_cross_entropy`.

The layout (every rank's slice) is all-gathered and checked once per group and slice size, then
kept: a call reads nothing back from the device. Slices that overlap, leave gaps, are empty or
are out of rank order raise the same ``ValueError`` on every rank.

With PyTorch's DTensor, none of this is needed by hand: ``xent.cross_entropy`` of logits sharded
along the classes (``Shard(-1)``) and ``xent.linear_cross_entropy`` with a head weight sharded
along the vocabulary (``Shard(0)``, as ``ColwiseParallel`` gives) take this path by themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from xent._engine import dispatch, transforms
from xent._engine import parallel as _parallel
from xent._engine.autograd import LinearCrossEntropyFn, LinearOptions
from xent._engine.compile import cross_entropy_rows
from xent._engine.options import CEParams
from xent._validation import (
    Reduction,
    check_chunk_size,
    check_class_weight,
    check_label_smoothing,
    check_reduction,
    check_softcap,
    check_target_range,
    check_tensor_args,
    check_z_loss,
)


def _check_common(target: torch.Tensor, rows: int, reduction: str, label_smoothing: float) -> float:
    check_reduction(reduction)
    if target.dim() != 1 or target.shape[0] != rows:
        raise ValueError(f"target must have shape ({rows},), got {tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"expected an integer dtype for class-index targets, got {target.dtype}")
    return check_label_smoothing(label_smoothing)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy over a vocabulary split across the ranks of ``group``.

    Each rank passes the logits of its own contiguous slice of classes and the same (replicated)
    targets; every rank gets the loss over the **whole** vocabulary, and backward gives each rank
    the gradient of that loss with respect to its slice:

    .. math::

        l_i = (1-ε)(\\operatorname{lse}_i - z_{i,y_i})
              + ε\\Big(\\operatorname{lse}_i - \\frac{1}{V}\\sum_{c<V} z_{i,c}\\Big)
              + ζ \\operatorname{lse}_i^2,
        \\qquad \\operatorname{lse}_i = \\log \\sum_{c<V} e^{z_{i,c}}

    over the global vocabulary ``V = Σ_r V_r`` (label smoothing too: not per slice).

    Args:
        logits: ``(N, V_local)`` this rank's slice; slices may differ in size across ranks.
        target: ``(N)`` global class indices, identical on every rank.
        weight: optional ``(V)`` class weights over the **global** vocabulary (the same on
            every rank); ``"mean"`` divides by ``Σ w_y``, as in :func:`xent.cross_entropy`.
        group: the process group the vocabulary is split over (default: the world).
        vocab_start: this rank's first class; ``None`` lays the slices out in rank order.
            Checked once per group: slices must be contiguous, disjoint, non-empty and cover
            ``[0, V)`` in rank order.
        ignore_index: targets equal to it count for nothing (nor in the mean's denominator).
        reduction: ``"mean"`` (over non-ignored tokens), ``"sum"`` or ``"none"``.
        label_smoothing: ``ε`` in ``[0, 1]`` over the global vocabulary.
        z_loss: ``ζ ≥ 0``, coefficient of ``lse²``.
        softcap: ``s > 0`` caps logits to ``s·tanh(z/s)`` before everything else (Gemma 2).
        impl: ``"auto"``, ``"torch"`` or ``"triton"``: the backend of the row kernel.

    Returns:
        The global loss (identical on every rank), in ``logits``' dtype. Backward gives each
        rank the gradient of its slice and communicates nothing; a second backward through a
        retained graph forms it again, double backward (``create_graph=True``) is refused.

    Communication per call: one all-reduce MAX of ``N`` numbers and one all-reduce SUM of
    ``2N`` (plus, the first time for a group and slice size, an all-gather of two integers per
    rank for the layout).

    Equals ``xent.cross_entropy(torch.cat(all ranks' logits, dim=1), target, ...)``; each rank's
    gradient is the matching column block of that function's gradient.

    Example (a one-rank group here; with several ranks each passes its own slice)::

        >>> import tempfile, torch, torch.distributed as dist, xent
        >>> store = tempfile.NamedTemporaryFile(delete=False).name
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> xent.distributed.vocab_parallel_cross_entropy(logits, torch.tensor([0]))
        tensor(0.2413, grad_fn=<CrossEntropyFnBackward>)
        >>> dist.destroy_process_group()
    """
    transforms.refuse("vocab_parallel_cross_entropy")
    check_tensor_args(
        vocab_parallel_cross_entropy,
        logits=logits,
        target=target,
        weight=weight,
        floating=("logits", "weight"),
    )
    label_smoothing = _check_common(target, logits.shape[0], reduction, label_smoothing)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V_local), got {tuple(logits.shape)}")
    layout = _parallel.layout(group, logits.shape[1], vocab_start, logits.device)
    check_class_weight(weight, layout.vocab)
    impl = dispatch.resolve(impl, logits)
    if impl == "reference":
        raise ValueError("impl='reference' is for whole logits: use xent.cross_entropy")
    params = CEParams(
        int(ignore_index),
        reduction,
        label_smoothing,
        check_z_loss(z_loss),
        check_softcap(softcap),
        impl=impl,
    )
    return cross_entropy_rows(logits, target.long(), weight, params, parallel=layout)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Linear + cross-entropy with the output layer split along the vocabulary across ranks.

    ``linear_weight`` is this rank's ``(V_local, H)`` slice of the output layer (``linear_bias``
    its ``(V_local)`` slice), ``input`` the ``(N, H)`` hidden states, replicated on every rank.
    The loss is :func:`vocab_parallel_cross_entropy` of ``input @ linear_weight.T + bias``, but
    the local logits are formed ``chunk_size`` tokens at a time and turned into their gradient
    at once, as in :func:`xent.linear_cross_entropy`; they never
    exist in full, even locally. The input's gradient is all-reduced, so every rank holds the full
    ``∂L/∂input``; each rank's ``∂L/∂linear_weight`` is its own slice's.

    Every option of :func:`vocab_parallel_cross_entropy` (class weights over the global
    vocabulary, ``softcap``, ``impl``) applies; ``chunk_size`` tokens per chunk, by default as
    for :func:`xent.linear_cross_entropy` with the **global** vocabulary (so every rank walks
    the same chunks whatever its slice's size); ignored tokens are dropped before the products.
    The chunk size changes the gradients only in the last bits of their float sums.

    Communication: per chunk of ``n`` tokens an all-reduce MAX of ``n`` and an all-reduce SUM of
    ``2n`` numbers; once per call an all-reduce of the ``N × H`` input gradient.

    Equals ``xent.linear_cross_entropy(input, torch.cat(all slices), target, ...)``.

    Example (a one-rank group here; with several ranks each passes its own rows of the weight)::

        >>> import tempfile, torch, torch.distributed as dist, xent
        >>> store = tempfile.NamedTemporaryFile(delete=False).name
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> target = torch.tensor([0, 1])
        >>> xent.distributed.vocab_parallel_linear_cross_entropy(hidden, weight, target)
        tensor(0.6348)
        >>> dist.destroy_process_group()
    """
    transforms.refuse("vocab_parallel_linear_cross_entropy")
    check_tensor_args(
        vocab_parallel_linear_cross_entropy,
        input=input,
        linear_weight=linear_weight,
        target=target,
        linear_bias=linear_bias,
        weight=weight,
        floating=("input", "linear_weight", "linear_bias", "weight"),
    )
    if input.dim() != 2:
        raise ValueError(f"input must have shape (N, H), got {tuple(input.shape)}")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[1]:
        raise ValueError(
            f"linear_weight must have shape (V_local, {input.shape[1]}), got "
            f"{tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(
            f"input and linear_weight must have the same dtype, got {input.dtype} and "
            f"{linear_weight.dtype}"
        )
    label_smoothing = _check_common(target, input.shape[0], reduction, label_smoothing)
    layout = _parallel.layout(group, linear_weight.shape[0], vocab_start, input.device)
    check_class_weight(weight, layout.vocab)
    flat_target = target.long()
    check_target_range(flat_target, layout.vocab, ignore_index)
    impl = dispatch.resolve(impl, input)
    if impl == "reference":
        raise ValueError("impl='reference' is for a whole weight: use xent.linear_cross_entropy")
    params = CEParams(
        int(ignore_index),
        reduction,
        label_smoothing,
        check_z_loss(z_loss),
        check_softcap(softcap),
        impl=impl,
    )
    opts = LinearOptions(
        params,
        flat_target,
        None if weight is None else weight.detach(),
        chunk_tokens=check_chunk_size(chunk_size),
        parallel=layout,
    )
    return LinearCrossEntropyFn.apply(input, linear_weight, linear_bias, opts)


__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
