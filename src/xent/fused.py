"""Linear layer + cross-entropy, fused so that the ``N × V`` logits never exist in full.

The public function validates its arguments and runs the engine's chunk walker
(:mod:`xent._engine.walker`) with the cross-entropy row kernel: per chunk of tokens it forms the
logits, turns them in place into their gradient, and accumulates ``∂input``, ``∂weight`` (fp32)
and ``∂bias``, so a scalar loss is finished, gradients included, by the end of the forward.
For ``reduction="none"`` the forward keeps only each token's log-sum-exp, and backward
recomputes the logits chunk by chunk.
"""

from __future__ import annotations

import math

import torch

from xent._engine import compile as compiled_ops
from xent._engine import dispatch, parallel, policy, transforms
from xent._engine.autograd import (
    LinearClassWeightGradFn,
    LinearCrossEntropyFn,
    LinearCrossEntropySpec,
    LinearOptions,
)
from xent._engine.options import CEParams
from xent._numerics import compute_dtype
from xent._validation import (
    Reduction,
    check_chunk_size,
    check_class_weight,
    check_index_target_dtype,
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
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: object | None = None,
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

    The signature up to ``options`` is PyTorch 2.13's ``F.linear_cross_entropy``, and every
    call it accepts means the same here; xent's extras (``z_loss`` to ``impl``) are
    keyword-only after it.

    Args:
        input: hidden states ``(..., H)``; fp32, bf16, fp16 or fp64 (PyTorch: ``(H)`` or
            ``(N, H)``).
        linear_weight: ``(V, H)``, or ``(V, d1, …, dK, H)`` for a K-dimensional loss (then a
            batched input): the logits are ``(..., V, d1, …, dK)``, one softmax over ``V`` at
            each of the ``d1⋯dK`` positions. Same dtype as ``input`` (outside autocast). A
            DTensor sharded along the vocabulary (``Shard(0)``, as ``ColwiseParallel`` shards
            a head) takes the vocabulary-parallel path (:mod:`xent.distributed`) over its
            mesh's group; a replicated one is used as its local tensor.
        target: class indices ``(..., d1, …, dK)`` (the input's shape without ``H``, then the
            weight's positions), or class probabilities of the logits' shape
            ``(..., V, d1, …, dK)`` (floating; they receive a gradient). Probabilities are fed
            to the kernel chunk by chunk, as the logits are.
        linear_bias: optional ``(V, d1, …, dK)``.
        weight: optional ``(V)`` class weights; with probability targets they may require
            grad (as in PyTorch: ``∂L/∂w_v = Σ_i g_i c_i q'_iv (lse(z_i) − z_iv)``, formed chunk
            by chunk in backward), with class indices they may not.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(..., d1, …, dK)``).
        ignore_index: class-index targets equal to it are dropped before any matrix product
            (except while a CUDA graph is being captured: then they are computed with weight
            0). ``None`` (the default, as in PyTorch) means -100 for class indices; with
            probability targets it must stay None (``RuntimeError``, as in PyTorch).
        label_smoothing: ``ε`` in ``[0, 1]``, over the whole vocabulary.
        options: a ``torch.nn.LinearCrossEntropyOptions``, read for the chunk size only:
            ``batch_chunk_size`` is the tokens per chunk; ``chunking_method="aspect_ratio[:k]"``
            chooses PyTorch's size (logits as large as the input, / k); ``"auto"`` keeps xent's
            default; ``chunking_method=None`` without ``batch_chunk_size`` is one chunk. It
            must not disagree with ``chunk_size``. ``acc_policy`` and ``acc_dtype`` have no
            effect (statistics and the weight-gradient accumulator are always fp32, fp64 for
            fp64) and neither has ``allow_retain_graph`` (backward through a retained graph
            always works). ``options=None``, PyTorch's unchunked reference path, is xent's
            chunked path with the same values.
        z_loss: ``ζ ≥ 0``, coefficient of ``lse²`` (PaLM's auxiliary loss).
        softcap: ``s > 0`` caps logits to ``s·tanh(z/s)`` (Gemma 2).
        normalizer: denominator of ``"mean"`` instead of the token count: a number or a
            one-element tensor (never read on the host).
        token_weight: optional per-token weights, the class-index target's shape.
        chunk_size: tokens per chunk; default: at least 1024 tokens within 256 MiB of fp32
            logits (more if 48 MiB holds more; on CUDA, 512 MiB of logits and, for bf16, their
            bf16 gradient). It changes speed and memory; the values only in their last bits:
            ``∂linear_weight`` sums the tokens chunk by chunk and the products' blocking follows
            the chunk's shape, so two chunk sizes agree within the rounding of those float sums
            (``≲ n·ε·Σ|terms|`` for a sum of ``n`` terms), not bit for bit.
        impl: ``"auto"`` (the chunked path; its logits-to-gradient kernel in Triton on CUDA
            when installed), ``"torch"`` or ``"triton"`` (that kernel chosen explicitly; the
            matrix products are torch's, cuBLAS on GPUs), or ``"reference"`` (materialise the
            logits: :func:`linear_cross_entropy_reference`, or :func:`xent.cross_entropy` of
            them for probabilities and K-dimensional weights).

    Returns:
        The loss in ``input``'s dtype (fp32 inside an autocast region): a scalar, or
        ``(..., d1, …, dK)`` for ``"none"``.

    Equals ``xent.cross_entropy`` of ``torch.nn.functional.linear(input, linear_weight,
    linear_bias)`` with the class axis after the batch axes (and PyTorch 2.13's
    ``F.linear_cross_entropy`` for the options it has); statistics are always fp32, and the
    weight's gradient is accumulated in fp32 and rounded once at the end.

    Autocast: inside ``torch.autocast`` (e.g. bf16 hidden states from the region and an fp32
    head) ``input``, ``linear_weight`` and ``linear_bias`` are cast to the region's dtype, as
    ``F.linear`` there casts them; the products read that dtype and accumulate in fp32, the
    loss is fp32 (as ``F.cross_entropy`` there returns), and each parameter's gradient comes
    back in its own dtype. Outside autocast mixed dtypes are refused, as by ``F.linear``.

    ``torch.compile(fullgraph=True)``: the fused path appears in the graph as two custom
    operators (:mod:`xent._engine.compile`) with shape-only fake versions, so there are no
    graph breaks, no host reads in the graph, and batch sizes stay symbolic (``dynamic=True``
    or automatic dynamic shapes: no recompilation after the second size).

    Memory: besides the gradients of ``input`` and ``linear_weight`` (the floor), one chunk of
    fp32 logits (125 MiB at V = 32 000 by default); for bf16/fp16 weights also an fp32
    accumulator for their gradient.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``) it
    gives what the equivalent PyTorch composition gives; ``vmap`` makes one call per sample
    (:mod:`xent._engine.transforms`).

    Example:
        >>> import torch, xent
        >>> x, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]))
        tensor(0.3133)
        >>> xent.linear_cross_entropy(x, w, torch.tensor([0, 1]), reduction="sum", normalizer=None)
        tensor(0.6265)
        >>> per_sample = torch.func.vmap(torch.func.grad(
        ...     lambda w, x, y: xent.linear_cross_entropy(x, w, y)), in_dims=(None, 0, 0))
        >>> per_sample(w, torch.stack([x, x.flip(0)]), torch.tensor([[0, 1], [1, 0]])).shape
        torch.Size([2, 2, 3])
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
        if vocab_parallel is not None:
            transforms.refuse("linear_cross_entropy with a vocabulary-sharded weight")
    linear_bias = parallel.local_tensor(linear_bias, "linear_bias")
    kernel = dispatch.resolve(impl, input)
    input, linear_weight, linear_bias, out_dtype = policy.autocast_linear(
        input, linear_weight, linear_bias
    )
    probs = check_linear_args(input, linear_weight, target, linear_bias, token_weight, ignore_index)
    out_features = tuple(linear_weight.shape[1:-1])
    if not probs:  # PyTorch's int64/uint8 rule, on the (N) or (N, d1, …) targets it sees
        check_index_target_dtype(target if out_features else target.reshape(-1), reduction)
    ignore = -100 if ignore_index is None else int(ignore_index)
    if vocab_parallel is not None and (probs or out_features):
        raise ValueError(
            "a vocabulary-sharded linear_weight takes class-index targets and a (V, H) weight"
        )
    vocab = linear_weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab
    # Probability targets differentiate their class weights, as in PyTorch (class indices
    # refuse a weight that requires grad).
    weight_grad = probs and weight is not None and weight.requires_grad and torch.is_grad_enabled()
    check_class_weight(weight.detach() if weight_grad else weight, vocab)
    norm = check_normalizer(normalizer, reduction)
    z_loss, softcap = check_z_loss(z_loss), check_softcap(softcap)
    hidden = input.shape[-1]
    x = input.reshape(-1, hidden)
    chunk = _chunk_tokens(check_chunk_size(chunk_size), options, x.shape[0], hidden, vocab)
    if probs and vocab == 0 and vocab_parallel is None:
        # No class: each token's loss is an empty sum. The (N, 0) logits cost nothing, and
        # cross_entropy decides the reductions on them ("mean" is 0/0, as in PyTorch). The
        # class weights are empty: so is their gradient.
        kernel = "reference"
        weight = None if weight is None else weight.detach()
    if kernel == "reference":
        if vocab_parallel is not None:
            raise ValueError("impl='reference' takes a whole (not vocabulary-sharded) weight")
        if probs or out_features:
            return _reference_logits(
                input,
                linear_weight,
                target,
                linear_bias,
                weight,
                reduction,
                ignore,
                eps,
                z_loss,
                softcap,
                norm,
                token_weight,
                out_dtype,
            )
        check_target_range(target, vocab, ignore)
        loss = linear_cross_entropy_reference(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore,
            label_smoothing=eps,
            z_loss=z_loss,
            softcap=softcap,
            normalizer=norm,
            token_weight=token_weight,
        )
        return loss if out_dtype is None else loss.to(out_dtype)
    heads = math.prod(out_features)
    w, b = linear_weight, linear_bias
    if out_features:  # (C, P, H): one softmax over C at each of the P positions
        w = w.reshape(vocab, heads, hidden)
        b = None if b is None else b.reshape(vocab, heads)
    q = None
    flat_target = None
    if probs:
        # The token count is given, not -1: with no class (V = 0) the target has no element.
        q = target.reshape(x.shape[0], vocab, *((heads,) if out_features else ()))
    else:
        flat_target = target.reshape(x.shape[0], *((heads,) if out_features else ()))
        flat_target = flat_target.long()  # int64: no wrap-around against ignore_index
    ce = CEParams(ignore, reduction, eps, z_loss, softcap, impl=kernel)
    if transforms.active():  # torch.func: values are checked inside the transforms
        if probs or out_features:
            raise RuntimeError(
                "linear_cross_entropy under torch.func transforms takes class-index targets "
                "and a (V, H) weight"
            )
        tensor_norm = isinstance(norm, torch.Tensor)
        (loss,) = transforms.apply(
            LinearCrossEntropySpec(ce, chunk, None if tensor_norm else norm),
            x,
            w,
            b,
            flat_target,
            None if weight is None else weight.detach(),
            None if token_weight is None else token_weight.detach().reshape(-1),
            norm if tensor_norm else None,
        )
        loss = loss if out_dtype is None else loss.to(out_dtype)
        return loss.reshape(input.shape[:-1]) if reduction == "none" else loss
    opts = LinearOptions(
        ce,
        flat_target,
        None if weight is None else weight.detach(),
        None if token_weight is None else token_weight.detach().reshape(-1),
        norm,
        chunk,
        vocab_parallel,
        out_dtype,
    )
    if torch.compiler.is_compiling() and vocab_parallel is None:
        loss = compiled_ops.linear_cross_entropy_compiled(x, w, b, q, opts)
    else:
        with torch.autocast(input.device.type, enabled=False):
            loss = LinearCrossEntropyFn.apply(x, w, b, opts, q)
    if weight_grad:
        with torch.autocast(input.device.type, enabled=False):
            loss = loss + LinearClassWeightGradFn.apply(weight, x, w, b, q, opts)
    if reduction != "none":
        return loss
    return loss.reshape((*input.shape[:-1], *out_features))


