"""xent.posttrain: per-token log-probabilities, entropy and distillation divergences against
float64 oracles built from torch's own log_softmax / kl_div, the in-package references and
gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from xent import posttrain
from xent._engine import logprob_rows as _logprob_rows
from xent._engine.options import DivergenceParams, LogProbParams, Transform

# --------------------------------------------------------------------------------------------
# Oracles: the logits in memory, torch's own softmax functions, float64
# --------------------------------------------------------------------------------------------


def _tempered(z, temperature=1.0, logit_scale=1.0, softcap=None):
    u = z.double() * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    if isinstance(temperature, torch.Tensor):
        return u / temperature.double().broadcast_to(u.shape[:-1])[..., None]
    return u / temperature


def _oracle_log_probs(z, target, ignore_index=-100, **transform):
    """(log p(y), entropy, top1) with F.log_softmax in float64, zeroed on ignored tokens."""
    u = _tempered(z, **transform)
    log_p = F.log_softmax(u, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    lp = log_p.gather(-1, safe[..., None])[..., 0]
    ent = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    top = u.argmax(-1) == safe
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero), valid & top


def _oracle_divergence(zs, zt, mask=None, beta=0.0, temperature=1.0, **kw):
    """TRL's generalised JSD convention per token, with F.kl_div (log_target) in float64."""
    s_kw = {k: v for k, v in kw.items() if not k.startswith("teacher_")}
    t_kw = {k[len("teacher_") :]: v for k, v in kw.items() if k.startswith("teacher_")}
    ls = F.log_softmax(_tempered(zs, temperature, **s_kw), dim=-1)
    lt = F.log_softmax(_tempered(zt.detach(), temperature, **t_kw), dim=-1)
    if beta == 0.0:  # KL(teacher ‖ student)
        per = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:  # KL(student ‖ teacher)
        per = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
        kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
        kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
        per = beta * kl_t + (1 - beta) * kl_s
    if mask is not None:
        per = torch.where(mask, per, torch.zeros((), dtype=per.dtype))
    return per


def _reduce(per, mask, reduction, token_weight=None, normalizer=None, batch=None):
    tw = torch.ones_like(per) if token_weight is None else token_weight.double()
    if mask is not None:
        tw = torch.where(mask, tw, 0.0)
    per = per * tw
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "batchmean":
        return per.sum() / batch
    return per.sum() / (tw.sum() if normalizer is None else normalizer)


def _problem(shape=(3, 5), v=23, dtype=torch.float64, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(*shape, v, generator=gen, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, v, shape, generator=gen)
    if ignore:
        t.view(-1)[::4] = -100
    return z.requires_grad_(), t


def _upstream(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(
        shape, generator=gen, dtype=torch.float64
    )


TRANSFORMS = [
    {},
    {"temperature": 0.7},
    {"logit_scale": 1.7, "softcap": 3.0},
    {"temperature": 1.3, "logit_scale": 0.6, "softcap": 2.5},
]


# --------------------------------------------------------------------------------------------
# log_probs on logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_log_probs_values_and_gradients(transform):
    z, t = _problem()
    out = xent.log_probs(z, t, return_entropy=True, return_top1=True, **transform)
    lp, ent, top = _oracle_log_probs(z, t, **transform)
    assert isinstance(out, xent.LogProbs) and out.log_probs.shape == t.shape
    torch.testing.assert_close(out.log_probs, lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, ent, atol=1e-12, rtol=1e-12)
    assert out.top1.dtype == torch.bool and torch.equal(out.top1, top)
    g_lp, g_ent = _upstream(t.shape)
    ours = torch.autograd.grad((out.log_probs * g_lp + out.entropy * g_ent).sum(), z)[0]
    theirs = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), z)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_log_probs_plain_tensor_and_reference():
    z, t = _problem(shape=(9,), v=41)
    lp = xent.log_probs(z, t, temperature=0.9)
    assert isinstance(lp, torch.Tensor) and lp.dtype == torch.float64
    ref = xent.posttrain.log_probs_reference(z, t, temperature=0.9)
    torch.testing.assert_close(lp, ref, atol=1e-13, rtol=1e-13)
    via_ref = xent.log_probs(z, t, temperature=0.9, impl="reference")
    torch.testing.assert_close(via_ref, ref)
    only_top = xent.log_probs(z, t, return_top1=True)
    assert only_top.entropy is None and only_top.top1 is not None


