"""Large logits: every loss and gradient is formed relative to the row max.

Cross-entropy is invariant under a shift of the logits, ``l(z + c) = l(z)``, but a loss formed as
``lse - z_y`` subtracts two numbers of the logits' magnitude and keeps only the digits left
over. The honest bound is on the *rounded* shifted inputs ``x' = fl(z + c)``: the kernels see
``x'``, not ``z + c``, so they are compared with a float64 oracle evaluated on ``x'`` itself,
within a tolerance that does not grow with ``c``. The oracle is torch's cross-entropy of
``x' - max x'`` (exact in float64: the two are within a factor of 2 of each other) plus the
z-loss ``ζ (m + lse(x' - m))²``: torch's own ``logsumexp`` backward forms ``e^{x - lse}`` and
carries the same cancellation (4e-6 off at ``c = 10⁷`` in float64). A loss formed as
``lse - z_y`` is off by about ``ulp(c)``: 3e-5 at ``c = 10³`` in fp32, 4.5e-4 at ``10⁴``, and
no correct digit at ``10⁷``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles import relative_cross_entropy, relative_log_probs, torch_linear_cross_entropy

import xent
from xent._engine import triton_logprob as triton_lp
from xent._engine import triton_rows as triton_ce
from xent.posttrain import linear_policy_loss_reference

IMPLS = ["torch", "triton"]
OFFSETS = [1e3, 1e4, 1e7]
# Bounds on |ours - oracle(x')|, absolute and relative, per dtype: a few roundings of the O(1)
# quantities (log s, z - m, p), independent of the offset.
TOL = {torch.float32: 5e-6, torch.float64: 1e-14}
FMAX = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # Several blocks per row in the Triton kernel: the running max moves between blocks, and
    # the smoothing sum relative to it moves with it.
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 16)
    monkeypatch.setattr(triton_lp, "MAX_BLOCK", 16)


def _logits(dtype, offset, rows=5, classes=37, seed=0):
    """``fl(z + c)``: standard-normal logits (one row ascending, so that the max grows in every
    block) shifted by ``offset``, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    z[1] = torch.linspace(-3.0, 3.0, classes, dtype=torch.float64)
    return (z + offset).to(dtype)


def _index_target(rows, classes, seed=1):
    t = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))
    t[1] = classes - 1  # the ascending row's max
    t[3] = -100
    return t


OPTIONS = {
    "plain": dict(),
    "smoothing+weights": dict(label_smoothing=0.2, weighted=True),
    "z_loss": dict(z_loss=1e-3),
}


def _opts(name, classes, dtype):
    opts = dict(OPTIONS[name])
    if opts.pop("weighted", False):
        gen = torch.Generator().manual_seed(5)
        opts["weight"] = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return opts