def _chunk_tokens(
    chunk_size: int | None, options: object, num_tokens: int, hidden: int, vocab: int
) -> int | None:
    """Tokens per chunk from ``chunk_size`` or from a ``LinearCrossEntropyOptions``.

    Its ``batch_chunk_size`` is the chunk size; an explicit ``chunking_method`` of
    ``"aspect_ratio[:k]"`` sizes the chunk so its logits take as much memory as the input, /k:
    the power of two ≥ ``N / ⌈V / H⌉``, divided by ``k``; ``"auto"`` is xent's own default;
    ``None`` with no ``batch_chunk_size`` is one chunk of all tokens.
    """
    if options is None:
        return chunk_size
    if not hasattr(options, "batch_chunk_size") or not hasattr(options, "chunking_method"):
        raise TypeError(
            "options must be a torch.nn.LinearCrossEntropyOptions (or have its "
            f"batch_chunk_size and chunking_method), got {type(options).__name__}"
        )
    given = options.batch_chunk_size
    method = options.chunking_method
    if given is not None:
        given = check_chunk_size(given)
    chosen = given
    if method is not None and method != "auto":
        name, _, factor = str(method).partition(":")
        if name != "aspect_ratio" or not (factor or "1").isdigit() or int(factor or "1") < 1:
            raise ValueError(f"invalid chunking_method: {method!r}")
        per = -(-num_tokens // max(1, -(-vocab // max(hidden, 1))))
        power = 1 << max(per - 1, 0).bit_length()
        chosen = max(1, min(power // int(factor or "1"), num_tokens))
        if given is not None and given != chosen:
            raise ValueError(
                f"options.batch_chunk_size={given} and chunking_method={method!r} "
                f"({chosen} tokens) disagree; give one"
            )
    elif method is None and given is None:
        chosen = max(1, num_tokens)
    if chunk_size is not None and chosen is not None and chunk_size != chosen:
        raise ValueError(
            f"chunk_size={chunk_size} and options ({chosen} tokens per chunk) disagree; give one"
        )
    return chunk_size if chosen is None else chosen


def _reference_logits(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    ignore,
    eps,
    z_loss,
    softcap,
    norm,
    token_weight,
    out_dtype,
) -> torch.Tensor:
    """``impl="reference"`` for probability targets and K-dimensional weights: the
    ``(*batch, C, *out_features)`` logits materialised (fp32; fp64 for fp64) and
    :func:`xent.cross_entropy` on them."""
    from xent.classification import cross_entropy

    no_class = target.is_floating_point() and linear_weight.shape[0] == 0
    if (token_weight is not None or norm is not None) and not no_class:
        raise ValueError(
            "impl='reference' takes token_weight and normalizer only with class-index "
            "targets and a (V, H) weight"
        )
    cdtype = compute_dtype(input.dtype)
    vocab, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    flat_w = linear_weight.reshape(-1, input.shape[-1]).to(cdtype)
    z = input.to(cdtype) @ flat_w.t()
    if linear_bias is not None:
        z = z + linear_bias.reshape(-1).to(cdtype)
    batch = tuple(input.shape[:-1])
    z = z.reshape(math.prod(batch), vocab, *out_features)  # batch axes flattened: class axis 1
    probs = target.is_floating_point()
    target = target.reshape(z.shape if probs else (z.shape[0], *out_features))
    # With no class every token's loss is 0, whatever its token weight; a normalizer divides
    # their sum.
    by_norm = no_class and norm is not None and reduction == "mean"
    loss = cross_entropy(
        z,
        target if probs else target.long(),
        weight,
        ignore_index=ignore,
        reduction="sum" if by_norm else reduction,
        label_smoothing=eps,
        z_loss=z_loss,
        softcap=softcap,
    )
    if by_norm:
        loss = loss / (norm.reshape(()) if isinstance(norm, torch.Tensor) else norm)
    if reduction == "none":
        loss = loss.reshape((*batch, *out_features))
    return loss.to(out_dtype or input.dtype)