def test_per_row_temperature_equals_separate_calls():
    z, t = _problem(shape=(3, 5))
    temps = torch.tensor([[0.5], [1.0], [3.0]], dtype=torch.float64)  # one per sequence
    out = xent.log_probs(z, t, temperature=temps, return_entropy=True, softcap=4.0)
    for i in range(3):
        row = xent.log_probs(
            z[i], t[i], temperature=float(temps[i]), return_entropy=True, softcap=4.0
        )
        torch.testing.assert_close(out.log_probs[i], row.log_probs, atol=1e-14, rtol=0)
        torch.testing.assert_close(out.entropy[i], row.entropy, atol=1e-14, rtol=0)
    lp, ent, _ = _oracle_log_probs(z, t, temperature=temps, softcap=4.0)
    torch.testing.assert_close(out.entropy, ent, atol=1e-12, rtol=1e-12)
    g = torch.autograd.grad(out.entropy.sum() + out.log_probs.sum(), z)[0]
    torch.testing.assert_close(
        g, torch.autograd.grad(ent.sum() + lp.sum(), z)[0], atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_row_kernels_block_size_never_changes_the_answer(block_rows):
    z, t = _problem(shape=(17,), v=13)
    x = z.detach()
    inv_t = 1 / torch.linspace(0.5, 2.0, 17, dtype=torch.float64)
    base = LogProbParams(Transform(1.2, 3.0), entropy=True, top1=True)
    blocked = LogProbParams(Transform(1.2, 3.0), entropy=True, top1=True, block_rows=block_rows)
    ref = _logprob_rows.log_prob_rows(x, t, inv_t, base)
    ours = _logprob_rows.log_prob_rows(x, t, inv_t, blocked)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    c, e = _upstream(17)
    valid = t != -100
    c, e = torch.where(valid, c, 0.0), torch.where(valid, e, 0.0)
    g_ref, g = torch.empty_like(x), torch.empty_like(x)
    _logprob_rows.log_prob_grad_rows(x, t, inv_t, base, *ref[3:], ref[1], c, e, g_ref)
    _logprob_rows.log_prob_grad_rows(x, t, inv_t, blocked, *ref[3:], ref[1], c, e, g)
    torch.testing.assert_close(g, g_ref, atol=1e-14, rtol=0)
    dp = DivergenceParams(Transform(), Transform(1.0, 2.0), 0.3, block_rows=block_rows)
    xt = torch.randn_like(x)
    whole = DivergenceParams(dp.student, dp.teacher, 0.3)
    torch.testing.assert_close(
        _logprob_rows.divergence_rows(x, xt, inv_t, dp, valid, c, g),
        _logprob_rows.divergence_rows(x, xt, inv_t, whole, valid, c, g_ref),
        atol=1e-14,
        rtol=0,
    )
    torch.testing.assert_close(g, g_ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 2e-6), (torch.float16, 2e-6)]
)
def test_half_precision_is_computed_in_fp32(dtype, tol):
    """Half logits: fp32 results within fp32's error of the float64 answer on the same (rounded)
    inputs — far inside torch's own half-precision error floor — and a gradient rounded once."""
    z, t = _problem(shape=(31,), v=257, dtype=dtype)
    out = xent.log_probs(z, t, return_entropy=True, temperature=0.8, softcap=5.0)
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    z64 = z.detach().double().requires_grad_()
    lp, ent, _ = _oracle_log_probs(z64, t, temperature=0.8, softcap=5.0)
    torch.testing.assert_close(out.log_probs.double(), lp, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(out.entropy.double(), ent, atol=tol * 10, rtol=tol)
    if dtype != torch.float32:
        torch_lp = F.log_softmax(_tempered(z.detach(), 0.8, softcap=5.0).to(dtype), -1)
        torch_err = (torch_lp.double().gather(-1, t.clamp(min=0)[:, None])[:, 0] - lp).abs()
        ours_err = (out.log_probs.double() - lp).abs()
        assert ours_err.max() < torch_err.max()
    g = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), z)[0]
    g_ref = torch.autograd.grad(lp.sum() + ent.sum(), z64)[0]
    assert g.dtype == dtype
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    bound = (0.5 * eps + 1e-5) * g_ref.abs() + 1e-6 * g_ref.abs().max() + tiny
    assert ((g.double() - g_ref).abs() <= bound).all()


@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 1e2, 1e5])
def test_extreme_temperatures(temperature):
    z, t = _problem(shape=(13,), v=29)
    out = xent.log_probs(z, t, temperature=temperature, return_entropy=True)
    lp, ent, _ = _oracle_log_probs(z, t, temperature=temperature)
    torch.testing.assert_close(out.log_probs, lp, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.entropy, ent, atol=1e-9, rtol=1e-9)
    assert (out.log_probs <= 0).all() and (out.entropy >= 0).all()
    valid = t != -100
    if temperature >= 1e2:  # nearly uniform
        assert (out.entropy[valid] - math.log(29)).abs().max() < 1e-2
    g = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), z)[0]
    g_ref = torch.autograd.grad(lp.sum() + ent.sum(), z)[0]
    assert torch.isfinite(g).all()
    # ∂u/∂z = 1/T scales every entry (and its rounding): the tolerance follows the gradient's size.
    torch.testing.assert_close(g, g_ref, atol=1e-11 * float(g_ref.abs().max()), rtol=1e-8)


def test_minus_inf_logits():
    """A -inf logit: probability exactly 0, 0·log 0 = 0 in the entropy (no NaN), no gradient
    there; on the target, log p = -inf."""
    z = torch.tensor(
        [[1.0, -math.inf, 0.5, -math.inf], [2.0, 0.0, -math.inf, 1.0], [0.0, -math.inf, 1.0, 3.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    t = torch.tensor([0, 3, 1])
    out = xent.log_probs(z, t, return_entropy=True, temperature=0.5)
    lp, ent, _ = _oracle_log_probs(z, t, temperature=0.5)
    assert out.log_probs[2] == -math.inf
    torch.testing.assert_close(out.log_probs[:2], lp[:2], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(out.entropy, ent, atol=1e-14, rtol=1e-14)
    assert torch.isfinite(out.entropy).all()
    g = torch.autograd.grad(out.log_probs[:2].sum() + out.entropy.sum(), z)[0]
    assert torch.isfinite(g).all()
    assert (g[torch.isinf(z)] == 0).all()
    g_ref = torch.autograd.grad(lp[:2].sum() + ent.sum(), z)[0]
    torch.testing.assert_close(g, g_ref.nan_to_num(0.0), atol=1e-14, rtol=1e-14)


def test_all_ignored_gives_zeros_and_no_gradient():
    z, _ = _problem(shape=(6,), v=7)
    t = torch.full((6,), -100)
    out = xent.log_probs(z, t, return_entropy=True, return_top1=True)
    assert (out.log_probs == 0).all() and (out.entropy == 0).all() and not out.top1.any()
    g = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), z)[0]
    assert (g == 0).all()


def test_ignored_rows_with_nonfinite_logits_get_exactly_zero():
    z, t = _problem(shape=(5,), v=7)
    z = z.detach().clone()
    z[0] = torch.nan
    z[0, 2] = torch.inf
    t[0] = -100
    z.requires_grad_()
    out = xent.log_probs(z, t, return_entropy=True)
    assert out.log_probs[0] == 0 and out.entropy[0] == 0
    g = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), z)[0]
    assert (g[0] == 0).all() and torch.isfinite(g).all()


