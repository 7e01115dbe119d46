"""The losses on hidden states (and the log-probability losses) under ``torch.func`` transforms.

The engine's eager Functions form gradients inside their forward pass, keep per-call buffers on
``ctx`` and drop ignored tokens with a data-dependent index: fast, but none of that composes
with ``torch.func.grad``, ``vmap``, ``jacrev``, ``jacfwd`` or ``jvp``. While such a transform is
active (:func:`active`) a public function hands its tensors to :func:`apply` instead, with a
:class:`Spec`: three plain computations on ordinary tensors,

* ``value(t) -> outputs``: the forward pass (no gradient formed),
* ``vjp(t, grads, need) -> ∂`` of ``Σ_k <grads_k, out_k>`` for the differentiable inputs,
* ``jvp(t, tangents) -> ȯut``: the forward-mode derivative, ``Σ_c ∂out/∂z_c · ż_c`` in closed
  form (``ż = ẋWᵀ + xẆᵀ + ḃ`` for a head), chunk by chunk like the forward.

Each computation is an autograd Function in the ``setup_context`` form whose batching rule
(``vmap``) loops over the vmapped dimension and stacks the results: every sample is its own
call, so a scalar reduction (a mean over a sample's tokens, its own normalizer) stays per
sample, and every call runs on ordinary tensors, where the walker may still drop ignored tokens
and the validation may read values. The loop is the correct general rule, not the fastest one:
``B`` vmapped samples cost ``B`` walks (Python overhead; the flops are those of one walk over
all samples, and per-sample weight gradients need their own products anyway). One fast case:
the forward of per-token outputs (``reduction="none"``, log-probabilities) vmapped over
per-token inputs only is one call on the ``B·M`` tokens (:func:`_fold`).

``value``'s Function has ``backward`` (one ``vjp`` call) and ``jvp`` (one ``jvp`` call), so
``grad``, ``vjp``, ``jacrev``, ``vmap`` of any of them, ``jvp`` and ``jacfwd`` compose; the
``vjp`` and ``jvp`` Functions are not differentiable again (no Hessians, as for the eager path's
``create_graph=True``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from xent._engine import policy

Tensors = tuple[torch.Tensor | None, ...]


def active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running (the decision is
    :func:`xent._engine.policy.under_transforms`)."""
    return policy.under_transforms()


def refuse(function: str) -> None:
    """Raise under ``torch.func`` transforms: for functions that do not support them (the
    vocabulary-parallel losses, whose collectives cannot be batched or differentiated there)."""
    if active():
        raise RuntimeError(
            f"{function} does not support torch.func transforms (grad, vmap, jacrev, jacfwd, "
            "jvp); call it outside them, or use the single-device functions"
        )


class Spec(Protocol):
    """One call's options (no tensors: those travel as the Functions' inputs, so that the
    transforms see them) and its three computations on ordinary tensors ``t``."""

    name: str
    num_diff: int  # t[:num_diff] are differentiable; the rest (targets, weights) are not

    def value(self, t: Tensors) -> tuple[torch.Tensor, ...]: ...

    def vjp(
        self, t: Tensors, grads: tuple[torch.Tensor | None, ...], need: tuple[bool, ...]
    ) -> Tensors: ...

    def jvp(self, t: Tensors, tangents: Tensors) -> tuple[torch.Tensor, ...]: ...

    def row_inputs(self, t: Tensors) -> tuple[bool, ...] | None:
        """Which tensors of ``t`` are indexed by token along dimension 0, when every output
        is per token (``(M)``, or ``(0)`` for one not requested); None when an output is a
        reduction over the tokens."""
        ...


