"""Vocabulary-parallel cross-entropy on ``torch.distributed``.

When the output layer is split along the vocabulary (tensor parallelism), rank ``r`` holds the
logits (or the weight rows) of classes ``[s_r, s_r + V_r)`` only. The loss still needs, per token,
statistics over the *whole* vocabulary, and each of them is a sum or a max over classes, so each
rank reduces its own slice and the ranks combine the results with two all-reduces of ``O(N)``
numbers:

    m   = max_r  max_{c ∈ slice r} z_c                       (all-reduce MAX)
    s   = Σ_r    Σ_{c ∈ slice r} e^{z_c - m}                  (all-reduce SUM, packed with the
    z_y = Σ_r    [y ∈ slice r] z_y                             two sums below into one call)
    Σz  = Σ_r    Σ_{c ∈ slice r} z_c

Then ``lse = m + log s`` and, per token, ``l = (1-ε)(lse - z_y) + ε(lse - Σz / V) + ζ lse²``
(label smoothing spread over the **global** vocabulary ``V``). The gradient of that loss with
respect to rank ``r``'s slice, ``c (p_j (1 + 2ζ lse) - (1-ε)[j = y] - ε/V)``, needs nothing that
rank does not already have, so backward communicates nothing (except the input's gradient of the
fused version, which every rank contributes to). Logits never cross the network: ``O(N)`` floats
per step (``O(N·H)`` more for the fused version's input gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from xent._validation import Reduction, check_label_smoothing, check_reduction, compute_dtype
from xent.classification import _check_chunk_size, _check_target_range, _check_z_loss

# Statistics gathered per token, summed across ranks in one all-reduce.
_SUM_EXP, _TARGET_LOGIT, _SUM_LOGITS = 0, 1, 2


def _slice_start(
    local: int, group: dist.ProcessGroup | None, vocab_start: int | None, device: torch.device
) -> tuple[int, int]:
    """``(start, V)``: this rank's first class and the global vocabulary size.

    With ``vocab_start=None`` the slices are laid out in rank order: every rank's slice size is
    gathered once (an all-gather of one integer per rank) and the offsets are their prefix sums.
    """
    sizes = [
        torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(sizes, torch.tensor([local], dtype=torch.long, device=device), group=group)
    sizes_list = [int(s.item()) for s in sizes]
    total = sum(sizes_list)
    if vocab_start is None:
        vocab_start = sum(sizes_list[: dist.get_rank(group)])
    elif not 0 <= vocab_start <= total - local:
        raise ValueError(
            f"vocab_start={vocab_start} does not fit a slice of {local} classes in a vocabulary "
            f"of {total}"
        )
    return vocab_start, total


def _token_stats(
    z: torch.Tensor,
    local_target: torch.Tensor,
    is_local: torch.Tensor,
    group,
    need_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global statistics of a block of tokens: ``(e, stats, lse)``.

    ``e`` is a new ``(n, V_local)`` tensor holding ``exp(z - m)`` with ``m`` the global row max,
    and ``stats`` the three per-token sums over the whole vocabulary (indices ``_SUM_EXP`` …).
    """
    m = z.amax(dim=1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    stats = torch.zeros(3, z.shape[0], dtype=z.dtype, device=z.device)
    picked = z.gather(1, local_target[:, None]).squeeze(1)
    stats[_TARGET_LOGIT] = torch.where(is_local, picked, 0.0)
    if need_sum:
        stats[_SUM_LOGITS] = z.sum(dim=1)
    e = (z - m[:, None]).exp_()
    stats[_SUM_EXP] = e.sum(dim=1)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    lse = m + stats[_SUM_EXP].log()
    return e, stats, lse


def _token_loss(
    stats: torch.Tensor, lse: torch.Tensor, vocab: int, eps: float, zeta: float
) -> torch.Tensor:
    loss = (1.0 - eps) * (lse - stats[_TARGET_LOGIT])
    if eps > 0.0:
        loss = loss + eps * (lse - stats[_SUM_LOGITS] / vocab)
    if zeta != 0.0:
        loss = loss + zeta * lse * lse
    return loss


def _logit_grad(
    p: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    local_target: torch.Tensor,
    is_local: torch.Tensor,
    vocab: int,
    eps: float,
    zeta: float,
) -> torch.Tensor:
    """``c (p_j (1 + 2ζ lse) - (1-ε)[j = y] - ε/V)`` in place of ``p``."""
    p.mul_((coef * (1.0 + 2.0 * zeta * lse))[:, None])
    if eps > 0.0:
        p.sub_((coef * (eps / vocab))[:, None])
    hit = torch.where(is_local, -(1.0 - eps) * coef, 0.0)
    return p.scatter_add_(1, local_target[:, None], hit[:, None])


class _Setup:
    """Target bookkeeping shared by both functions: which tokens count, which are local."""

    def __init__(
        self,
        target: torch.Tensor,
        start: int,
        local: int,
        ignore_index: int,
        reduction: str,
        dtype: torch.dtype,
    ) -> None:
        target = target.long()  # int64: no wrap-around against ignore_index
        self.valid = target != ignore_index
        self.is_local = self.valid & (target >= start) & (target < start + local)
        self.local_target = torch.where(self.is_local, target - start, 0).long()
        count = self.valid.sum().to(dtype)
        self.denominator = count if reduction == "mean" else None
        base = self.valid.to(dtype)
        # `where`, not a division: with every target ignored the mean is 0/0 (NaN) but its
        # gradient must stay exactly 0, as in single-process cross-entropy.
        self.coef = torch.where(self.valid, 1.0 / count, 0.0) if reduction == "mean" else base


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the vocabulary-parallel losses' gradients are not differentiable "
            "(create_graph=True is not supported)"
        )


