"""Empty dimensions (N = 0, C = 0, a size-0 spatial or reduced dimension) against PyTorch.

A grid: every reduction, activation and loss on logits, at every shape below with a size-0
dimension, every reduction and every dimension to reduce; forward value (NaN pattern included),
shape and dtype, and the gradients' shapes and values, or the exception type where PyTorch
raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import xent

SHAPES = [(0,), (0, 3), (3, 0), (0, 0), (5, 0, 0), (0, 3, 4), (2, 3, 0), (2, 0, 4), (2, 0, 3, 0)]
REDUCTIONS = ["none", "mean", "sum"]


def _call(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], grad: tuple[int, ...]):
    """``(output, gradients of output.sum())`` or the exception raised."""
    args = [a.clone().requires_grad_(True) if i in grad else a for i, a in enumerate(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*args, **kwargs)
        except Exception as error:
            return error, None
    grads = torch.autograd.grad(out.sum(), [args[i] for i in grad]) if grad else ()
    return out, grads


def _cases(
    dtype: torch.dtype,
) -> Iterator[tuple[str, Callable, Callable, list[Any], dict[str, Any], tuple]]:
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        y = torch.rand(shape, generator=gen).to(dtype)
        for d in range(-len(shape), len(shape)):
            yield "softmax", xent.softmax, F.softmax, [x], {"dim": d}, (0,)
            yield "log_softmax", xent.log_softmax, F.log_softmax, [x], {"dim": d}, (0,)
            for keep in (False, True):
                kw = {"dim": d, "keepdim": keep}
                yield "logsumexp", xent.logsumexp, torch.logsumexp, [x], kw, (0,)
        yield (
            "logsumexp",
            xent.logsumexp,
            torch.logsumexp,
            [x],
            {"dim": tuple(range(len(shape)))},
            (0,),
        )
        classes = shape[0] if len(shape) == 1 else shape[1]
        index_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        targets = [torch.full(index_shape, -100)]
        if classes > 0:
            targets.append(torch.randint(0, classes, index_shape, generator=gen))
        else:
            targets.append(torch.zeros(index_shape, dtype=torch.long))  # out of range with C = 0
        weight = torch.rand(classes, generator=gen).to(dtype)
        for r in REDUCTIONS:
            for t in targets:
                for ls in (0.0, 0.1):
                    kw = {"reduction": r, "label_smoothing": ls}
                    yield "cross_entropy", xent.cross_entropy, F.cross_entropy, [x, t], kw, (0,)
                    yield (
                        "cross_entropy",
                        xent.cross_entropy,
                        F.cross_entropy,
                        [x, t, weight],
                        kw,
                        (0,),
                    )
                yield "nll_loss", xent.nll_loss, F.nll_loss, [x, t], {"reduction": r}, (0,)
                yield "nll_loss", xent.nll_loss, F.nll_loss, [x, t, weight], {"reduction": r}, (0,)
            for ls in (0.0, 0.2):
                kw = {"reduction": r, "label_smoothing": ls}
                yield "cross_entropy", xent.cross_entropy, F.cross_entropy, [x, y], kw, (0, 1)
            kw = {"reduction": r}
            p = torch.rand(shape, generator=gen).to(dtype)
            bce, bce_t = xent.binary_cross_entropy, F.binary_cross_entropy
            yield "binary_cross_entropy", bce, bce_t, [p, y], kw, (0, 1)
            yield (
                "binary_cross_entropy",
                bce,
                bce_t,
                [p, y, torch.rand(shape).to(dtype)],
                kw,
                (0, 1),
            )
            bcel, bcel_t = xent.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
            yield "bce_with_logits", bcel, bcel_t, [x, y], kw, (0, 1)
            pw = {"reduction": r, "pos_weight": torch.rand(shape[-1], generator=gen).to(dtype)}
            yield "bce_with_logits", bcel, bcel_t, [x, y], pw, (0, 1)
            yield "huber_loss", xent.huber_loss, F.huber_loss, [x, y], kw, (0, 1)
            for module in ("CrossEntropyLoss", "NLLLoss"):
                if len(targets[0].shape) + 1 == len(shape) or len(shape) == 1:
                    ours, theirs = (
                        getattr(xent.nn, module)(reduction=r),
                        getattr(torch.nn, module)(reduction=r),
                    )
                    yield module, ours, theirs, [x, targets[0]], {}, (0,)
        for r in [*REDUCTIONS, "batchmean"]:
            for log_target in (False, True):
                kw = {"reduction": r, "log_target": log_target}
                yield "kl_div", xent.kl_div, F.kl_div, [x, y], kw, (0, 1)


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_dimensions_match_torch(dtype):
    checked = raised = 0
    for name, ours_fn, theirs_fn, args, kwargs, grad in _cases(dtype):
        where = f"{name} {[tuple(a.shape) for a in args]} {kwargs}"
        theirs, their_grads = _call(theirs_fn, args, kwargs, grad)
        ours, our_grads = _call(ours_fn, args, kwargs, grad)
        if isinstance(theirs, Exception):
            assert isinstance(ours, type(theirs)), f"{where}: torch raised {theirs!r}, got {ours!r}"
            raised += 1
            continue
        assert not isinstance(ours, Exception), f"{where}: raised {ours!r}, torch gave {theirs}"
        try:
            _same(ours.detach(), theirs.detach())
            for g_ours, g_theirs in zip(our_grads, their_grads, strict=True):
                _same(g_ours, g_theirs)
        except AssertionError as error:
            raise AssertionError(f"{where}: {error}") from None
        checked += 1
    assert checked > 700 and raised > 10  # the grid really ran, both ways


@pytest.mark.parametrize("shape", [(5, 0, 0), (4, 0), (0,)])
def test_softmax_over_an_empty_dimension_is_empty_and_logsumexp_is_minus_inf(shape):
    x = torch.randn(shape)
    assert xent.softmax(x, -1).shape == shape
    assert xent.log_softmax(x, -1).shape == shape
    lse = xent.logsumexp(x, -1)
    assert lse.shape == shape[:-1] and bool((lse == -torch.inf).all())


def test_cross_entropy_without_classes_all_ignored_is_nan_with_an_empty_gradient():
    x = torch.randn(3, 0, requires_grad=True)
    loss = xent.cross_entropy(x, torch.full((3,), -100))
    assert torch.isnan(loss)
    loss.backward()
    assert x.grad.shape == (3, 0)
    with pytest.raises(IndexError, match="Target 0"):
        xent.cross_entropy(x, torch.zeros(3, dtype=torch.long))