def test_identities():
    # The log-probabilities of every class sum (as probabilities) to 1.
    z, _ = _problem(shape=(4,), v=11, ignore=False)
    every = torch.arange(11).repeat(4, 1)
    lp_all = xent.log_probs(z[:, None, :].expand(4, 11, 11), every, temperature=0.6, softcap=2.0)
    torch.testing.assert_close(lp_all.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    # A one-hot distribution has entropy 0 and log-probability 0 at its class.
    one_hot = torch.full((3, 6), -math.inf, dtype=torch.float64)
    one_hot[torch.arange(3), torch.tensor([1, 4, 0])] = 2.0
    out = xent.log_probs(one_hot, torch.tensor([1, 4, 0]), return_entropy=True, return_top1=True)
    assert (out.entropy == 0).all() and (out.log_probs == 0).all() and out.top1.all()
    # Shift invariance at large offsets; never above 0.
    z32 = torch.randn(8, 50)
    t32 = torch.randint(0, 50, (8,))
    a = xent.log_probs(z32, t32, return_entropy=True)
    b = xent.log_probs(z32 + 1e4, t32, return_entropy=True)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=2e-3, rtol=0)
    assert (b.log_probs <= 0).all() and (a.log_probs <= 0).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(1, 17),
    temp=st.floats(0.05, 20.0),
    cap=st.one_of(st.none(), st.floats(0.5, 30.0)),
    seed=st.integers(0, 2**16),
)
def test_log_probs_property(n, v, temp, cap, seed):
    """Against the oracle at random shapes; an ignored token equals dropping it."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, v, generator=gen, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=gen)
    out = xent.log_probs(z, t, temperature=temp, softcap=cap, return_entropy=True)
    lp, ent, _ = _oracle_log_probs(z, t, temperature=temp, softcap=cap)
    torch.testing.assert_close(out.log_probs, lp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.entropy, ent, atol=1e-10, rtol=1e-10)
    assert (out.log_probs <= 0).all()
    t2 = t.clone()
    t2[0] = -100
    dropped = xent.log_probs(z[1:], t[1:], temperature=temp, softcap=cap, return_entropy=True)
    kept = xent.log_probs(z, t2, temperature=temp, softcap=cap, return_entropy=True)
    torch.testing.assert_close(kept.log_probs[1:], dropped.log_probs, atol=1e-15, rtol=1e-15)
    torch.testing.assert_close(kept.entropy[1:], dropped.entropy, atol=1e-15, rtol=1e-15)
    assert kept.log_probs[0] == 0 and kept.entropy[0] == 0


def test_gradcheck_log_probs():
    z, t = _problem(shape=(5,), v=7)
    temps = torch.tensor([0.5, 1.0, 2.0, 0.8, 1.5], dtype=torch.float64)

    def f(x):
        out = xent.log_probs(
            x, t, temperature=temps, logit_scale=1.3, softcap=2.0, return_entropy=True
        )
        return out.log_probs, out.entropy

    assert torch.autograd.gradcheck(f, (z,))


def test_entropy_only_logged_costs_no_entropy_work(monkeypatch):
    """The backward kernel is asked for the entropy's part only when its gradient is not None."""
    seen = []
    real = _logprob_rows.log_prob_grad_rows

    def spy(*args):
        seen.append(args[8] is None)  # coef_ent
        return real(*args)

    monkeypatch.setattr(_logprob_rows, "log_prob_grad_rows", spy)
    z, t = _problem(shape=(6,), v=9)
    out = xent.log_probs(z, t, return_entropy=True)
    out.log_probs.sum().backward()
    assert seen == [True]
    out = xent.log_probs(z, t, return_entropy=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert seen == [True, False]
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    out = xent.linear_log_probs(h, w, t, return_entropy=True, chunk_size=4)
    out.log_probs.sum().backward()
    assert seen[2:] and all(seen[2:])


def test_no_gradient_when_nothing_is_used():
    z, t = _problem(shape=(4,), v=5)
    out = xent.log_probs(z, t, return_entropy=True)
    assert out.top1 is None
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.log_probs.sum(), z, create_graph=True)


# --------------------------------------------------------------------------------------------
# linear_log_probs
# --------------------------------------------------------------------------------------------


def _head(n=23, h=6, v=19, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.3).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[::5] = -100
    return x, w, b, t


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, None])
@pytest.mark.parametrize("transform", TRANSFORMS[1:])
def test_linear_log_probs_matches_the_oracle(chunk_size, transform):
    x, w, b, t = _head()
    out = xent.linear_log_probs(
        x, w, t, bias=b, return_entropy=True, return_top1=True, chunk_size=chunk_size, **transform
    )
    lp, ent, top = _oracle_log_probs(F.linear(x, w, b), t, **transform)
    torch.testing.assert_close(out.log_probs, lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, ent, atol=1e-12, rtol=1e-12)
    assert torch.equal(out.top1, top)
    g_lp, g_ent = _upstream(t.shape)
    ours = torch.autograd.grad((out.log_probs * g_lp + out.entropy * g_ent).sum(), (x, w, b))
    theirs = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (x, w, b))
    for a, r in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)


def test_linear_log_probs_shapes_tensor_temperature_and_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (2, 5), generator=gen)
    t[1, 3] = -100
    temps = torch.tensor([[0.7], [1.9]], dtype=torch.float64)
    out = xent.linear_log_probs(x, w, t, temperature=temps, return_entropy=True, chunk_size=3)
    ref = xent.linear_log_probs(x, w, t, temperature=temps, return_entropy=True, impl="reference")
    assert out.log_probs.shape == (2, 5)
    torch.testing.assert_close(out.log_probs, ref.log_probs, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad(out.log_probs.sum() - 0.1 * out.entropy.sum(), (x, w))
    gb = torch.autograd.grad(ref.log_probs.sum() - 0.1 * ref.entropy.sum(), (x, w))
    for a, r in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


def test_linear_log_probs_never_forms_more_than_a_chunk(monkeypatch):
    rows_seen = []
    real = _logprob_rows.log_prob_rows

    def spy(z, *args):
        rows_seen.append(z.shape[0])
        return real(z, *args)

    monkeypatch.setattr(_logprob_rows, "log_prob_rows", spy)
    x, w, b, t = _head(n=40)
    xent.linear_log_probs(x, w, t, bias=b, chunk_size=7)
    assert rows_seen and max(rows_seen) <= 7
    assert sum(rows_seen) == int((t != -100).sum())  # ignored tokens never enter a product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_log_probs_half_precision(dtype):
    x, w, b, t = _head(n=17, h=8, v=33, dtype=dtype)
    out = xent.linear_log_probs(x, w, t, bias=b, return_entropy=True, chunk_size=5)
    assert out.log_probs.dtype == torch.float32
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    lp, ent, _ = _oracle_log_probs(F.linear(x64, w64, b64), t)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 products round the logits
    torch.testing.assert_close(out.log_probs.double(), lp, atol=tol, rtol=tol)
    torch.testing.assert_close(out.entropy.double(), ent, atol=tol, rtol=tol)
    g = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (x, w, b))
    g_ref = torch.autograd.grad(lp.sum() + ent.sum(), (x64, w64, b64))
    for a, r in zip(g, g_ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), r, atol=tol * 3, rtol=tol * 3)