def _reduce(loss: torch.Tensor, setup: _Setup, reduction: str) -> torch.Tensor:
    loss = torch.where(setup.valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / setup.denominator if reduction == "mean" else loss.sum()


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, opts):
        group, start, vocab, ignore_index, reduction, eps, zeta = opts
        x = logits.to(compute_dtype(logits.dtype))
        setup = _Setup(target, start, x.shape[1], ignore_index, reduction, x.dtype)
        e, stats, lse = _token_stats(x, setup.local_target, setup.is_local, group, eps > 0)
        out = _reduce(_token_loss(stats, lse, vocab, eps, zeta), setup, reduction)
        grad = None
        if reduction != "none" and ctx.needs_input_grad[0]:
            # p = e / s with the global sum; the scalar loss's gradient is formed right away.
            e.div_(stats[_SUM_EXP][:, None])
            # Kept in the compute dtype until backward applies the upstream factor (fp16's
            # narrow range would flush small entries of a rounded gradient to zero).
            grad = _logit_grad(
                e, lse, setup.coef, setup.local_target, setup.is_local, vocab, eps, zeta
            )
        ctx.opts, ctx.setup, ctx.grad = opts, setup, grad
        ctx.save_for_backward(logits, lse)
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        logits, lse = ctx.saved_tensors
        _, _, vocab, _, reduction, eps, zeta = ctx.opts
        setup: _Setup = ctx.setup
        g = grad_out.to(lse.dtype)
        if reduction != "none" and ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            return grad.mul_(g).to(logits.dtype), None, None
        # "none" (or a second backward): recompute p = exp(z - lse) locally; no communication.
        coef = setup.coef * (g if reduction != "none" else g.reshape(-1))
        p = (logits.to(lse.dtype) - lse[:, None]).exp_()
        grad = _logit_grad(p, lse, coef, setup.local_target, setup.is_local, vocab, eps, zeta)
        return grad.to(logits.dtype), None, None


