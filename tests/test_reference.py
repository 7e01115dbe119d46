"""xent.reference, the package's plain-PyTorch definitions, against torch's own functions."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from oracles import torch_cross_entropy, torch_linear_cross_entropy

from xent.reference import cross_entropy_reference, linear_cross_entropy_reference

OPTIONS = [
    {},
    dict(label_smoothing=0.2),
    dict(z_loss=1e-2, softcap=3.0),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, weighted=True, ignore=True),
]


def _problem(seed: int, probs: bool, opts: dict):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(11, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    if probs:
        t = torch.rand(11, 7, generator=gen, dtype=torch.float64).softmax(1)
    else:
        t = torch.randint(0, 7, (11,), generator=gen)
        if opts.get("ignore"):
            t[::4] = -100
    w = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5 if opts.get("weighted") else None
    kw = {k: v for k, v in opts.items() if k not in ("weighted", "ignore")}
    return x, t, w, kw


@pytest.mark.parametrize(
    ("opts", "reduction", "probs"),
    list(itertools.product(OPTIONS, ["mean", "sum", "none"], [False, True])),
)
def test_cross_entropy_reference_is_torchs(opts, reduction, probs):
    x, t, w, kw = _problem(1, probs, opts)
    ours = cross_entropy_reference(x, t, w, reduction=reduction, **kw)
    theirs = torch_cross_entropy(x, t, w, reduction=reduction, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    up = torch.randn(ours.shape, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, x, up)
    (g_theirs,) = torch.autograd.grad(theirs, x, up)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-12, rtol=1e-12)


def test_cross_entropy_reference_k_dimensional_and_one_row():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, 2, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (3, 4, 2), generator=gen)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(
            cross_entropy_reference(x, t, reduction=reduction, label_smoothing=0.1),
            F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1),
            atol=1e-12,
            rtol=1e-12,
        )
    torch.testing.assert_close(
        cross_entropy_reference(x[0, :, 0, 0], t[0, 0, 0]),
        F.cross_entropy(x[0, :, 0, 0], t[0, 0, 0]),
    )


@pytest.mark.parametrize(
    ("opts", "reduction"), list(itertools.product(OPTIONS, ["mean", "sum", "none"]))
)
def test_linear_cross_entropy_reference_is_torchs(opts, reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (13,), generator=gen)
    if opts.get("ignore"):
        t[::3] = -100
    w = torch.rand(9, generator=gen, dtype=torch.float64) + 0.5 if opts.get("weighted") else None
    kw = {k: v for k, v in opts.items() if k not in ("weighted", "ignore")}
    tw = torch.rand(13, generator=gen, dtype=torch.float64)
    ours = linear_cross_entropy_reference(
        x, lw, t, linear_bias=b, weight=w, reduction=reduction, token_weight=tw, **kw
    )
    theirs = torch_linear_cross_entropy(
        x, lw, b, t, weight=w, reduction=reduction, token_weight=tw, **kw
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    if not kw:  # torch 2.13's own fused function, where it has the options
        torch.testing.assert_close(
            linear_cross_entropy_reference(x, lw, t, linear_bias=b, weight=w, reduction=reduction),
            F.linear_cross_entropy(x, lw, t, linear_bias=b, weight=w, reduction=reduction),
            atol=1e-12,
            rtol=1e-12,
        )
