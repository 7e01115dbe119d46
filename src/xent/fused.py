"""Linear layer + cross-entropy, fused so that the ``N × V`` logits never exist in full.

The public function validates its arguments and runs the engine's chunk walker
(:mod:`xent._engine.walker`) with the cross-entropy row kernel: per chunk of tokens it forms the
logits, turns them in place into their gradient, and accumulates ``∂input``, ``∂weight`` (fp32)
and ``∂bias``, so a scalar loss is finished, gradients included, by the end of the forward.
For ``reduction="none"`` the forward keeps only each token's log-sum-exp, and backward
recomputes the logits chunk by chunk.
"""

from __future__ import annotations

import torch

from xent._engine import dispatch, parallel
from xent._engine.autograd import LinearCrossEntropyFn, LinearOptions
from xent._engine.options import CEParams
from xent._validation import (
    Reduction,
    check_chunk_size,
    check_class_weight,
    check_label_smoothing,
    check_linear_args,
    check_normalizer,
    check_reduction,
    check_softcap,
    check_target_range,
    check_tensor_args,
    check_z_loss,
)
from xent.reference import linear_cross_entropy_reference


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: torch.Tensor | float | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without storing those logits.

    With ``z_i = W x_i + b`` (soft-capped to ``s·tanh(z/s)`` if ``softcap``), per token

    .. math::

        l_i = t_i \\Big[(1-ε)\\,w_{y_i}(\\operatorname{lse}(z_i) - z_{i,y_i})
              + \\frac{ε}{V}\\sum_c w_c(\\operatorname{lse}(z_i) - z_{i,c})
              + ζ\\,\\operatorname{lse}(z_i)^2\\Big],

    with ``t_i`` the token weight (``token_weight``, else 1; 0 for ``ignore_index`` targets),
    ``w`` the class weights, ``ε`` the label smoothing and ``ζ`` the z-loss coefficient. Then

    .. math::

        L_{\\text{sum}} = \\sum_i l_i, \\qquad
        L_{\\text{mean}} = \\frac{\\sum_i l_i}{D}, \\qquad
        D = \\texttt{normalizer} \\text{ or } \\sum_{i \\text{ not ignored}} t_i w_{y_i}.

    ``normalizer`` lets micro-batches add up to the full-batch mean: give every micro-batch (or
    data-parallel rank) the total count of target tokens of the whole step and sum their losses.
    ``token_weight`` scales each token's loss and gradients (e.g. per-sequence or
    per-document weights); it receives no gradient.

    Args:
        input: hidden states ``(..., H)``; fp32, bf16, fp16 or fp64.
        linear_weight: ``(V, H)``, same dtype as ``input``. A DTensor sharded along the
            vocabulary (``Shard(0)``, as ``ColwiseParallel`` shards a head) takes the
            vocabulary-parallel path (:mod:`xent.distributed`) over its mesh's group; a
            replicated one is used as its local tensor.
        target: class indices ``(...)`` (the input's shape without ``H``).
        linear_bias: optional ``(V)``.
        weight: optional ``(V)`` class weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape of ``target``).
        ignore_index: targets equal to it are dropped before any matrix product (except while
            a CUDA graph is being captured: then they are computed with weight 0).
        label_smoothing: ``ε`` in ``[0, 1]``, over the whole vocabulary.
        z_loss: ``ζ ≥ 0``, coefficient of ``lse²`` (PaLM's auxiliary loss).
        softcap: ``s > 0`` caps logits to ``s·tanh(z/s)`` (Gemma 2).
        normalizer: denominator of ``"mean"`` instead of the token count: a number or a
            one-element tensor (never read on the host).
        token_weight: optional ``(...)`` per-token weights.
        chunk_size: tokens per chunk; default: at least 1024 tokens within 256 MiB of fp32
            logits (more if 48 MiB holds more; on CUDA, 512 MiB of logits and, for bf16, their
            bf16 gradient). It changes speed and memory; the values only in their last bits:
            ``∂linear_weight`` sums the tokens chunk by chunk and the products' blocking follows
            the chunk's shape, so two chunk sizes agree within the rounding of those float sums
            (``≲ n·ε·Σ|terms|`` for a sum of ``n`` terms), not bit for bit.
        impl: ``"auto"`` (the chunked path; its logits-to-gradient kernel in Triton on CUDA
            when installed), ``"torch"`` or ``"triton"`` (that kernel chosen explicitly; the
            matrix products are torch's, cuBLAS on GPUs), or ``"reference"`` (materialise the
            logits: :func:`linear_cross_entropy_reference`).

    Returns:
        The loss in ``input``'s dtype: a scalar, or ``target``'s shape for ``"none"``.

    Equals ``xent.cross_entropy(torch.nn.functional.linear(input, linear_weight, linear_bias)
    .flatten(0, -2), target.flatten(), weight, ...)`` (and PyTorch 2.13's
    ``F.linear_cross_entropy`` for the options it has); statistics are always fp32, and the
    weight's gradient is accumulated in fp32 and rounded once at the end.

    Memory: besides the gradients of ``input`` and ``linear_weight`` (the floor), one chunk of
    fp32 logits (125 MiB at V = 32 000 by default); for bf16/fp16 weights also an fp32
    accumulator for their gradient.

    Example:
        >>> import torch, xent
        >>> x, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]))
        tensor(0.3133)
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]), reduction="sum", normalizer=None)
        tensor(0.6265)
    """
    check_tensor_args(
        linear_cross_entropy,
        input=input,
        linear_weight=linear_weight,
        target=target,
        linear_bias=linear_bias,
        weight=weight,
        token_weight=token_weight,
        floating=("input", "linear_weight", "linear_bias", "weight"),
        real=("token_weight",),
    )
    check_reduction(reduction)
    eps = check_label_smoothing(label_smoothing)
    vocab_parallel = None
    if parallel.is_dtensor(linear_weight):  # a vocabulary-sharded head (ColwiseParallel)
        linear_weight, vocab_parallel = parallel.from_dtensor(linear_weight, 0, "linear_weight")
        if vocab_parallel is not None and parallel.is_dtensor(linear_bias):
            linear_bias, _ = parallel.from_dtensor(linear_bias, 0, "linear_bias")
        input = parallel.local_tensor(input, "input")
        target = parallel.local_tensor(target, "target")
    linear_bias = parallel.local_tensor(linear_bias, "linear_bias")
    kernel = dispatch.resolve(impl, input)
    check_linear_args(input, linear_weight, target, linear_bias, token_weight)
    vocab = linear_weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab
    check_class_weight(weight, vocab)
    norm = check_normalizer(normalizer, reduction)
    z_loss, softcap = check_z_loss(z_loss), check_softcap(softcap)
    chunk = check_chunk_size(chunk_size)
    flat_target = target.reshape(-1).long()  # int64: no wrap-around against ignore_index
    check_target_range(flat_target, vocab, ignore_index)
    if kernel == "reference":
        if vocab_parallel is not None:
            raise ValueError("impl='reference' takes a whole (not vocabulary-sharded) weight")
        return linear_cross_entropy_reference(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=eps,
            z_loss=z_loss,
            softcap=softcap,
            normalizer=norm,
            token_weight=token_weight,
        )
    opts = LinearOptions(
        CEParams(int(ignore_index), reduction, eps, z_loss, softcap, impl=kernel),
        flat_target,
        None if weight is None else weight.detach(),
        None if token_weight is None else token_weight.detach().reshape(-1),
        norm,
        chunk,
        vocab_parallel,
    )
    loss = LinearCrossEntropyFn.apply(
        input.reshape(-1, input.shape[-1]), linear_weight, linear_bias, opts
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