def _check_common(
    target: torch.Tensor, rows: int, reduction: str, label_smoothing: float, z_loss: float
) -> tuple[float, float]:
    check_reduction(reduction)
    if target.dim() != 1 or target.shape[0] != rows:
        raise ValueError(f"target must have shape ({rows},), got {tuple(target.shape)}")
    if target.is_floating_point():
        raise RuntimeError(f"expected an integer dtype for class-index targets, got {target.dtype}")
    return check_label_smoothing(label_smoothing), _check_z_loss(z_loss)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
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
        group: the process group the vocabulary is split over (default: the world).
        vocab_start: this rank's first class; ``None`` lays the slices out in rank order.
        ignore_index: targets equal to it count for nothing (nor in the mean's denominator).
        reduction: ``"mean"`` (over non-ignored tokens), ``"sum"`` or ``"none"``.
        label_smoothing: ``ε`` in ``[0, 1]`` over the global vocabulary.
        z_loss: ``ζ ≥ 0``, coefficient of ``lse²``.

    Returns:
        The global loss (identical on every rank), in ``logits``' dtype.

    Communication per call: one all-reduce MAX of ``N`` numbers and one all-reduce SUM of
    ``3N`` (plus, with ``vocab_start=None``, an all-gather of one integer per rank).

    Equals ``xent.cross_entropy(torch.cat(all ranks' logits, dim=1), target, ...)``; each rank's
    gradient is the matching column block of that function's gradient.

    Example (a one-rank group here; with several ranks each passes its own slice)::

        >>> import tempfile, torch, torch.distributed as dist, xent
        >>> store = tempfile.NamedTemporaryFile(delete=False).name
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> xent.distributed.vocab_parallel_cross_entropy(logits, torch.tensor([0]))
        tensor(0.2413, grad_fn=<_VocabParallelCEBackward>)
        >>> dist.destroy_process_group()
    """
    label_smoothing, z_loss = _check_common(
        target, logits.shape[0], reduction, label_smoothing, z_loss
    )
    start, vocab = _slice_start(logits.shape[1], group, vocab_start, logits.device)
    _check_target_range(target, vocab, ignore_index)
    opts = (group, start, vocab, int(ignore_index), reduction, label_smoothing, z_loss)
    return _VocabParallelCE.apply(logits, target, opts)


def _linear_chunks(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    setup: _Setup,
    opts: tuple,
    coef: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    lse_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Walk the tokens in chunks: per-token loss and lse, and (if ``coef``) the gradients.

    Without ``lse_in`` each chunk's statistics are combined across ranks (every rank walks the
    same chunks, so the collectives pair up); with it (the recomputing backward of ``"none"``)
    the chunk needs no communication. The input gradient is all-reduced at the end: the input
    feeds every rank's slice, so its gradient is the sum of their parts.
    """
    group, _, vocab, _, _, eps, zeta, chunk = opts
    cdtype = compute_dtype(x.dtype)
    need_x, need_w, need_b = need if coef is not None else (False, False, False)
    grad_x = torch.zeros(x.shape, dtype=cdtype, device=x.device) if need_x else None
    grad_w = torch.zeros(w.shape, dtype=cdtype, device=w.device) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=cdtype, device=w.device) if need_b else None
    w_c = w.to(cdtype)
    losses, lses = [], []
    for lo in range(0, x.shape[0], chunk):
        hi = min(lo + chunk, x.shape[0])
        rows = slice(lo, hi)
        xs = x[rows].to(cdtype)
        z = xs @ w_c.t()
        if b is not None:
            z += b.to(cdtype)
        if lse_in is None:
            p, stats, lse = _token_stats(
                z, setup.local_target[rows], setup.is_local[rows], group, eps > 0
            )
            losses.append(_token_loss(stats, lse, vocab, eps, zeta))
            lses.append(lse)
            if coef is None:
                continue
            p.div_(stats[_SUM_EXP][:, None])  # exp(z - m) / s = softmax over the whole vocabulary
        else:
            lse = lse_in[rows]
            p = z.sub_(lse[:, None]).exp_()
        dz = _logit_grad(
            p, lse, coef[rows], setup.local_target[rows], setup.is_local[rows], vocab, eps, zeta
        )
        if grad_x is not None:
            grad_x[rows] = dz @ w_c
        if grad_w is not None:
            grad_w.addmm_(dz.t(), xs)
        if grad_b is not None:
            grad_b += dz.sum(dim=0)
    if grad_x is not None:
        dist.all_reduce(grad_x, group=group)
    empty = torch.zeros(0, dtype=cdtype, device=x.device)
    loss = torch.cat(losses) if losses else empty
    lse_all = torch.cat(lses) if lses else empty
    return loss, lse_all, (grad_x, grad_w, grad_b)


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, opts):
        reduction = opts[4]
        setup = _Setup(target, opts[1], w.shape[0], opts[3], reduction, compute_dtype(x.dtype))
        coef = setup.coef if reduction != "none" else None  # scalar: gradients right away
        loss, lse, grads = _linear_chunks(
            x, w, b, setup, opts, coef, tuple(ctx.needs_input_grad[:3])
        )
        ctx.opts, ctx.setup, ctx.grads = opts, setup, grads
        ctx.save_for_backward(x, w, b, lse)
        return _reduce(loss, setup, reduction).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        x, w, b, lse = ctx.saved_tensors
        setup: _Setup = ctx.setup
        g = grad_out.to(lse.dtype)
        grads, ctx.grads = ctx.grads, (None, None, None)
        if ctx.opts[4] == "none":
            coef = setup.coef * g.reshape(-1)
            _, _, grads = _linear_chunks(
                x, w, b, setup, ctx.opts, coef, tuple(ctx.needs_input_grad[:3]), lse_in=lse
            )
        elif all(grad is None for grad in grads):
            raise RuntimeError(
                "vocab_parallel_linear_cross_entropy formed its gradients in the forward pass "
                "and a first backward consumed them; recompute the loss to backward again"
            )
        else:
            grads = tuple(None if grad is None else grad.mul_(g) for grad in grads)
        grad_x, grad_w, grad_b = grads
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None else grad_b.to(b.dtype),
            None,
            None,
        )


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Linear + cross-entropy with the output layer split along the vocabulary across ranks.

    ``linear_weight`` is this rank's ``(V_local, H)`` slice of the output layer (``linear_bias``
    its ``(V_local)`` slice), ``input`` the ``(N, H)`` hidden states, replicated on every rank.
    The loss is :func:`vocab_parallel_cross_entropy` of ``input @ linear_weight.T + bias``, but
    the local logits are formed ``chunk_size`` tokens at a time (default: 48 MiB of fp32 logits)
    and turned into their gradient at once, as in :func:`xent.linear_cross_entropy`; they never
    exist in full, even locally. The input's gradient is all-reduced, so every rank holds the full
    ``∂L/∂input``; each rank's ``∂L/∂linear_weight`` is its own slice's.

    Communication: per chunk of ``n`` tokens an all-reduce MAX of ``n`` and an all-reduce SUM of
    ``3n`` numbers; once per call an all-reduce of the ``N × H`` input gradient.

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
    if input.dim() != 2:
        raise ValueError(f"input must have shape (N, H), got {tuple(input.shape)}")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[1]:
        raise ValueError(
            f"linear_weight must have shape (V_local, {input.shape[1]}), got "
            f"{tuple(linear_weight.shape)}"
        )
    label_smoothing, z_loss = _check_common(
        target, input.shape[0], reduction, label_smoothing, z_loss
    )
    local = linear_weight.shape[0]
    start, vocab = _slice_start(local, group, vocab_start, input.device)
    _check_target_range(target, vocab, ignore_index)
    chunk_size = _check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = max(1, (48 << 20) // (4 * max(local, 1)))
    opts = (
        group,
        start,
        vocab,
        int(ignore_index),
        reduction,
        label_smoothing,
        z_loss,
        int(chunk_size),
    )
    return _VocabParallelLinearCE.apply(input, linear_weight, linear_bias, target, opts)


__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
