"""What a chunk size changes: speed and memory, and the results only in their last bits.

The docstrings of every ``chunk_size`` say so; these tests hold them to it. Two chunk sizes give
results within the rounding of the float sums whose grouping the chunks set (``n·ε·Σ|terms|``
for a sum of ``n`` terms), and one chunk size gives the same bits on every run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent

EPS = torch.finfo(torch.float32).eps
CHUNKS = [1, 2, 5, 16, None]
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.1, "weight": True},
    {"z_loss": 1e-3, "softcap": 20.0},
    {"reduction": "sum"},
]


def _ce(x, t, chunk, options):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.linspace(0.5, 1.5, x.shape[1])
    leaf = x.clone().requires_grad_()
    loss = xent.cross_entropy(leaf, t, chunk_size=chunk, **options)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_cross_entropy_chunk_sizes_agree_within_rounding(options):
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(37, 301, generator=gen)
    t = torch.randint(0, 301, (37,), generator=gen)
    ref_loss, ref_grad = _ce(x, t, None, options)
    row_scale = ref_grad.abs().amax(dim=1, keepdim=True)
    for chunk in CHUNKS:
        loss, grad = _ce(x, t, chunk, options)
        # Each row's gradient comes from that row's sums over the classes: the difference is
        # a few units in the last place of the row's largest entry.
        assert ((grad - ref_grad).abs() <= 32 * EPS * row_scale).all(), chunk
        assert (loss - ref_loss).abs() <= 8 * EPS * ref_loss.abs(), chunk
        again = _ce(x, t, chunk, options)
        assert torch.equal(again[0], loss) and torch.equal(again[1], grad)  # same chunk: same bits


def _lce(h, w, t, chunk):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = xent.linear_cross_entropy(h, w, t, chunk_size=chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_linear_cross_entropy_chunk_sizes_agree_within_the_sums_rounding():
    gen = torch.Generator().manual_seed(1)
    n, hidden, vocab = 37, 16, 301
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen)
    t = torch.randint(0, vocab, (n,), generator=gen)
    # ∂L/∂z in fp64: the terms of both gradient sums, ∂h = G W (over the vocabulary) and
    # ∂W = Gᵀ h (over the tokens); their absolute sums bound the rounding of either.
    z = (h.double() @ w.double().T).requires_grad_()
    F.cross_entropy(z, t).backward()
    g = z.grad.abs()
    bound_h = 2 * vocab * EPS * (g @ w.double().abs()) + 1e-12
    bound_w = 2 * n * EPS * (g.T @ h.double().abs()) + 1e-12
    ref = _lce(h, w, t, None)
    for chunk in [1, 3, 8, None]:
        loss, grad_h, grad_w = _lce(h, w, t, chunk)
        assert (loss - ref[0]).abs() <= 8 * EPS * ref[0].abs(), chunk
        assert ((grad_h - ref[1]).abs().double() <= bound_h).all(), chunk
        assert ((grad_w - ref[2]).abs().double() <= bound_w).all(), chunk
        again = _lce(h, w, t, chunk)
        assert all(torch.equal(a, b) for a, b in zip(again, (loss, grad_h, grad_w), strict=True))
