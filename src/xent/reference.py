"""The plain-PyTorch definitions of xent's output-layer losses, logits and all.

Each function here materialises everything (the ``N × V`` logits, their log-softmax, every
per-row term) in the compute dtype (fp32, fp64 for fp64) from elementary operations, and lets
autograd differentiate them. They are the specification the kernels are tested against, the
baseline ``xent bench`` measures where a peer lacks an option, what ``xent explain`` prints, and
``impl="reference"`` of the public functions (differentiable twice). Slow and memory-hungry by
design: never the fast path.
"""

from __future__ import annotations

import torch

from xent._numerics import compute_dtype, reduce_rows, row_coefficients, stable_max
from xent._validation import Reduction, as_index_target, check_tensor_args


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(C)`` → ``(1, C)``; ``(N, C, d1, …)`` → ``(N·d1·…, C)`` (the class axis last)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def cross_entropy_per_row(
    z: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-row losses of ``(M, C)`` logits against ``(M)`` indices or ``(M, C)`` probabilities.

    With ``z ← s·tanh(z/s)`` (``softcap``), ``log p = z − lse(z)`` and ``ε`` the smoothing:
    indices ``l = (1−ε)(−w_y log p_y) + (ε/C) Σ_c (−w_c log p_c) + ζ lse²`` (0 on ignored
    rows); probabilities ``l = −Σ_c w_c q'_c log p_c + ζ lse²`` with ``q' = (1−ε) q + ε/C``.
    """
    cdtype = compute_dtype(z.dtype)
    z = z.to(cdtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    num_classes = z.shape[1]
    m = stable_max(z, 1)
    shifted = z - m  # log p = (z - m) - log s: never lse - z, which cancels for large logits
    log_s = shifted.exp().sum(dim=1, keepdim=True).log()
    log_p = shifted - log_s
    lse = m + log_s  # the z-loss only
    w = (
        torch.ones(num_classes, dtype=cdtype, device=z.device)
        if weight is None
        else weight.to(device=z.device, dtype=cdtype)
    )
    eps = label_smoothing
    zeta_term = z_loss * lse.squeeze(1) ** 2
    if target.dim() == 2:
        q = (1.0 - eps) * target.to(cdtype) + eps / num_classes
        return -(w * q * log_p).sum(dim=1) + zeta_term
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    nll = -w[safe] * log_p.gather(1, safe[:, None]).squeeze(1)
    loss = (1.0 - eps) * nll + zeta_term
    if eps > 0.0:
        loss = loss + (eps / num_classes) * -(w * log_p).sum(dim=1)
    return torch.where(valid, loss, torch.zeros((), dtype=cdtype, device=z.device))


def cross_entropy_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    **_ignored: object,
) -> torch.Tensor:
    """The definition of :func:`xent.cross_entropy`, materialised (options: see there).

    Accepts (and ignores) ``chunk_size``, ``impl`` and ``inplace_backward``.

    Example:
        >>> import torch
        >>> from xent.reference import cross_entropy_reference
        >>> logits = torch.tensor([[0.4, 0.4, 0.2]]).log()  # the mastiff example
        >>> cross_entropy_reference(logits, torch.tensor([1]))
        tensor(0.9163)
    """
    check_tensor_args(
        cross_entropy_reference,
        input=input,
        target=target,
        weight=weight,
        floating=("input", "weight"),
    )
    probs = tuple(target.shape) == tuple(input.shape)
    if not probs:
        target = as_index_target("target", target, cross_entropy_reference)
    rows_target = _rows(target) if probs else target.reshape(-1).long()
    per_row = cross_entropy_per_row(
        _rows(input), rows_target, weight, ignore_index, label_smoothing, z_loss, softcap
    )
    cdtype = per_row.dtype
    _, _, denom = row_coefficients(
        rows_target,
        reduction=reduction,
        dtype=cdtype,
        ignore_index=ignore_index,
        class_weight=weight,
    )
    out = reduce_rows(per_row, reduction, denom)
    if reduction == "none":
        out = (
            out.reshape(()) if input.dim() == 1 else out.reshape((input.shape[0], *input.shape[2:]))
        )
    return out.to(input.dtype)


def linear_cross_entropy_reference(
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
    impl: str = "reference",
) -> torch.Tensor:
    """The definition of :func:`xent.linear_cross_entropy`, logits and all.

    Materialises the ``N × V`` logits ``input @ linear_weight.T + linear_bias`` in fp32 (fp64
    for fp64) and lets autograd differentiate elementary operations. ``chunk_size`` and
    ``impl`` are accepted and ignored.

    Example:
        >>> import torch, xent
        >>> x, w = torch.eye(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> xent.linear_cross_entropy_reference(x, w, torch.tensor([0, 1]))
        tensor(0.3133)
    """
    check_tensor_args(
        linear_cross_entropy_reference,
        input=input,
        linear_weight=linear_weight,
        target=target,
        linear_bias=linear_bias,
        weight=weight,
        token_weight=token_weight,
        floating=("input", "linear_weight", "linear_bias", "weight"),
        real=("token_weight",),
    )
    target = as_index_target("target", target, linear_cross_entropy_reference)
    cdtype = compute_dtype(input.dtype)
    x = input.reshape(-1, input.shape[-1]).to(cdtype)
    z = x @ linear_weight.to(cdtype).t()
    if linear_bias is not None:
        z = z + linear_bias.to(cdtype)
    t = target.reshape(-1).long()
    per_row = cross_entropy_per_row(z, t, weight, ignore_index, label_smoothing, z_loss, softcap)
    tw = None if token_weight is None else token_weight.reshape(-1)
    t_i, _, denom = row_coefficients(
        t,
        reduction=reduction,
        dtype=cdtype,
        ignore_index=ignore_index,
        class_weight=weight,
        token_weight=tw,
        normalizer=normalizer,
    )
    out = reduce_rows(per_row * t_i, reduction, denom)
    if reduction == "none":
        out = out.reshape(target.shape)
    return out.to(input.dtype)


__all__ = ["cross_entropy_reference", "linear_cross_entropy_reference"]
