"""Language-model options of xent.cross_entropy (z_loss, softcap, inplace_backward, chunk_size)
against the materialised PyTorch expressions, and torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import torch_cross_entropy

import xent

OPTIONS = [
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(z_loss=1e-3, softcap=5.0, label_smoothing=0.1),
    dict(z_loss=1e-2, softcap=2.0, label_smoothing=0.2, weighted=True, ignore=True),
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probs", [False, True])
def test_options_match_materialised_torch(opts, reduction, probs):
    opts = dict(opts)
    weighted, ignore = opts.pop("weighted", False), opts.pop("ignore", False)
    gen = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(13, 37, generator=gen, dtype=torch.float64)).requires_grad_()
    if probs:
        target = torch.rand(13, 37, generator=gen, dtype=torch.float64).softmax(1)
    else:
        target = torch.randint(0, 37, (13,), generator=gen)
        if ignore:
            target[::4] = -100
    weight = torch.rand(37, generator=gen, dtype=torch.float64) + 0.2 if weighted else None
    ours = xent.cross_entropy(x, target, weight, reduction=reduction, chunk_size=5, **opts)
    ref = torch_cross_entropy(x, target, weight, reduction=reduction, **opts)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    upstream = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-10)


def test_options_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0, 6, -100, 3, 3])

    def f(x):
        return xent.cross_entropy(x, target, label_smoothing=0.1, z_loss=0.05, softcap=3.0)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward_overwrites_logits_with_the_gradient(reduction):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(9, 11, generator=gen)
    target = torch.randint(0, 11, (9,), generator=gen)
    x_ref = base.clone().requires_grad_()
    expected = F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=0.1)
    expected.backward()

    logits = base.clone().requires_grad_()
    h = logits * 1.0  # a non-leaf, as a model's output would be
    loss = xent.cross_entropy(
        h, target, reduction=reduction, label_smoothing=0.1, inplace_backward=True
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.detach(), x_ref.grad)  # the buffer now holds the gradient
    loss.backward()
    torch.testing.assert_close(logits.grad, x_ref.grad)


def test_inplace_backward_refuses_double_backward_and_second_backward():
    x = torch.randn(4, 5, requires_grad=True)
    h = x * 1.0
    loss = xent.cross_entropy(h, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_second_backward_through_retained_graph_is_identical():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=gen, requires_grad=True)
    target = torch.randint(0, 9, (6,), generator=gen)
    loss = xent.cross_entropy(x, target, label_smoothing=0.05, z_loss=1e-3)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(0.5), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5))
    assert torch.equal(first, second)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 12),
    chunk=st.integers(1, 14),
    eps=st.sampled_from([0.0, 0.3]),
    zeta=st.sampled_from([0.0, 1e-2]),
    cap=st.sampled_from([None, 4.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunk_size_never_changes_the_answer(rows, chunk, eps, zeta, cap, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 23, generator=gen)).requires_grad_()
    target = torch.randint(0, 23, (rows,), generator=gen)
    target[::3] = -100
    kw = dict(reduction=reduction, label_smoothing=eps, z_loss=zeta, softcap=cap)
    one = xent.cross_entropy(x, target, chunk_size=chunk, **kw)
    whole = xent.cross_entropy(x, target, chunk_size=10_000, **kw)
    torch.testing.assert_close(one, whole, atol=1e-6, rtol=1e-6, equal_nan=True)
    up = torch.ones_like(one)
    g1 = torch.autograd.grad(one, x, up)[0]
    g2 = torch.autograd.grad(whole, x, up)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(z_loss=-1.0), "z_loss must be a finite number >= 0, got -1.0"),
        (dict(z_loss=float("nan")), "z_loss must be a finite number >= 0, got nan"),
        (dict(softcap=0.0), "softcap must be None or a finite number > 0, got 0.0"),
        (dict(softcap=-3), "softcap must be None or a finite number > 0, got -3"),
        (dict(chunk_size=0), "chunk_size must be None or a positive number of rows, got 0"),
    ],
)
def test_bad_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 29))
    x = torch.randn(12, 8)
    target = torch.randint(0, 29, (12,))
    target[2] = -100

    def step(x, target):
        logits = model(x)
        loss = xent.cross_entropy(
            logits, target, reduction=reduction, label_smoothing=0.1, z_loss=1e-3
        )
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, target)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = step(x, target)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc_, ge in zip(grads_c, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(gc_, ge)


def test_torch_compile_reports_out_of_range_target():
    compiled = torch.compile(
        lambda x, t: xent.cross_entropy(x, t), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        compiled(torch.randn(3, 4), torch.tensor([0, 7, 1]))
