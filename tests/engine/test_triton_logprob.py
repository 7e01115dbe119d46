"""The Triton row kernels of xent.posttrain (impl="triton") against the torch ones and float64
oracles: through the interpreter on CPU at small odd shapes (several blocks per row)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xent

pytest.importorskip("triton")
from xent._engine import triton_logprob as triton_lp  # after the skip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates both sides of `tl.where` in NumPy, which warns about the 0·(-inf) and
# log 0 it then discards.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several blocks per row even at small vocabularies, so the online statistics are exercised.
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_lp, "MAX_BLOCK", 16)


def _logits(n=9, v=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, v, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
    t = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    t[::4] = -100
    return z.requires_grad_(), t


OPTIONS = [
    {},
    {"temperature": 0.6, "softcap": 4.0, "logit_scale": 1.3},
    {"temperature": "rows", "softcap": 2.0},
]


def _opts(opts, n):
    if opts.get("temperature") == "rows":
        return {**opts, "temperature": torch.linspace(0.3, 3.0, n, dtype=torch.float64)}
    return opts


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_log_probs_triton_matches_torch(opts, dtype, tol):
    z, t = _logits(dtype=dtype)
    kw = {**_opts(opts, 9), "return_entropy": True, "return_top1": True}
    ours = xent.log_probs(z, t, impl="triton", **kw)
    ref = xent.log_probs(z, t, impl="torch", **kw)
    for a, b in zip(ours[:2], ref[:2], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert torch.equal(ours.top1, ref.top1)
    gen = torch.Generator().manual_seed(1)
    c, e = (torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    for use_entropy in (False, True):
        g = torch.autograd.grad((ours.log_probs * c + use_entropy * ours.entropy * e).sum(), z)
        g_ref = torch.autograd.grad((ref.log_probs * c + use_entropy * ref.entropy * e).sum(), z)
        torch.testing.assert_close(g[0], g_ref[0], atol=tol, rtol=tol)
        ours = xent.log_probs(z, t, impl="triton", **kw)
        ref = xent.log_probs(z, t, impl="torch", **kw)


def test_log_probs_triton_edge_cases():
    z = torch.tensor(
        [[1.0, -math.inf, 0.5, -math.inf] * 5, [3.0, 3.0, 1.0, 0.0] * 5, [0.0] * 20],
        dtype=torch.float64,
        device=DEVICE,
        requires_grad=True,
    )
    t = torch.tensor([1, 4, -100], device=DEVICE)  # target at -inf; a tie in another block
    out = xent.log_probs(z, t, impl="triton", return_entropy=True, return_top1=True)
    ref = xent.log_probs(z, t, impl="torch", return_entropy=True, return_top1=True)
    assert out.log_probs[0] == -math.inf
    torch.testing.assert_close(out.log_probs[1:], ref.log_probs[1:], atol=1e-14, rtol=0)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-14, rtol=0)
    assert out.top1.tolist() == [False, False, False]  # index 0 (first block) is the arg-max
    g = torch.autograd.grad(out.entropy.sum() + out.log_probs[1:].sum(), z)[0]
    assert torch.isfinite(g).all() and (g[0, 1::2] == 0).all() and (g[2] == 0).all()
    top = xent.log_probs(z[1:2], torch.tensor([0], device=DEVICE), impl="triton", return_top1=True)
    assert top.top1.tolist() == [True]


@pytest.mark.parametrize("beta", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_divergence_triton_matches_torch(beta, reduction, opts):
    zs, t = _logits(seed=2)
    zt = _logits(seed=3)[0].detach()
    kw = {**_opts(opts, 9), "beta": beta, "reduction": reduction, "teacher_softcap": 5.0}
    ours = xent.distill_divergence(zs, zt, t, impl="triton", **kw)
    ref = xent.distill_divergence(zs, zt, t, impl="torch", **kw)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    g = torch.autograd.grad((ours * up).sum(), zs)[0]
    g_ref = torch.autograd.grad((ref * up).sum(), zs)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def test_divergence_triton_minus_inf():
    zs = torch.tensor([[0.0, -math.inf, 1.0] * 7], dtype=torch.float64, device=DEVICE)
    zt = torch.tensor([[0.5, -math.inf, 0.0] * 7], dtype=torch.float64, device=DEVICE)
    zs.requires_grad_()
    for beta in (0.0, 0.5, 1.0):
        ours = xent.distill_divergence(zs, zt, beta=beta, reduction="none", impl="triton")
        ref = xent.distill_divergence(zs, zt, beta=beta, reduction="none", impl="torch")
        torch.testing.assert_close(ours, ref, atol=1e-14, rtol=1e-14)
        g = torch.autograd.grad(ours.sum(), zs)[0]
        assert torch.isfinite(g).all() and (g[0, 1::3] == 0).all()


def test_half_precision_triton():
    z, t = _logits(n=7, v=41, dtype=torch.bfloat16)
    out = xent.log_probs(z, t, impl="triton", return_entropy=True, temperature=0.7)
    assert out.log_probs.dtype == torch.float32
    z64 = z.detach().double().requires_grad_()
    lp = F.log_softmax(z64 / 0.7, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    lp = torch.where(t != -100, lp, 0.0)
    torch.testing.assert_close(out.log_probs.double(), lp, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(out.log_probs.sum(), z)[0]
    assert g.dtype == torch.bfloat16
    g_ref = torch.autograd.grad(lp.sum(), z64)[0]
    torch.testing.assert_close(g.double(), g_ref, atol=1e-2, rtol=1e-2)


def test_linear_versions_triton():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(23, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.randint(0, 23, (11,), generator=gen).to(DEVICE)
    t[::3] = -100
    a = xent.linear_log_probs(x, w, t, return_entropy=True, chunk_size=4, impl="triton")
    b = xent.linear_log_probs(x, w, t, return_entropy=True, chunk_size=4, impl="torch")
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad(a.log_probs.sum() + a.entropy.sum(), (x, w))
    gb = torch.autograd.grad(b.log_probs.sum() + b.entropy.sum(), (x, w))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)
    zt = torch.randn(11, 23, generator=gen, dtype=torch.float64).to(DEVICE)
    la = xent.linear_distill_divergence(x, w, t, teacher_logits=zt, beta=0.5, impl="triton")
    lb = xent.linear_distill_divergence(x, w, t, teacher_logits=zt, beta=0.5, impl="torch")
    torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad(la, (x, w))
    gb = torch.autograd.grad(lb, (x, w))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)


def test_triton_path_really_runs(monkeypatch):
    """Count the launches: impl="triton" goes through these kernels, and only through them."""
    calls = []
    for name in ("_logprob_fwd_kernel", "_logprob_bwd_kernel", "_divergence_kernel"):
        kernel = getattr(triton_lp, name)

        class Counting:
            def __init__(self, k, name=name):
                self.k, self.name = k, name

            def __getitem__(self, grid):
                calls.append(self.name)
                return self.k[grid]

        monkeypatch.setattr(triton_lp, name, Counting(kernel))
    z, t = _logits()
    xent.log_probs(z, t, impl="triton", return_entropy=True).entropy.sum().backward()
    xent.distill_divergence(z, z.detach() * 2, t, beta=0.5, impl="triton").backward()
    assert calls == ["_logprob_fwd_kernel", "_logprob_bwd_kernel", "_divergence_kernel"]
    calls.clear()
    xent.log_probs(z, t, impl="torch").sum().backward()
    assert calls == []


POLICY_OPTIONS = [
    {"entropy_coef": 0.05},
    {"old": True, "clip_high": 0.3, "softcap": 3.0, "logit_scale": 1.2, "temperature": 0.7},
    {"old": True, "temperature": "rows", "entropy_coef": 0.1, "reduction": "none"},
]


@pytest.mark.parametrize("opts", POLICY_OPTIONS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_linear_policy_loss_triton_matches_torch(opts, dtype, tol):
    gen = torch.Generator().manual_seed(2)
    n, h, v = 11, 5, 37
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(v, h, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    t[::4] = -100
    adv = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE)
    kw = dict(opts)
    if kw.get("temperature") == "rows":
        kw["temperature"] = torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    if kw.pop("old", False):
        transform = {k: kw[k] for k in ("softcap", "logit_scale", "temperature") if k in kw}
        with torch.no_grad():
            lp = xent.linear_log_probs(x, w, t, **transform)
        kw["old_log_probs"] = lp + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64).to(lp)
    outs = [
        xent.linear_policy_loss(x, w, t, adv, chunk_size=4, return_stats=True, impl=impl, **kw)
        for impl in ("triton", "torch")
    ]
    for a, b in zip(outs[0][:3], outs[1][:3], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert torch.equal(outs[0].clipped, outs[1].clipped)
    if "old_log_probs" in kw:
        assert outs[1].clipped.any()  # the clipped branch is exercised
    grads = [torch.autograd.grad(o.loss.sum(), (x, w)) for o in outs]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_policy_rows_triton_writes_over_its_logits():
    """The row kernel with ``grad_out is x`` (the walker's buffer), and without a gradient."""
    from xent._engine import logprob_rows
    from xent._engine.options import LogProbParams, PolicyParams, Transform

    z, t = _logits(n=7, v=23)
    z = z.detach()
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(7, generator=gen, dtype=torch.float64).to(DEVICE)
    old = -3.0 + torch.randn(7, generator=gen, dtype=torch.float64).to(DEVICE)
    coef = (t != -100).double() / 5
    params = PolicyParams(LogProbParams(Transform(1.1, 4.0), entropy=True), 0.2, 0.25, 0.1, True)
    ref_grad = torch.empty_like(z)
    ref = logprob_rows.policy_rows(z, t, 0.9, params, adv, old, coef, ref_grad)
    buf = z.clone()
    ours = triton_lp.policy_rows(buf, t, 0.9, params, adv, old, coef, buf)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(buf, ref_grad, atol=1e-12, rtol=1e-12)
    plain = triton_lp.policy_rows(z, t, 0.9, params, adv, old, None, None)
    for a, b in zip(plain, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