def apply(spec: Spec, *t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``spec.value(t)`` as a differentiable, batchable call (see the module docstring)."""
    return _Value.apply(spec, *t)


def _loop(function, info, in_dims, args) -> tuple[tuple, tuple]:
    """The batching rule of every Function here: one call per vmapped sample, outputs stacked
    along a new leading dimension (None outputs stay None)."""
    per_sample = []
    for i in range(info.batch_size):
        pairs = zip(args, in_dims, strict=True)
        sample = [a.select(d, i) if isinstance(d, int) else a for a, d in pairs]
        per_sample.append(function.apply(*sample))
    outs = tuple(
        None if parts[0] is None else torch.stack(parts) for parts in zip(*per_sample, strict=True)
    )
    return outs, tuple(None if o is None else 0 for o in outs)


class _Value(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(spec: Spec, *t):
        return spec.value(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, *t = inputs
        ctx.spec = spec
        ctx.save_for_backward(*t)
        ctx.save_for_forward(*t)

    @staticmethod
    def backward(ctx, *grads):
        spec: Spec = ctx.spec
        need = tuple(ctx.needs_input_grad[1 : 1 + spec.num_diff])
        t = ctx.saved_tensors
        if not any(need):
            return (None,) * (1 + len(t))
        diff = _Vjp.apply(spec, need, len(grads), *grads, *t)
        return (None, *diff, *(None,) * (len(t) - spec.num_diff))

    @staticmethod
    def jvp(ctx, _spec_tangent, *tangents):
        spec: Spec = ctx.spec
        t = ctx.saved_tensors
        return _Jvp.apply(spec, *tangents[: spec.num_diff], *t)

    @staticmethod
    def vmap(info, in_dims, spec, *t):
        folded = _fold(spec, info.batch_size, in_dims[1:], t)
        if folded is None:
            return _loop(_Value, info, in_dims, (spec, *t))
        outs = _Value.apply(spec, *folded)
        outs = tuple(o.reshape(info.batch_size, o.shape[0] // info.batch_size) for o in outs)
        return outs, (0,) * len(outs)


def _fold(spec: Spec, batch: int, in_dims, t: Tensors) -> Tensors | None:
    """The batching rule's fast case: per-token outputs, and a vmapped dimension only on
    per-token inputs (hidden states, logits, targets, token weights; not a head or a
    normalizer). Then the ``B`` samples of ``M`` tokens are one call on ``B·M`` tokens: the
    per-token inputs are moved (or, when not batched, expanded) to ``(B, M, ...)`` and
    flattened. Otherwise None (the per-sample loop)."""
    rows = spec.row_inputs(t)
    if rows is None or any(d is not None and not r for d, r in zip(in_dims, rows, strict=True)):
        return None
    folded = []
    for a, d, r in zip(t, in_dims, rows, strict=True):
        if a is not None and r:
            a = a.movedim(d, 0) if d is not None else a.expand(batch, *a.shape)
            a = a.reshape(batch * a.shape[1], *a.shape[2:])
        folded.append(a)
    return tuple(folded)


def _not_twice(ctx, *_):
    raise RuntimeError(
        f"{ctx.spec.name}'s derivatives are not differentiable again under torch.func "
        "(no Hessians); use impl='reference' for higher derivatives"
    )


class _Vjp(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(spec: Spec, need, num_grads: int, *args):
        grads, t = args[:num_grads], args[num_grads:]
        return tuple(spec.vjp(t, grads, need))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]

    backward = staticmethod(_not_twice)
    jvp = staticmethod(_not_twice)

    @staticmethod
    def vmap(info, in_dims, spec, need, num_grads, *args):
        return _loop(_Vjp, info, in_dims, (spec, need, num_grads, *args))


class _Jvp(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(spec: Spec, *args):
        tangents, t = args[: spec.num_diff], args[spec.num_diff :]
        return tuple(spec.jvp(t, tangents))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]

    backward = staticmethod(_not_twice)
    jvp = staticmethod(_not_twice)

    @staticmethod
    def vmap(info, in_dims, spec, *args):
        return _loop(_Jvp, info, in_dims, (spec, *args))


def head_tangent(
    rows, x: torch.Tensor, w: torch.Tensor, dx, dw, db, dtype: torch.dtype
) -> torch.Tensor | None:
    """``ż = ẋ Wᵀ + x Ẇᵀ + ḃ`` on the chunk ``rows`` (None when no tangent is given), in
    ``dtype``: the logits' tangent of a head ``z = x Wᵀ + b``."""
    zdot = None
    if dx is not None:
        zdot = torch.mm(dx[rows].to(dtype), w.to(dtype).t())
    if dw is not None:
        part = torch.mm(x[rows].to(dtype), dw.to(dtype).t())
        zdot = part if zdot is None else zdot + part
    if db is not None:
        zdot = db.to(dtype).expand(len(x[rows]), -1) if zdot is None else zdot + db.to(dtype)
    return zdot


def zero_tangent(x: torch.Tensor, rows, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(len(x[rows]), dtype=dtype, device=x.device)


class HeadTangentRows:
    """A row kernel for the walker that adds the forward-mode derivative to ``inner``'s results.

    ``inner`` is built with the coefficients ``c_i`` of the output's rows; it writes
    ``∂(Σ_i c_i l_i)/∂z`` over the chunk's logits, and since ``l_i`` depends on row ``i`` alone,
    row ``i`` of it is ``c_i ∂l_i/∂z_i``. The extra result is ``c_i l̇_i = Σ_v c_i ∂l_i/∂z_iv ·
    ż_iv`` with ``ż`` from :func:`head_tangent`: the derivative of the per-row outputs
    (``"none"``), whose sum is that of a scalar reduction when ``c`` holds its weights.
    """

    def __init__(self, inner, num_inner: int, x, w, dx, dw, db) -> None:
        self.inner, self.num_outputs = inner, num_inner + 1
        self.x, self.w, self.dx, self.dw, self.db = x, w, dx, dw, db

    def __call__(self, z, rows, grad_out):
        results = self.inner(z, rows, z)  # z now holds the rows' gradients
        zdot = head_tangent(rows, self.x, self.w, self.dx, self.dw, self.db, z.dtype)
        tangent = zero_tangent(self.x, rows, z.dtype) if zdot is None else (z * zdot).sum(1)
        return (*results, tangent)
