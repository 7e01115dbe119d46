"""``cross_entropy(..., inplace_backward=True)`` is safe or falls back, on both backends.

Written in place, the logits' version counter is bumped, so an earlier consumer that saved them
(an auxiliary loss) makes autograd raise instead of differentiating the overwritten values;
expanded, overlapping, non-contiguous logits and leaves that require grad get a separate
gradient buffer (the same loss and gradient as without the option).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import xent

IMPLS = ["torch", "triton"]


def _data(rows: int = 5, classes: int = 7, hidden: int = 4):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(classes, hidden, generator=gen)
    t = torch.randint(0, classes, (rows,), generator=gen)
    return h, w, t


@pytest.mark.parametrize("impl", IMPLS)
def test_an_earlier_consumer_that_saved_the_logits_makes_backward_raise(impl):
    h, w, t = _data()
    h.requires_grad_()
    logits = h @ w.T
    aux = (logits**2).mean()  # pow saves the logits for its backward
    loss = xent.cross_entropy(logits, t, inplace_backward=True, impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + 1e-3 * aux).backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_consumer_that_saved_nothing_keeps_the_exact_gradient(impl):
    h, w, t = _data()
    ref_h = h.clone().requires_grad_()
    ref_logits = ref_h @ w.T
    (F.cross_entropy(ref_logits, t) + ref_logits.sum() * 1e-2).backward()
    h.requires_grad_()
    logits = h @ w.T
    aux = logits.sum() * 1e-2  # sum saves nothing
    (xent.cross_entropy(logits, t, inplace_backward=True, impl=impl) + aux).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)


def _layouts(w: torch.Tensor):
    """``name -> logits builder`` for layouts the kernel cannot (or must not) write into."""
    return {
        "expanded": lambda leaf: (leaf[:1] @ w.T).expand(5, -1),
        "transposed": lambda leaf: (w @ leaf.T).T,
        "strided-columns": lambda leaf: torch.cat([leaf @ w.T, leaf @ w.T], 1)[:, ::2],
        "leaf": lambda leaf: leaf,
        "overlapping": lambda leaf: torch.as_strided((leaf @ w.T).reshape(-1), (4, 7), (2, 1)),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "layout", ["expanded", "transposed", "strided-columns", "leaf", "overlapping"]
)
def test_unwritable_logits_fall_back_to_a_separate_buffer(impl, layout):
    h, w, t = _data()
    build = _layouts(w)[layout]
    source = (h @ w.T).clone() if layout == "leaf" else h
    rows = build(source).shape[0]
    target = t[:rows]

    ref = source.clone().requires_grad_()
    expected = F.cross_entropy(build(ref), target, label_smoothing=0.1)
    expected.backward()

    ours_in = source.clone().requires_grad_()
    logits = build(ours_in)
    before = logits.detach().clone()
    loss = xent.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True, impl=impl)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(logits.detach(), before)  # nothing was overwritten
    loss.backward()
    torch.testing.assert_close(ours_in.grad, ref.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_on_contiguous_logits_bumps_the_version_and_keeps_the_gradient(impl):
    h, w, t = _data()
    h.requires_grad_()
    logits = h @ w.T
    version = logits._version
    loss = xent.cross_entropy(logits, t, inplace_backward=True, impl=impl)
    assert logits._version > version
    ref_h = h.detach().clone().requires_grad_()
    F.cross_entropy(ref_h @ w.T, t).backward()
    loss.backward()
    torch.testing.assert_close(h.grad, ref_h.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_under_activation_checkpointing(impl, use_reentrant):
    h, w, t = _data()
    h.requires_grad_()

    def block(x: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(x @ w.T)  # tanh saves its output: the logits themselves
        return xent.cross_entropy(logits * 2.0, t, inplace_backward=True, impl=impl)

    loss = checkpoint(block, h, use_reentrant=use_reentrant)
    ref_h = h.detach().clone().requires_grad_()
    expected = F.cross_entropy(torch.tanh(ref_h @ w.T) * 2.0, t)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