def _check(ours, ref, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(ours.double(), ref, atol=tol * scale, rtol=tol)


def _againstrelative_cross_entropy(x, target, dtype, impl, **opts):
    """Loss ("none": the gradient recomputed from the kept (m, log s)) and gradient ("sum":
    formed in the forward pass) of xent against the float64 oracle on the same ``x``."""
    up = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x64 = x.double().requires_grad_()
    opts64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    big = float(x64.detach().abs().max())
    # The z-loss's own term is of the size of lse² (that of the offset squared): its bound is
    # relative, and its gradient 2ζ lse p is of the size of the offset.
    scale = max(1.0, opts.get("z_loss", 0.0) * big)
    if "softcap" in opts:
        opts64["cap_dtype"] = dtype
        if impl == "triton":
            # Triton's tanh is not torch's: the capped logits differ by a few of their ulps,
            # which no formula after the cap can undo (the bound this path cannot beat).
            scale = max(scale, 8.0 * torch.finfo(dtype).eps * big / TOL[dtype])
    ref = relative_cross_entropy(x64, target, **opts64)
    (g_ref,) = torch.autograd.grad(ref, x64, up, retain_graph=True)
    (g_sum,) = torch.autograd.grad(ref.sum(), x64)
    for reduction in ("none", "sum"):
        xi = x.clone().requires_grad_()
        loss = xent.cross_entropy(xi, target, reduction=reduction, impl=impl, **opts)
        g_up = up.to(dtype) if reduction == "none" else None
        (g,) = torch.autograd.grad(loss, xi, g_up)
        if reduction == "none":
            _check(loss, ref.detach(), dtype, scale)
            _check(g, g_ref, dtype, scale)
        else:
            _check(loss, ref.detach().sum(), dtype, x.shape[0] * scale)
            _check(g, g_sum, dtype, scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_issue_cases(impl):
    # [0, 1, 2, 3] + 1e7 in fp32, target 1: torch's cross-entropy gives 2.4401898.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]]) + 1e7
    t = torch.tensor([1])
    ours = xent.cross_entropy(x, t, impl=impl)
    torch.testing.assert_close(ours, F.cross_entropy(x, t), atol=1e-6, rtol=1e-6)
    exact = math.log(sum(math.exp(k - 1.0) for k in range(4)))  # l(z) = lse(z - z_y)
    assert abs(ours.item() - exact) < 1e-6
    # [fmax, fmax, 0], target 0: log 2 and the gradient [-1/2, 1/2, 0], from the forward pass
    # ("mean") and recomputed from the kept statistics ("none").
    for reduction in ("mean", "none"):
        x = torch.tensor([[FMAX, FMAX, 0.0]], requires_grad=True)
        loss = xent.cross_entropy(x, torch.tensor([0]), reduction=reduction, impl=impl)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert abs(loss.sum().item() - math.log(2.0)) < 1e-7
        assert torch.equal(g, torch.tensor([[-0.5, 0.5, 0.0]]))
        ref = F.cross_entropy(x.detach(), torch.tensor([0]), reduction=reduction)
        torch.testing.assert_close(loss.detach(), ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_max_logits(impl, dtype):
    # Half-precision logits keep only (m, log s) and recompute the gradient in backward: at the
    # dtype's largest logits it is still [-1/2, 1/2, 0], the loss log 2.
    big = torch.finfo(dtype).max
    for reduction in ("mean", "none"):
        x = torch.tensor([[big, big, 0.0]], dtype=dtype, requires_grad=True)
        loss = xent.cross_entropy(x, torch.tensor([0]), reduction=reduction, impl=impl)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert loss.dtype == dtype
        assert loss.sum().item() == torch.tensor(math.log(2.0), dtype=dtype).item()
        assert torch.equal(g, torch.tensor([[-0.5, 0.5, 0.0]], dtype=dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_index_targets_shift_invariant(impl, dtype, offset, name):
    x = _logits(dtype, offset)
    t = _index_target(*x.shape)
    _againstrelative_cross_entropy(x, t, dtype, impl, **_opts(name, x.shape[1], dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
def test_softcap_shift_invariant(impl, dtype, offset):
    # A cap of 4c keeps the capped logits near 0.98c with a spread of ~0.94 of the original one:
    # as large, and as close together, as uncapped ones.
    x = _logits(dtype, offset)
    t = _index_target(*x.shape)
    _againstrelative_cross_entropy(x, t, dtype, impl, softcap=4.0 * offset, label_smoothing=0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
def test_probability_targets_shift_invariant(impl, dtype, offset):
    x = _logits(dtype, offset)
    gen = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(x.shape, generator=gen, dtype=torch.float64), 1).to(dtype)
    _againstrelative_cross_entropy(x, q, dtype, impl, label_smoothing=0.1)
    # ∂l/∂q = -(1 - ε) w ((z - m) - log s): relative to the max too.
    up = torch.rand(x.shape[0], generator=gen, dtype=torch.float64)
    qi = q.clone().requires_grad_()
    loss = xent.cross_entropy(x, qi, reduction="none", label_smoothing=0.1, impl=impl)
    (gq,) = torch.autograd.grad(loss, qi, up.to(dtype))
    q64 = q.double().requires_grad_()
    ref = relative_cross_entropy(x.double(), q64, label_smoothing=0.1)
    (gq_ref,) = torch.autograd.grad(ref, q64, up)
    _check(gq, gq_ref, dtype, 10.0)  # -log p reaches ~10 on these rows


@pytest.mark.parametrize("offset", OFFSETS)
def test_double_backward_shift_invariant(offset):
    # create_graph=True: the differentiable closed form, relative to the max as well.
    x = _logits(torch.float32, offset).requires_grad_()
    t = _index_target(*x.shape)
    loss = xent.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-12)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    ref = (
        relative_cross_entropy(x64, t, "sum", label_smoothing=0.1, z_loss=1e-12) / (t != -100).sum()
    )
    (g_ref,) = torch.autograd.grad(ref, x64)
    scale = max(1.0, 1e-12 * offset)
    _check(loss.detach(), ref.detach(), torch.float32)
    _check(g.detach(), g_ref, torch.float32, scale)


@pytest.mark.parametrize("offset", OFFSETS)
def test_reference_shift_invariant(offset):
    x = _logits(torch.float32, offset)
    t = _index_target(*x.shape)
    ours = xent.reference.cross_entropy_reference(x, t, reduction="none", label_smoothing=0.1)
    ref = relative_cross_entropy(x.double(), t, label_smoothing=0.1)
    _check(ours, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_linear_cross_entropy_with_a_large_bias(impl, offset):
    # Hidden states and weights on a grid of 1/8 and a bias of offset + a multiple of 1/64: every
    # logit x·w + b is exact in fp32, so the kernels see exactly the oracle's float64 logits.
    gen = torch.Generator().manual_seed(4)
    n, h, v = 7, 5, 29
    x = (torch.randint(-8, 9, (n, h), generator=gen) / 8.0).float()
    w = (torch.randint(-8, 9, (v, h), generator=gen) / 8.0).float()
    b = (offset + torch.randint(-64, 65, (v,), generator=gen) / 64.0).float()
    t = torch.randint(0, v, (n,), generator=gen)
    t[2] = -100
    up = torch.rand(n, generator=gen, dtype=torch.float64)
    params64 = [p.double().requires_grad_() for p in (x, w, b)]
    for reduction, opts in (("none", {}), ("sum", dict(label_smoothing=0.1))):
        ref = torch_linear_cross_entropy(*params64, t, reduction=reduction, **opts)
        grads_ref = torch.autograd.grad(ref, params64, up if reduction == "none" else None)
        params = [p.clone().requires_grad_() for p in (x, w, b)]
        loss = xent.linear_cross_entropy(
            params[0],
            params[1],
            t,
            linear_bias=params[2],
            reduction=reduction,
            impl=impl,
            chunk_size=3,
            **opts,
        )
        grads = torch.autograd.grad(loss, params, up.float() if reduction == "none" else None)
        _check(loss, ref.detach(), torch.float32, 1 if reduction == "none" else n)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            _check(g, g_ref, torch.float32, n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_vocabulary_slice_gradient_shift_invariant(impl, offset):
    # One rank's slice [first, first + width) of the classes, its gradient formed from the global
    # (m, log s) by either backend's kernel (the vocabulary-parallel path; the collectives
    # themselves are tested on gloo processes in tests/test_distributed.py).
    from dataclasses import replace

    from xent._engine.options import CEParams
    from xent._engine.torch_rows import cross_entropy_pass

    x = _logits(torch.float32, offset)
    t = _index_target(*x.shape)
    rows, classes = x.shape
    first, width = 11, 19
    t[0] = first + 3
    w = (torch.rand(classes, generator=torch.Generator().manual_seed(2)) + 0.5).float()
    coef = torch.rand(rows, generator=torch.Generator().manual_seed(3))
    coef[3] = 0.0  # the ignored row
    base = CEParams(-100, "sum", 0.1, 0.0, None)
    _, *stats = cross_entropy_pass(x, t, w, coef, base)
    sliced = replace(base, class_start=first, num_classes=classes, impl=impl)
    part = x[:, first : first + width].contiguous()
    g = torch.empty_like(part)
    kernel = triton_ce.cross_entropy_pass_triton if impl == "triton" else cross_entropy_pass
    kernel(part, t, w, coef, sliced, stats_in=tuple(stats), grad_out=g)
    x64 = x.double().requires_grad_()
    ref = relative_cross_entropy(x64, t, weight=w.double(), label_smoothing=0.1)
    (g_ref,) = torch.autograd.grad(ref, x64, coef.double())
    _check(g, g_ref[:, first : first + width], torch.float32)


def _divergence_oracle(ls, lt, beta):
    """Per-row divergence of float64 log-probabilities (distill_divergence's definition)."""
    p, q = ls.exp(), lt.exp()
    if beta == 0.0:
        return (q * (lt - ls)).sum(1)
    if beta == 1.0:
        return (p * (ls - lt)).sum(1)
    lm = torch.logaddexp(ls + math.log(1.0 - beta), lt + math.log(beta))
    return beta * (q * (lt - lm)).sum(1) + (1.0 - beta) * (p * (ls - lm)).sum(1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distill_divergence_shift_invariant(impl, offset, beta):
    # Both distributions' log-probabilities (u - m) - log s, relative to their own max.
    from xent.posttrain import distill_divergence

    xs = _logits(torch.float32, offset, seed=10).requires_grad_()
    xt = _logits(torch.float32, offset, seed=11)
    loss = distill_divergence(xs, xt, beta=beta, reduction="sum", impl=impl)
    (g,) = torch.autograd.grad(loss, xs)
    s64 = xs.detach().double().requires_grad_()
    t64 = xt.double()
    ls = torch.log_softmax(s64 - s64.detach().amax(1, keepdim=True), 1)
    lt = torch.log_softmax(t64 - t64.amax(1, keepdim=True), 1)
    ref = _divergence_oracle(ls, lt, beta).sum()
    (g_ref,) = torch.autograd.grad(ref, s64)
    _check(loss, ref.detach(), torch.float32, xs.shape[0])
    _check(g, g_ref, torch.float32)


# --------------------------------------------------------------------------------------------
# Log-probabilities, entropy and the policy loss: (u - m) - log s from the kept (m, log s)
# --------------------------------------------------------------------------------------------


def _log_prob_grads(x, t, impl, up_lp, up_ent, **opts):
    """``(log p, H, ∂(Σ c log p + e H)/∂x)`` of :func:`xent.log_probs`."""
    xi = x.clone().requires_grad_()
    out = xent.log_probs(xi, t, return_entropy=True, impl=impl, **opts)
    loss = (out.log_probs * up_lp).sum() + (out.entropy * up_ent).sum()
    (g,) = torch.autograd.grad(loss, xi)
    return out.log_probs.detach(), out.entropy.detach(), g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy_shift_invariant(impl, dtype, offset, temperature):
    # Without a cap the shift is taken on the raw logits, (x - max x)/T: a temperature adds no
    # rounding of the logits' size either.
    x = _logits(dtype, offset)
    t = _index_target(*x.shape)
    gen = torch.Generator().manual_seed(8)
    up_lp, up_ent = (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) for _ in "ab")
    lp, ent, g = _log_prob_grads(x, t, impl, up_lp.to(dtype), up_ent.to(dtype),
                                 temperature=temperature)  # fmt: skip
    x64 = x.double().requires_grad_()
    lp_ref, ent_ref = relative_log_probs(x64, t, 1.0 / temperature)
    (g_ref,) = torch.autograd.grad((lp_ref * up_lp).sum() + (ent_ref * up_ent).sum(), x64)
    scale = 1.0 / temperature
    _check(lp, lp_ref.detach(), dtype, 10.0)  # -log p reaches ~10 on these rows
    _check(ent, ent_ref.detach(), dtype, scale)
    _check(g, g_ref, dtype, 10.0 * scale)  # the entropy's gradient carries log p
    if impl == "torch" and dtype == torch.float32:
        # torch.func.grad runs the same kernels through the transforms' spec.
        def f(z):
            out = xent.log_probs(z, t, return_entropy=True, temperature=temperature)
            return (out.log_probs * up_lp.float()).sum() + (out.entropy * up_ent.float()).sum()

        _check(torch.func.grad(f)(x), g_ref, dtype, 10.0 * scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_at_the_largest_logits(impl, temperature):
    # [fmax, fmax, 0], target 0: log p = -log 2, H = log 2, ∂log p/∂x = [1/2, -1/2, 0]/T and
    # ∂H/∂x = -p (log p + H)/T = 0; fmax/T itself would overflow.
    x = torch.tensor([[FMAX, FMAX, 0.0]])
    t = torch.tensor([0])
    one, zero = torch.ones(1), torch.zeros(1)
    lp, ent, g_lp = _log_prob_grads(x, t, impl, one, zero, temperature=temperature)
    _, _, g_ent = _log_prob_grads(x, t, impl, zero, one, temperature=temperature)
    assert abs(lp.item() + math.log(2.0)) < 1e-7 and abs(ent.item() - math.log(2.0)) < 1e-7
    half = 0.5 / temperature
    torch.testing.assert_close(g_lp, torch.tensor([[half, -half, 0.0]]), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_ent, torch.zeros(1, 3), atol=1e-7, rtol=0)


def _grid_head(offset, n=7, h=5, v=29, seed=4):
    """Hidden states and weights in [-1, 1] on a grid of ``k`` and a bias of offset + a multiple
    of ``k²`` (``k`` = 1/8 up to 10⁴, 1/2 at 10⁶, where fp32's spacing is 1/16): every logit
    x·w + b is exact in fp32, so the kernels see exactly the oracle's logits."""
    k = 0.125 if offset < 1e5 else 0.5
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(-8, 9, (n, h), generator=gen) / 8.0 / k).round() * k
    w = (torch.randint(-8, 9, (v, h), generator=gen) / 8.0 / k).round() * k
    b = offset + torch.randint(-64, 65, (v,), generator=gen) / 64.0 / k**2 // 1 * k**2
    t = torch.randint(0, v, (n,), generator=gen)
    t[2] = -100
    return x, w, b, t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_linear_log_probs_with_a_large_bias(impl, offset):
    x, w, b, t = _grid_head(offset)
    gen = torch.Generator().manual_seed(9)
    up_lp, up_ent = (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) for _ in "ab")
    params = [p.clone().requires_grad_() for p in (x, w, b)]
    out = xent.linear_log_probs(params[0], params[1], t, bias=params[2], return_entropy=True,
                                impl=impl, chunk_size=3)  # fmt: skip
    loss = (out.log_probs * up_lp.float()).sum() + (out.entropy * up_ent.float()).sum()
    grads = torch.autograd.grad(loss, params)
    params64 = [p.double().requires_grad_() for p in (x, w, b)]
    z64 = params64[0] @ params64[1].t() + params64[2]
    lp_ref, ent_ref = relative_log_probs(z64, t)
    grads_ref = torch.autograd.grad((lp_ref * up_lp).sum() + (ent_ref * up_ent).sum(), params64)
    _check(out.log_probs.detach(), lp_ref.detach(), torch.float32, 10.0)
    _check(out.entropy.detach(), ent_ref.detach(), torch.float32)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _check(g, g_ref, torch.float32, 2.0)  # measured ≤ 4e-7 (lse-based: 3e-4 at 10⁴)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_policy_loss_with_a_large_bias(impl, offset, reduction):
    # Off-policy with an entropy bonus: the loss's gradient runs through both log p and H.
    x, w, b, t = _grid_head(offset)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(10)
    adv = torch.randn(n, generator=gen)
    params64 = [p.double().requires_grad_() for p in (x, w, b)]
    with torch.no_grad():
        lp64, _ = relative_log_probs(params64[0] @ params64[1].t() + params64[2], t)
    old = (lp64 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    up = torch.rand(n, generator=gen, dtype=torch.float64) if reduction == "none" else None
    opts = dict(old_log_probs=old, entropy_coef=0.05, reduction=reduction)
    params = [p.clone().requires_grad_() for p in (x, w, b)]
    loss = xent.linear_policy_loss(params[0], params[1], t, adv, bias=params[2], impl=impl,
                                   chunk_size=3, **opts)  # fmt: skip
    grads = torch.autograd.grad(loss, params, None if up is None else up.float())
    ref = linear_policy_loss_reference(*params64[:2], t, adv.double(), bias=params64[2],
                                       **{**opts, "old_log_probs": old.double()})  # fmt: skip
    grads_ref = torch.autograd.grad(ref, params64, up)
    _check(loss.detach(), ref.detach(), torch.float32, 2.0)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _check(g, g_ref, torch.float32, 2.0)  # measured ≤ 2e-7 (lse-based: 5e-5 at 10⁴)