def test_linear_log_probs_all_ignored_and_gradcheck():
    x, w, b, t = _head(n=5, h=3, v=4)
    none = torch.full_like(t, -100)
    out = xent.linear_log_probs(x, w, none, bias=b, return_entropy=True)
    assert (out.log_probs == 0).all() and (out.entropy == 0).all()
    grads = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (x, w, b))
    assert all((g == 0).all() for g in grads)

    def f(x, w, b):
        o = xent.linear_log_probs(
            x, w, t, bias=b, temperature=0.8, softcap=2.0, return_entropy=True, chunk_size=2
        )
        return o.log_probs, o.entropy

    assert torch.autograd.gradcheck(f, (x, w, b))


# --------------------------------------------------------------------------------------------
# Distillation divergences
# --------------------------------------------------------------------------------------------


def _pair(shape=(3, 5), v=17, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(*shape, v, generator=gen, dtype=torch.float64)).to(dtype)
    zt = (2 * torch.randn(*shape, v, generator=gen, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, v, shape, generator=gen)
    t.view(-1)[::3] = -100
    return zs.requires_grad_(), zt.requires_grad_(), t


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
def test_distill_divergence_matches_the_oracle(beta, reduction):
    zs, zt, t = _pair()
    kw = {"temperature": 1.7, "softcap": 4.0, "teacher_softcap": 3.0, "teacher_logit_scale": 1.2}
    tw = torch.rand(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = xent.distill_divergence(zs, zt, t, beta=beta, token_weight=tw, reduction=reduction, **kw)
    mask = t != -100
    per = _oracle_divergence(zs, zt, mask, beta, **kw)
    ref = _reduce(per, mask, reduction, tw, batch=3)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = _upstream(ref.shape)[0]
    g = torch.autograd.grad((ours * up).sum(), zs)[0]
    g_ref = torch.autograd.grad((ref * up).sum(), zs)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    # The gradient goes to the student only.
    assert not ours.grad_fn.next_functions[1:] or zt.grad is None
    via_ref = xent.distill_divergence(
        zs, zt, t, beta=beta, token_weight=tw, reduction=reduction, impl="reference", **kw
    )
    torch.testing.assert_close(via_ref, ref, atol=1e-12, rtol=1e-12)


def test_teacher_receives_no_gradient():
    zs, zt, t = _pair()
    xent.distill_divergence(zs, zt, t, beta=0.5).backward()
    assert zs.grad is not None and zt.grad is None
    zs.grad = None
    xent.distill_divergence(zs, zt, t, beta=0.5, impl="reference").backward()
    assert zt.grad is None


def test_divergence_identities():
    zs, zt, _t = _pair(shape=(11,), v=13)
    kw = {"temperature": 0.9, "reduction": "none"}
    fwd = xent.distill_divergence(zs, zt, **kw)
    kl = F.kl_div(
        F.log_softmax(zs.double() / 0.9, -1),
        F.log_softmax(zt.double() / 0.9, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    torch.testing.assert_close(fwd, kl, atol=1e-13, rtol=1e-13)
    # Reverse KL is forward KL with the roles swapped.
    rev = xent.distill_divergence(zs, zt, beta=1.0, **kw)
    torch.testing.assert_close(rev, xent.distill_divergence(zt, zs, **kw), atol=1e-13, rtol=0)
    # β = 1/2 is symmetric, and at most log 2; the mixture of a distribution with itself is 0.
    jsd = xent.distill_divergence(zs, zt, beta=0.5, **kw)
    torch.testing.assert_close(jsd, xent.distill_divergence(zt, zs, beta=0.5, **kw))
    assert (jsd <= math.log(2)).all() and (jsd >= 0).all()
    assert xent.distill_divergence(zs, zs, beta=0.3, **kw).abs().max() < 1e-14
    # The limits: JSD_β / β → KL(q ‖ p) as β → 0 and JSD_β / (1 - β) → KL(p ‖ q) as β → 1.
    small = xent.distill_divergence(zs, zt, beta=1e-8, **kw) / 1e-8
    torch.testing.assert_close(small, fwd, atol=1e-5, rtol=1e-5)
    large = xent.distill_divergence(zs, zt, beta=1 - 1e-8, **kw) / (1 - (1 - 1e-8))
    torch.testing.assert_close(large, rev, atol=1e-5, rtol=1e-5)


def test_divergence_minus_inf_and_mask():
    zs = torch.tensor([[0.0, -math.inf, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    zt = torch.tensor([[0.5, -math.inf, 0.0], [1.0, -math.inf, 0.0]], dtype=torch.float64)
    zs.requires_grad_()
    # torch's kl_div gives NaN where both log-probabilities are -inf; the oracle takes the
    # limit instead, with -1e300 for -inf (probability exactly 0, every product finite).
    big = {"neginf": -1e300}
    for beta in (0.0, 0.5, 1.0):
        per = xent.distill_divergence(zs, zt, beta=beta, reduction="none")
        ref = _oracle_divergence(zs.nan_to_num(**big), zt.nan_to_num(**big), beta=beta)
        if beta == 1.0:  # the student has mass where the teacher has none: KL(p ‖ q) = inf
            assert per[1] == math.inf and ref[1] > 1e299
            per, ref = per[:1], ref[:1]
        torch.testing.assert_close(per, ref, atol=1e-14, rtol=1e-14)
        g = torch.autograd.grad(per.sum(), zs)[0]
        assert torch.isfinite(g).all() and g[0, 1] == 0
    # The student at -inf where the teacher has mass: forward KL is +inf.
    inf = xent.distill_divergence(zt, zs, reduction="none")
    assert inf[1] == math.inf
    mask = torch.tensor([True, False])
    per = xent.distill_divergence(zt, zs, mask, reduction="none")
    assert per[1] == 0 and torch.isfinite(per).all()


def test_divergence_all_ignored_normalizer_and_batchmean():
    zs, zt, t = _pair(shape=(2, 4))
    none = torch.full_like(t, -100)
    loss = xent.distill_divergence(zs, zt, none)
    assert torch.isnan(loss)
    assert (torch.autograd.grad(loss, zs)[0] == 0).all()
    assert xent.distill_divergence(zs, zt, none, reduction="sum") == 0
    s = xent.distill_divergence(zs, zt, t, reduction="sum")
    torch.testing.assert_close(xent.distill_divergence(zs, zt, t, normalizer=7.0), s / 7)
    torch.testing.assert_close(
        xent.distill_divergence(zs, zt, t, normalizer=torch.tensor(7.0, dtype=torch.float64)),
        s / 7,
    )
    torch.testing.assert_close(xent.distill_divergence(zs, zt, t, reduction="batchmean"), s / 2)


def test_gradcheck_divergences():
    zs, zt, t = _pair(shape=(4,), v=5)
    for beta in (0.0, 0.4, 1.0):
        for reduction in ("none", "mean"):

            def f(x, beta=beta, reduction=reduction):
                return xent.distill_divergence(
                    x, zt, t, beta=beta, temperature=1.3, softcap=3.0, reduction=reduction
                )

            assert torch.autograd.gradcheck(f, (zs,))


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_distill_divergence(teacher_form, beta, chunk_size, reduction):
    x, w, b, t = _head(n=19, h=5, v=13)
    gen = torch.Generator().manual_seed(9)
    th = torch.randn(19, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    tw_ = torch.randn(13, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    tb = torch.randn(13, generator=gen, dtype=torch.float64)
    zt = F.linear(th, tw_, tb)
    teacher = (
        {"teacher_logits": zt}
        if teacher_form == "logits"
        else {"teacher_hidden": th, "teacher_weight": tw_, "teacher_bias": tb}
    )
    kw = {"temperature": 1.4, "softcap": 5.0, "teacher_softcap": 4.0}
    ours = xent.linear_distill_divergence(
        x, w, t, student_bias=b, beta=beta, reduction=reduction, chunk_size=chunk_size,
        **teacher, **kw,
    )  # fmt: skip
    mask = t != -100
    ref = _reduce(_oracle_divergence(F.linear(x, w, b), zt, mask, beta, **kw), mask, reduction)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = _upstream(ref.shape)[0]
    g = torch.autograd.grad((ours * up).sum(), (x, w, b))
    g_ref = torch.autograd.grad((ref * up).sum(), (x, w, b))
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)
    assert th.grad is None and tw_.grad is None


def test_linear_distill_reference_and_gradcheck():
    x, w, b, t = _head(n=6, h=3, v=5)
    zt = torch.randn(6, 5, dtype=torch.float64)
    a = xent.linear_distill_divergence(x, w, t, student_bias=b, teacher_logits=zt, beta=0.3)
    r = xent.linear_distill_divergence(
        x, w, t, student_bias=b, teacher_logits=zt, beta=0.3, impl="reference"
    )
    torch.testing.assert_close(a, r, atol=1e-13, rtol=1e-13)

    def f(x, w, b):
        return xent.linear_distill_divergence(
            x, w, t, student_bias=b, teacher_logits=zt, beta=0.3, reduction="none", chunk_size=2
        )

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_linear_distill_bf16_student_against_fp32_teacher():
    x, w, b, t = _head(n=9, h=8, v=21, dtype=torch.bfloat16)
    zt = torch.randn(9, 21)
    loss = xent.linear_distill_divergence(x, w, t, student_bias=b, teacher_logits=zt, beta=0.5)
    assert loss.dtype == torch.float32
    ref = _reduce(
        _oracle_divergence(F.linear(x.double(), w.double(), b.double()), zt, t != -100, 0.5),
        t != -100,
        "mean",
    )
    torch.testing.assert_close(loss.double(), ref, atol=3e-3, rtol=3e-3)  # bf16 products
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.dtype == gw.dtype == torch.bfloat16 and torch.isfinite(gw.float()).all()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_errors_name_the_offending_value():
    z, t = _problem(shape=(4,), v=5)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            xent.log_probs(z, t, temperature=bad)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, got -2\.0"):
        xent.log_probs(z, t, temperature=torch.tensor([1.0, -2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        xent.log_probs(z, t, temperature=torch.ones(3))
    with pytest.raises(ValueError, match=r"softcap.*got 0"):
        xent.log_probs(z, t, softcap=0)
    with pytest.raises(ValueError, match="logit_scale"):
        xent.log_probs(z, t, logit_scale=-1.0)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        xent.log_probs(z, torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        xent.log_probs(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'cuda'"):
        xent.log_probs(z, t, impl="cuda")
    with pytest.raises(TypeError, match="floating"):
        xent.log_probs(torch.ones(3, 4, dtype=torch.long), t[:3])
    zs, zt, _tt = _pair()
    with pytest.raises(ValueError, match="beta must be in"):
        xent.distill_divergence(zs, zt, beta=1.5)
    with pytest.raises(ValueError, match="'avg'"):
        xent.distill_divergence(zs, zt, reduction="avg")
    with pytest.raises(ValueError, match="normalizer"):
        xent.distill_divergence(zs, zt, reduction="sum", normalizer=3.0)
    with pytest.raises(ValueError, match="teacher_logits must have"):
        xent.distill_divergence(zs, zt[:, :2])
    x, w, _b, t = _head(n=4, h=3, v=5)
    with pytest.raises(ValueError, match="not both"):
        xent.linear_distill_divergence(
            x, w, teacher_logits=torch.zeros(4, 5), teacher_hidden=x, teacher_weight=w
        )
    with pytest.raises(ValueError, match="teacher"):
        xent.linear_distill_divergence(x, w)
    with pytest.raises(ValueError, match="chunk_size"):
        xent.linear_log_probs(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(V, H\)"):
        xent.linear_log_probs(x, w.t(), t)


def test_posttrain_module_exports():
    names = ("log_probs", "linear_log_probs", "distill_divergence", "LogProbs")
    for name in (*names, "linear_policy_loss", "PolicyLoss"):
        assert getattr(xent, name) is getattr(posttrain, name)


def test_top1_is_argmax_first_of_ties():
    z = torch.tensor([[1.0, 3.0, 3.0], [1.0, 3.0, 3.0], [5.0, 0.0, 0.0]])
    out = xent.log_probs(z, torch.tensor([1, 2, 0]), return_top1=True, temperature=0.5)
    assert out.top1.tolist() == [True, False, True]
    assert torch.equal(out.top1, z.argmax(-1) == torch.tensor([1, 2, 0]))


@pytest.mark.parametrize("case", ["logprobs", "distill"])
def test_bench_cases_compute_the_same_loss(case):
    """`xent bench logprobs|distill`: every variant computes the same loss and gradients (TRL's
    chunked functions too, where TRL is installed)."""
    import importlib.util

    from xent.tools import bench

    cfg = bench.Config(case=case, n=37, c=53, h=8, ignore_frac=0.2)
    built = bench.CASES[case](cfg)
    names = ["xent", "torch"] + (["xent log_probs"] if case == "logprobs" else [])
    names += ["trl"] if importlib.util.find_spec("trl") else []
    results = []
    for name in names:
        for p in built.params:
            built.inputs[p].grad = None
        loss = built.variants[name](built.inputs)
        loss.backward()
        results.append((loss.detach(), [built.inputs[p].grad.clone() for p in built.params]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-5, rtol=1e-5)
        for g, g0 in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# The clipped policy-gradient loss on hidden states
# --------------------------------------------------------------------------------------------


def _oracle_policy(z, target, adv, old=None, clip=(0.2, 0.2), beta=0.0, reduction="mean",
                   normalizer=None, ignore_index=-100, **transform):  # fmt: skip
    """PPO's clipped surrogate per token from the float64 oracle's log p and H, written with
    explicit branches (not torch.minimum): the clipped branch where it is strictly smaller."""
    lp, ent, _ = _oracle_log_probs(z, target, ignore_index, **transform)
    a = adv.double().broadcast_to(lp.shape)
    old = lp.detach() if old is None else old.double()
    r = torch.exp(lp - old)
    rc = torch.where(r < 1 - clip[0], 1 - clip[0], torch.where(r > 1 + clip[1], 1 + clip[1], r))
    rc = torch.where((r < 1 - clip[0]) | (r > 1 + clip[1]), rc.detach(), r)
    use_clip = rc * a < r * a
    valid = target != ignore_index
    per = torch.where(valid, -torch.where(use_clip, rc * a, r * a) - beta * ent, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (valid.sum() if normalizer is None else normalizer)


def _policy_problem(n=13, h=6, v=17, seed=0, ignored=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    if ignored:
        t[::4] = -100
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    # Old log-probabilities near the current ones, so that some ratios fall in the clip range
    # and some outside it, on both sides.
    with torch.no_grad():
        lp = xent.linear_log_probs(x.double(), w.double(), t, bias=b.double())
    old = lp + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, w, b, t, adv, old


POLICY_OPTIONS = [
    {},
    {"entropy_coef": 0.05},
    {"old": True},
    {"old": True, "clip_high": 0.35, "entropy_coef": -0.02, "temperature": 0.7},
    {"old": True, "softcap": 3.0, "logit_scale": 1.3, "entropy_coef": 0.1, "reduction": "sum"},
    {"old": True, "temperature": "rows", "entropy_coef": 0.1, "reduction": "none"},
    {"old": True, "normalizer": 40.0, "entropy_coef": 0.01, "bias": False},
]


def _policy_kwargs(opts, n, old):
    kw = dict(opts)
    kw.pop("bias", None)
    if kw.pop("old", False):
        kw["old_log_probs"] = old
    if kw.get("temperature") == "rows":
        kw["temperature"] = torch.linspace(0.4, 2.5, n, dtype=torch.float64)
    return kw


def _oracle_kwargs(kw):
    ok = dict(kw)
    ok["old"] = ok.pop("old_log_probs", None)
    ok["beta"] = ok.pop("entropy_coef", 0.0)
    clip_high = ok.pop("clip_high", None)
    ok["clip"] = (0.2, 0.2 if clip_high is None else clip_high)
    return ok


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("opts", POLICY_OPTIONS)
def test_linear_policy_loss_matches_the_oracle(opts, chunk_size):
    x, w, b, t, adv, old = _policy_problem()
    bias = b if opts.get("bias", True) else None
    kw = _policy_kwargs(opts, x.shape[0], old)
    for impl in ("torch", "reference"):
        loss = xent.linear_policy_loss(x, w, t, adv, bias=bias, chunk_size=chunk_size,
                                       impl=impl, **kw)  # fmt: skip
        z = F.linear(x, w, bias)
        ref = _oracle_policy(z, t, adv, **_oracle_kwargs(kw))
        torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
        params = [x, w] + ([bias] if bias is not None else [])
        g_out = torch.linspace(-1, 2, loss.numel(), dtype=torch.float64).reshape(loss.shape)
        grads = torch.autograd.grad(loss, params, g_out)
        grads_ref = torch.autograd.grad(ref, params, g_out)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


def test_linear_policy_loss_clips_on_both_sides_and_reports_it():
    x, w, b, t, adv, old = _policy_problem(n=40, seed=3)
    out = xent.linear_policy_loss(x, w, t, adv, old_log_probs=old, bias=b, return_stats=True)
    ref = xent.linear_log_probs(x, w, t, bias=b, return_entropy=True)
    torch.testing.assert_close(out.log_probs, ref.log_probs, atol=1e-13, rtol=0)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-13, rtol=0)
    r = torch.exp(ref.log_probs - old)
    valid = t != -100
    low = valid & (r < 0.8) & (adv < 0)
    high = valid & (r > 1.2) & (adv > 0)
    assert low.any() and high.any() and (valid & ~low & ~high).any()  # the problem covers them
    assert torch.equal(out.clipped, low | high)
    assert out.clipped.dtype == torch.bool and not out.clipped[~valid].any()
    assert out.log_probs.requires_grad is False and out.loss.requires_grad
    # The clipped tokens' hidden states get no gradient (entropy_coef = 0).
    (gx,) = torch.autograd.grad(out.loss, x)
    assert torch.all(gx[out.clipped | ~valid] == 0) and torch.all(gx[~out.clipped & valid] != 0)


def test_linear_policy_loss_on_policy_is_the_policy_gradient():
    """Without old log-probabilities: -mean(A) - β mean(H) in value, the gradient of
    -mean(A log p) - β mean(H) (the REINFORCE form), per-sequence advantages broadcast."""
    x, w, b, t, _, _ = _policy_problem(n=12)
    adv = torch.randn(3, 1, dtype=torch.float64)
    x3, t3 = x.reshape(3, 4, -1), t.reshape(3, 4)
    loss = xent.linear_policy_loss(x3, w, t3, adv, bias=b, entropy_coef=0.1)
    out = xent.linear_log_probs(x3, w, t3, bias=b, return_entropy=True)
    valid = t3 != -100
    a = adv.expand(3, 4)
    torch.testing.assert_close(loss, -(a[valid].sum() + 0.1 * out.entropy[valid].sum()) / 9)
    reinforce = -(a * out.log_probs).sum() / 9 - 0.1 * out.entropy.sum() / 9
    for g, g_ref in zip(torch.autograd.grad(loss, (x, w, b)),
                        torch.autograd.grad(reinforce, (x, w, b)), strict=True):  # fmt: skip
        torch.testing.assert_close(g, g_ref, atol=1e-13, rtol=1e-11)


def test_linear_policy_loss_forms_gradients_in_the_forward_walk(monkeypatch):
    """A scalar loss walks the chunks once (forward), "none" twice; backward of a retained
    graph walks again and agrees bit for bit."""
    calls = []
    real = posttrain.linear_walk

    def counting(*args, **kw):
        calls.append(kw.get("need"))
        return real(*args, **kw)

    x, w, b, t, adv, old = _policy_problem()
    monkeypatch.setattr(posttrain, "linear_walk", counting)
    loss = xent.linear_policy_loss(x, w, t, adv, old_log_probs=old, bias=b, entropy_coef=0.1)
    assert calls == [(True, True, True)]
    g1 = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    assert len(calls) == 1
    g2 = torch.autograd.grad(loss, (x, w, b))
    assert len(calls) == 2
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)
    calls.clear()
    per = xent.linear_policy_loss(x, w, t, adv, old_log_probs=old, bias=b, reduction="none")
    per.sum().backward()
    assert calls == [(False, False, False), (True, True, True)]
    calls.clear()
    with torch.no_grad():
        xent.linear_policy_loss(x, w, t, adv)
    assert calls == [(False, False, False)]


def test_linear_policy_loss_upstream_factor_and_all_ignored():
    x, w, b, t, adv, old = _policy_problem()
    loss = xent.linear_policy_loss(x, w, t, adv, old_log_probs=old, bias=b, entropy_coef=0.1)
    g = torch.autograd.grad(3.5 * loss, (x, w, b))
    ref = _oracle_policy(F.linear(x, w, b), t, adv, old, beta=0.1)
    for a, c in zip(g, torch.autograd.grad(3.5 * ref, (x, w, b)), strict=True):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
    t_all = torch.full_like(t, -100)
    loss = xent.linear_policy_loss(x, w, t_all, adv, bias=b, entropy_coef=0.1)
    assert torch.isnan(loss)  # 0 / 0, as a mean over no token
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, (x, w, b)))
    loss = xent.linear_policy_loss(x, w, t_all, adv, reduction="sum", entropy_coef=0.1)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_policy_loss_half_precision(dtype):
    x, w, b, t, adv, old = _policy_problem(dtype=dtype)
    # Off-policy only in fp32: half-precision logits may move a ratio across the clip boundary,
    # where the gradient jumps; on-policy the loss is smooth.
    kw = dict(entropy_coef=0.05, old_log_probs=old.float() if dtype == torch.float32 else None)
    loss = xent.linear_policy_loss(x, w, t, adv.float(), bias=b, **kw)
    assert loss.dtype == dtype
    ref = xent.linear_policy_loss(
        x.double(), w.double(), t, adv, bias=b.double(), **kw, impl="reference"
    )
    torch.testing.assert_close(loss.double(), ref, atol=2e-2, rtol=2e-2)
    gx, gw = torch.autograd.grad(loss * 256, (x, w))
    assert gx.dtype == dtype and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = xent.linear_policy_loss(xd, wd, t, adv, bias=b.double(), **kw, impl="reference")
    rx, rw = torch.autograd.grad(ref * 256, (xd, wd))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # half products round the logits
    for g, r in ((gx, rx), (gw, rw)):  # entries that cancel are off by the rounding of the rest
        torch.testing.assert_close(g.double(), r, atol=tol * float(r.abs().max()), rtol=tol)


def test_gradcheck_linear_policy_loss():
    x, w, b, t, adv, old = _policy_problem(n=7, h=3, v=5)
    kw = dict(old_log_probs=old, entropy_coef=0.3, softcap=2.0, temperature=0.8)
    for reduction in ("mean", "none"):

        def fn(x, w, b, reduction=reduction):
            return xent.linear_policy_loss(x, w, t, adv, bias=b, chunk_size=3,
                                           reduction=reduction, **kw)  # fmt: skip

        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_linear_policy_loss_errors_name_the_offending_value():
    x, w, _, t, adv, old = _policy_problem(n=6)
    with pytest.raises(ValueError, match="clip_low"):
        xent.linear_policy_loss(x, w, t, adv, clip_low=-0.1)
    with pytest.raises(ValueError, match="clip_high"):
        xent.linear_policy_loss(x, w, t, adv, clip_high=math.inf)
    with pytest.raises(ValueError, match="entropy_coef"):
        xent.linear_policy_loss(x, w, t, adv, entropy_coef=math.nan)
    with pytest.raises(ValueError, match=r"advantages of shape \(4,\)"):
        xent.linear_policy_loss(x, w, t, adv[:4])
    with pytest.raises(ValueError, match="old_log_probs must have"):
        xent.linear_policy_loss(x, w, t, adv, old_log_probs=old[:5])
    with pytest.raises(ValueError, match="'batchmean' is not a valid value for reduction"):
        xent.linear_policy_loss(x, w, t, adv, reduction="batchmean")
    with pytest.raises(ValueError, match="normalizer"):
        xent.linear_policy_loss(x, w, t, adv, reduction="sum", normalizer=4.0)
    with pytest.raises(IndexError, match="Target 17"):
        xent.linear_policy_loss(x, w, torch.full_like(t, 17), adv)


# --------------------------------------------------------------------------------------------
# Vocabulary parallelism: 2 and 3 gloo processes with uneven slices against one process
# --------------------------------------------------------------------------------------------

PAR_N, PAR_H, PAR_V = 19, 5, 29
PAR_SPLITS = {2: [12, 17], 3: [6, 14, 9]}
PAR_OPTIONS = [
    {},
    {"temperature": 0.7, "softcap": 3.0, "logit_scale": 1.2},
    {"temperature": "rows", "logit_scale": 0.8},
]


def _par_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PAR_N, PAR_H, generator=gen, dtype=torch.float64)
    w = torch.randn(PAR_V, PAR_H, generator=gen, dtype=torch.float64)
    b = torch.randn(PAR_V, generator=gen, dtype=torch.float64)
    t = torch.randint(0, PAR_V, (PAR_N,), generator=gen)
    t[::4] = -100
    t[1], t[2] = 25, 2  # rows 1 and 2: a tie of the maximum across two slices (below)
    t[3] = 0  # row 3: the first slice's own maximum, below the last slice's
    up = torch.randn(2, PAR_N, generator=gen, dtype=torch.float64)
    z = x @ w.t() + b
    z[1:3, 25] = z[1:3, 2] = z[1:3].amax(1) + 1.0
    z[3, 0] = z[3].amax() + 1.0
    z[3, 28] = z[3, 0] + 1.0
    return x, w, b, t, up, z


def _par_kwargs(opts):
    if opts.get("temperature") == "rows":
        return {**opts, "temperature": torch.linspace(0.5, 2.0, PAR_N, dtype=torch.float64)}
    return opts


def _par_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, w, b, t, up, z = _par_problem()
    sizes = PAR_SPLITS[world]
    start = sum(sizes[:rank])
    cols = slice(start, start + sizes[rank])
    results = []
    for k, opts in enumerate(PAR_OPTIONS):
        kw = {**_par_kwargs(opts), "return_entropy": True, "return_top1": True}
        local = z[:, cols].clone().requires_grad_()
        out = posttrain.vocab_parallel_log_probs(local, t, **kw)
        (g_local,) = torch.autograd.grad((out.log_probs * up[0] + out.entropy * up[1]).sum(), local)
        xi, wi, bi = x.clone().requires_grad_(), w[cols].clone().requires_grad_(), b[cols].clone()
        bi.requires_grad_()
        vs = start if k % 2 else None
        out2 = posttrain.vocab_parallel_linear_log_probs(
            xi, wi, t, bias=bi, vocab_start=vs, chunk_size=5, **kw
        )
        grads = torch.autograd.grad(
            (out2.log_probs * up[0] + out2.entropy * up[1]).sum(), (xi, wi, bi)
        )
        results.append((tuple(t.detach() for t in out), g_local, tuple(out2), *grads))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_log_probs_match_single_process(world, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_par_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    x, w, b, t, up, z = _par_problem()
    sizes = PAR_SPLITS[world]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for k, opts in enumerate(PAR_OPTIONS):
        kw = {**_par_kwargs(opts), "return_entropy": True, "return_top1": True}
        zr = z.clone().requires_grad_()
        ref = xent.log_probs(zr, t, **kw)
        (g_ref,) = torch.autograd.grad((ref.log_probs * up[0] + ref.entropy * up[1]).sum(), zr)
        xr, wr, br = (p.clone().requires_grad_() for p in (x, w, b))
        ref2 = xent.linear_log_probs(xr, wr, t, bias=br, **kw)
        g2 = torch.autograd.grad(
            (ref2.log_probs * up[0] + ref2.entropy * up[1]).sum(), (xr, wr, br)
        )
        assert ref.top1[1:4].tolist() == [False, True, False]  # the tie; a slice's own max
        for r in range(world):
            out, g_local, out2, gx, gw, gb = per_rank[r][k]
            cols = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            for a, e in zip(out[:2], ref[:2], strict=True):
                torch.testing.assert_close(a, e.detach(), atol=1e-12, rtol=1e-12)
            assert torch.equal(out[2], ref.top1) and torch.equal(out2[2], ref2.top1)
            torch.testing.assert_close(g_local, g_ref[:, cols], atol=1e-12, rtol=1e-12)
            for a, e in zip(out2[:2], ref2[:2], strict=True):
                torch.testing.assert_close(a, e.detach(), atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(gx, g2[0], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(gw, g2[1][cols], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(gb, g2[2][cols], atol=1e-12, rtol=1e-12)
