"""xent.cross_entropy and xent.nll_loss against torch.nn.functional, float64 and gradcheck."""

from __future__ import annotations

import itertools
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import assert_close

import xent

# Shapes: 1-D, 2-D with odd sizes, K-dimensional (K = 1, 2).
SHAPES = [(5,), (9, 7), (3, 6, 5), (2, 5, 3, 4)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _class_dim(shape: tuple[int, ...]) -> int:
    return 0 if len(shape) == 1 else 1


def _index_target(shape: tuple[int, ...], gen: torch.Generator, ignore: int | None) -> torch.Tensor:
    num_classes = shape[_class_dim(shape)]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, num_classes, tshape, generator=gen)
    if ignore is not None and target.dim() > 0:
        target.view(-1)[::3] = ignore
    return target


GRID = list(
    itertools.product(
        SHAPES,
        [torch.float64, torch.float32],
        ["mean", "sum", "none"],
        [False, True],  # class weights
        [None, -100, 2],  # ignore_index (None: no ignored targets)
        [0.0, 0.3],  # label smoothing
    )
)


@pytest.mark.parametrize(("shape", "dtype", "reduction", "weighted", "ignore", "eps"), GRID)
def test_cross_entropy_index_matches_torch(shape, dtype, reduction, weighted, ignore, eps):
    gen = torch.Generator().manual_seed(hash((shape, reduction, weighted, ignore, eps)) % 2**31)
    num_classes = shape[_class_dim(shape)]
    x = (3 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    target = _index_target(shape, gen, ignore)
    weight = torch.rand(num_classes, generator=gen, dtype=dtype) + 0.1 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    if ignore is not None:
        kwargs["ignore_index"] = ignore
    ours = xent.cross_entropy(x, target, **kwargs)
    ref = F.cross_entropy(x, target, **kwargs)
    assert_close(ours, ref, TOL[dtype])
    upstream = torch.randn(ours.shape, generator=gen, dtype=dtype)
    (g_ours,) = torch.autograd.grad(ours, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    assert_close(g_ours, g_ref, TOL[dtype])


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "weighted", "eps"),
    [(s, d, r, w, e) for s, d, r, w, _, e in GRID if _ is None],
)
def test_cross_entropy_probs_matches_torch(shape, dtype, reduction, weighted, eps):
    gen = torch.Generator().manual_seed(hash((shape, reduction, weighted, eps)) % 2**31)
    dim = _class_dim(shape)
    x = (3 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    q = torch.randn(shape, generator=gen, dtype=dtype).softmax(dim).requires_grad_()
    weight = torch.rand(shape[dim], generator=gen, dtype=dtype) + 0.1 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    ours = xent.cross_entropy(x, q, **kwargs)
    ref = F.cross_entropy(x, q, **kwargs)
    assert_close(ours, ref, TOL[dtype])
    upstream = torch.randn(ours.shape, generator=gen, dtype=dtype)
    g_ours = torch.autograd.grad(ours, (x, q), upstream)
    g_ref = torch.autograd.grad(ref, (x, q), upstream)
    assert_close(g_ours[0], g_ref[0], TOL[dtype])
    assert_close(g_ours[1], g_ref[1], TOL[dtype])


@pytest.mark.parametrize(
    ("shape", "dtype", "reduction", "weighted", "ignore"),
    [(s, d, r, w, i) for s, d, r, w, i, e in GRID if e == 0.0],
)
def test_nll_loss_matches_torch(shape, dtype, reduction, weighted, ignore):
    gen = torch.Generator().manual_seed(hash((shape, reduction, weighted, ignore)) % 2**31)
    dim = _class_dim(shape)
    log_p = torch.randn(shape, generator=gen, dtype=dtype).log_softmax(dim).requires_grad_()
    target = _index_target(shape, gen, ignore)
    weight = torch.rand(shape[dim], generator=gen, dtype=dtype) if weighted else None
    kwargs = dict(weight=weight, reduction=reduction)
    if ignore is not None:
        kwargs["ignore_index"] = ignore
    ours = xent.nll_loss(log_p, target, **kwargs)
    ref = F.nll_loss(log_p, target, **kwargs)
    assert_close(ours, ref, TOL[dtype])
    upstream = torch.randn(ours.shape, generator=gen, dtype=dtype)
    (g_ours,) = torch.autograd.grad(ours, log_p, upstream)
    (g_ref,) = torch.autograd.grad(ref, log_p, upstream)
    assert_close(g_ours, g_ref, TOL[dtype])


def test_every_option_at_once_odd_shape():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 7, 41, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (9, 41), generator=gen)
    target[::2, ::5] = 3
    weight = torch.randn(7, generator=gen, dtype=torch.float64).abs() + 0.05
    kwargs = dict(weight=weight, ignore_index=3, reduction="mean", label_smoothing=0.15)
    ours = xent.cross_entropy(x, target, **kwargs)
    ref = F.cross_entropy(x, target, **kwargs)
    assert_close(ours, ref, 1e-12)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], 1e-12)


# ---------------------------------------------------------------------------------------------
# Gradients: gradcheck and double backward in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_cross_entropy_gradcheck_and_gradgradcheck(reduction, eps):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (4, 3), generator=gen)
    target[0, 0] = -100
    weight = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5

    def f(x):
        return xent.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=eps)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_gradcheck_and_gradgradcheck(reduction):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.rand(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5

    def f(x, q):
        return xent.cross_entropy(x, q, weight, reduction=reduction, label_smoothing=0.2)

    assert torch.autograd.gradcheck(f, (x, q))
    assert torch.autograd.gradgradcheck(f, (x, q))


def test_nll_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 2, 1, 1])

    def f(x):
        return xent.nll_loss(x, target, torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64))

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_double_backward_matches_torch_hessian_vector_product():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (5,), generator=gen)
    v = torch.randn(5, 6, generator=gen, dtype=torch.float64)

    def hvp(fn):
        (g,) = torch.autograd.grad(fn(x, target, label_smoothing=0.1), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    assert_close(hvp(xent.cross_entropy), hvp(F.cross_entropy), 1e-12)


# ---------------------------------------------------------------------------------------------
# Edge cases from SEMANTICS.md
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction):
    x = torch.randn(4, 3, requires_grad=True)
    target = torch.full((4,), -100)
    ours = xent.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    assert_close(ours, ref, 0)
    if reduction == "mean":
        assert torch.isnan(ours)
    ours.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probs", [False, True])
def test_empty_batch(reduction, probs):
    x = torch.randn(0, 3, requires_grad=True)
    target = torch.zeros(0, 3) if probs else torch.zeros(0, dtype=torch.long)
    ours = xent.cross_entropy(x, target, reduction=reduction)
    assert_close(ours, F.cross_entropy(x, target, reduction=reduction), 0)
    ours.sum().backward()
    assert x.grad.shape == (0, 3)


def test_ignore_index_outside_class_range_is_valid():
    x = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 255, 1, 2])
    assert_close(
        xent.cross_entropy(x, target, ignore_index=255),
        F.cross_entropy(x, target, ignore_index=255),
        1e-12,
    )


@pytest.mark.parametrize("bad", [3, 5, -1, -3])
@pytest.mark.parametrize("fn", [xent.cross_entropy, xent.nll_loss])
def test_out_of_range_target_raises_index_error_naming_it(bad, fn):
    target = torch.tensor([0, 1, bad, 2])
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds"):
        fn(torch.randn(4, 3), target)
    with pytest.raises(IndexError):
        F.cross_entropy(torch.randn(4, 3), target)


def test_negative_weights_and_zero_total_weight():
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    assert_close(xent.cross_entropy(x, target, weight), F.cross_entropy(x, target, weight), 1e-12)
    # Σ w_y = 0 with a non-zero numerator: ±inf, and the same non-finite gradient pattern.
    target = torch.tensor([0, 1, 1])
    weight = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    ours, ref = xent.cross_entropy(x, target, weight), F.cross_entropy(x, target, weight)
    assert_close(ours, ref, 1e-12)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], 1e-12)
    # All weights zero: 0 / 0.
    assert torch.isnan(xent.cross_entropy(x, target, torch.zeros(3, dtype=torch.float64)))


@pytest.mark.parametrize(("target", "eps"), [(0, 0.0), (1, 0.0), (0, 0.1), (1, 0.1)])
def test_minus_inf_logits(target, eps):
    x = torch.tensor([[0.0, -torch.inf, 1.0], [2.0, -torch.inf, -torch.inf]], requires_grad=True)
    t = torch.tensor([target, 0])
    ours = xent.cross_entropy(x, t, label_smoothing=eps)
    ref = F.cross_entropy(x, t, label_smoothing=eps)
    assert_close(ours, ref, 1e-6)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], 1e-6)
    if target == 0 and eps == 0.0:
        assert torch.isfinite(ours)
        assert torch.autograd.grad(xent.cross_entropy(x, t), x)[0][0, 1] == 0


@pytest.mark.parametrize("value", [torch.inf, torch.nan])
def test_non_finite_logits_follow_torch(value):
    x = torch.tensor([[value, 0.0, 1.0], [0.5, 0.1, 0.2]])
    t = torch.tensor([1, 2])
    assert_close(
        xent.cross_entropy(x, t, reduction="none"),
        F.cross_entropy(x, t, reduction="none"),
        1e-6,
    )


def test_shift_invariance_large_offset_fp32():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(16, 10, generator=gen)
    t = torch.randint(0, 10, (16,), generator=gen)
    base = xent.cross_entropy(x, t, reduction="none")
    shifted = xent.cross_entropy(x + 1e4, t, reduction="none")
    torch.testing.assert_close(shifted, base, atol=2e-3, rtol=0)  # fp32 spacing at 1e4 is 1e-3
    assert torch.isfinite(xent.cross_entropy(x * 1e30, t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_floor(dtype):
    gen = torch.Generator().manual_seed(9)
    x64 = 4 * torch.randn(257, 33, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 33, (257,), generator=gen)
    x = x64.to(dtype).requires_grad_()
    exact = F.cross_entropy(x.detach().double(), t, reduction="none")
    ours = xent.cross_entropy(x, t, reduction="none")
    theirs = F.cross_entropy(x, t, reduction="none")
    assert ours.dtype == dtype
    floor = (theirs.double() - exact).abs()
    assert ((ours.double() - exact).abs() <= floor + 1e-2 * exact.abs() + 1e-3).all()
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.dtype == dtype
    xd = x.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad(F.cross_entropy(xd, t, reduction="sum"), xd)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    g_floor = (g_theirs.double() - g_exact).abs()
    assert ((g.double() - g_exact).abs() <= g_floor + 1e-3).all()


def test_fp16_mean_over_many_rows_stays_finite():
    # PyTorch's CPU kernel accumulates the fp16 mean in fp16 and returns NaN here (deviation).
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(70_000, 8, generator=gen).half().requires_grad_()
    t = torch.randint(0, 8, (70_000,), generator=gen)
    ours = xent.cross_entropy(x, t)
    exact = F.cross_entropy(x.detach().float(), t)
    assert torch.isfinite(ours)
    assert abs(ours.float() - exact) < 2e-3
    ours.backward()
    assert x.grad.abs().sum() > 0


def test_probability_targets_are_not_normalised():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    q = torch.rand(5, 4, generator=gen, dtype=torch.float64).softmax(1)
    assert_close(xent.cross_entropy(x, 2 * q), 2 * xent.cross_entropy(x, q), 1e-12)


TARGET_DTYPES = (torch.int64, torch.uint8, torch.int32, torch.int16, torch.int8, torch.bool)
TARGET_SHAPES = [
    ((7,), ()),
    ((4, 3), (4,)),
    ((0, 3), (0,)),
    ((2, 3, 4), (2, 4)),
    ((2, 3, 0), (2, 0)),
]


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss"])
@pytest.mark.parametrize("shapes", TARGET_SHAPES, ids=str)
def test_target_dtypes_follow_torch(fn, shapes):
    # int64 always, uint8 for ()/(N) targets or empty reduced spatial ones; the rest raise
    # PyTorch's RuntimeError, with its message first.
    shape, target_shape = shapes
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 3, target_shape, generator=torch.Generator().manual_seed(4))
    for dtype in TARGET_DTYPES:
        for reduction in ("none", "mean", "sum"):
            if fn[0].isupper():
                ours, theirs = (
                    getattr(xent.nn, fn)(reduction=reduction),
                    getattr(torch.nn, fn)(reduction=reduction),
                )
            else:
                ours = partial(getattr(xent, fn), reduction=reduction)
                theirs = partial(getattr(F, fn), reduction=reduction)
            try:
                expected = theirs(x, t.to(dtype))
            except RuntimeError as exc:
                with pytest.raises(RuntimeError) as info:
                    ours(x, t.to(dtype))
                assert str(info.value).startswith(str(exc)), (dtype, reduction)
                assert str(dtype) in str(info.value)
                continue
            assert_close(ours(x, t.to(dtype)), expected, 1e-12)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_reduction_names_value_and_choices():
    with pytest.raises(
        ValueError, match=r"'batchmean' is not a valid value.*'none', 'mean', 'sum'"
    ):
        xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="batchmean")
    with pytest.raises(ValueError, match="'avg'"):
        xent.nll_loss(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range_raises(eps):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\], got {eps}"):
        xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=eps)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"input batch_size \(4\).*target batch_size \(3\)"):
        xent.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"Expected target size \[2, 4\], got \[2, 5\]"):
        xent.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"all 3 classes.*\[4\]"):
        xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), weight=torch.ones(4))
    with pytest.raises(RuntimeError, match=r"got torch\.int64"):
        xent.cross_entropy(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"Long or Byte, but got Float \(torch\.float32\)"):
        xent.cross_entropy(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="ignore_index=1"):
        xent.cross_entropy(torch.randn(2, 3), torch.rand(2, 3), ignore_index=1)
    with pytest.raises(ValueError, match="0-d"):
        xent.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(TypeError, match=r"torch\.int64"):
        xent.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))


def _prob_case(n=5, c=4, dtype=torch.float64, seed=21):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=dtype).requires_grad_()
    q = torch.rand(n, c, generator=gen, dtype=dtype).softmax(1).requires_grad_()
    w = (torch.rand(c, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    return x, q, w


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_prob_target_class_weight_gradient_matches_torch(impl, reduction, eps):
    # PyTorch differentiates the class weights of probability targets; so does xent.
    x, q, w = _prob_case()
    g = torch.rand(5, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    ours = torch.autograd.grad((xent.cross_entropy(x, q, impl=impl, **kw) * g).sum(), (x, q, w))
    theirs = torch.autograd.grad((F.cross_entropy(x, q, **kw) * g).sum(), (x, q, w))
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b, 1e-12)


def test_prob_target_class_weight_gradient_fp16_and_options():
    # fp16 logits keep only the statistics (the recomputing backward); a soft cap and a z-loss
    # leave dL/dw = Σ_i c_i (-q'_i log p_i) with p from the capped logits.
    x, _, _ = _prob_case(dtype=torch.float16)
    _, q, w = _prob_case(dtype=torch.float32)
    (gw,) = torch.autograd.grad(xent.cross_entropy(x, q, weight=w), (w,))
    (rw,) = torch.autograd.grad(F.cross_entropy(x.float(), q, weight=w), (w,))
    assert_close(gw, rw, 2e-3)
    x, q, w = _prob_case()
    capped = xent.cross_entropy(x, q, weight=w, softcap=3.0, z_loss=0.1, reduction="sum")
    (gw,) = torch.autograd.grad(capped, (w,))
    log_p = (3.0 * torch.tanh(x / 3.0)).log_softmax(1)
    assert_close(gw, -(q * log_p).sum(0), 1e-12)


def test_prob_target_class_weight_gradient_edge_cases():
    # inplace_backward gives way to the weight's gradient (it needs the logits); with no class
    # the gradient is empty, as in PyTorch.
    x, q, w = _prob_case()
    ours = torch.autograd.grad(xent.cross_entropy(x, q, w, inplace_backward=True), (x, w))
    theirs = torch.autograd.grad(F.cross_entropy(x, q, w), (x, w))
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b, 1e-12)
    x0, w0 = torch.randn(3, 0, requires_grad=True), torch.ones(0, requires_grad=True)
    for reduction in ("none", "sum"):
        (g,) = torch.autograd.grad(
            xent.cross_entropy(x0, torch.rand(3, 0), w0, reduction=reduction).sum(), (w0,)
        )
        assert g.shape == (0,)


def test_prob_target_class_weight_gradcheck():
    x, q, w = _prob_case(n=3, c=4)
    for reduction in ("none", "mean"):
        fn = partial(xent.cross_entropy, reduction=reduction, label_smoothing=0.1)
        assert torch.autograd.gradcheck(fn, (x, q, w))  # weight is the third argument
        assert torch.autograd.gradgradcheck(fn, (x, q, w))


def test_prob_target_class_weight_under_torch_func():
    x, q, w = _prob_case()
    x, q, w = x.detach(), q.detach(), w.detach()
    ours = torch.func.jacrev(lambda w: xent.cross_entropy(x, q, weight=w, reduction="none"))(w)
    theirs = torch.func.jacrev(lambda w: F.cross_entropy(x, q, weight=w, reduction="none"))(w)
    assert_close(ours, theirs, 1e-12)
    v = torch.rand_like(w)
    ours = torch.func.jvp(lambda w: xent.cross_entropy(x, q, weight=w), (w,), (v,))[1]
    theirs = torch.func.jvp(lambda w: F.cross_entropy(x, q, weight=w), (w,), (v,))[1]
    assert_close(ours, theirs, 1e-12)


def test_prob_target_class_weight_under_torch_compile():
    x, q, w = _prob_case(dtype=torch.float32)

    def step(x, q, w):
        return xent.cross_entropy(x, q, weight=w, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ours = torch.autograd.grad(compiled(x, q, w), (x, q, w))
    theirs = torch.autograd.grad(F.cross_entropy(x, q, weight=w, label_smoothing=0.1), (x, q, w))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_weight_requiring_grad_is_refused():
    with pytest.raises(RuntimeError, match="not differentiable"):
        xent.cross_entropy(
            torch.randn(2, 3), torch.tensor([0, 1]), weight=torch.ones(3, requires_grad=True)
        )


def test_one_dimensional_input():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for target in (torch.tensor(3), torch.rand(5, dtype=torch.float64)):
        for reduction in ("mean", "none"):
            ours = xent.cross_entropy(x, target, reduction=reduction)
            ref = F.cross_entropy(x, target, reduction=reduction)
            assert_close(ours, ref, 1e-12)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

rows = st.integers(1, 6)
classes = st.integers(2, 7)
seeds = st.integers(0, 2**31 - 1)


def _random_problem(n: int, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = 5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=gen)
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    return x, target, weight


@settings(max_examples=40, deadline=None)
@given(n=rows, c=classes, seed=seeds)
def test_ignoring_a_row_equals_dropping_it(n, c, seed):
    x, target, weight = _random_problem(n + 1, c, seed)
    ignored = target.clone()
    ignored[0] = -100
    full = xent.cross_entropy(x, ignored, weight, label_smoothing=0.1)
    dropped = xent.cross_entropy(x[1:], target[1:], weight, label_smoothing=0.1)
    torch.testing.assert_close(full, dropped, atol=1e-12, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=rows, c=classes, seed=seeds, eps=st.floats(0.0, 1.0))
def test_index_target_equals_smoothed_one_hot(n, c, seed, eps):
    # Without weights the means agree (with weights PyTorch normalises them differently).
    x, target, weight = _random_problem(n, c, seed)
    one_hot = F.one_hot(target, c).double()
    smoothed = (1 - eps) * one_hot + eps / c
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(
            xent.cross_entropy(x, target, reduction=reduction, label_smoothing=eps),
            xent.cross_entropy(x, smoothed, reduction=reduction),
            atol=1e-10,
            rtol=1e-10,
        )
    # Weighted, per element, the two forms agree as well.
    torch.testing.assert_close(
        xent.cross_entropy(x, target, weight, reduction="none"),
        xent.cross_entropy(x, one_hot, weight, reduction="none"),
        atol=1e-10,
        rtol=1e-10,
    )


@settings(max_examples=40, deadline=None)
@given(n=rows, c=classes, seed=seeds, shift=st.floats(-1e3, 1e3))
def test_shift_invariance(n, c, seed, shift):
    x, target, weight = _random_problem(n, c, seed)
    torch.testing.assert_close(
        xent.cross_entropy(x + shift, target, weight, label_smoothing=0.2),
        xent.cross_entropy(x, target, weight, label_smoothing=0.2),
        atol=1e-9,
        rtol=1e-9,
    )


@settings(max_examples=40, deadline=None)
@given(n=rows, c=classes, seed=seeds)
def test_cross_entropy_is_nll_of_log_softmax(n, c, seed):
    x, target, weight = _random_problem(n, c, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(
            xent.cross_entropy(x, target, weight),
            xent.nll_loss(xent.log_softmax(x, 1), target, weight),
            atol=1e-12,
            rtol=1e-12,
        )


# ---------------------------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [xent.cross_entropy, xent.nll_loss])
def test_small_integer_targets_do_not_wrap_around_ignore_index(fn):
    # In uint8, -100 is 156: a real class 156 must not be ignored, nor an out-of-range 156 pass.
    x = torch.randn(4, 200, dtype=torch.float64).log_softmax(1)
    t = torch.tensor([156, 3, 5, 7], dtype=torch.uint8)
    torch.testing.assert_close(fn(x, t), getattr(F, fn.__name__)(x, t.long()))
    with pytest.raises(IndexError, match="Target 156 is out of bounds"):
        fn(torch.randn(2, 10), torch.tensor([156, 3], dtype=torch.uint8))
    # Nor may ignore_index=-1 ignore a uint8 255 (which is -1 wrapped around).
    with pytest.raises(IndexError, match="Target 255 is out of bounds"):
        fn(torch.randn(2, 10), torch.tensor([255, 3], dtype=torch.uint8), ignore_index=-1)


def test_fp16_gradient_survives_loss_scaling():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4096, 512, generator=gen).half().requires_grad_()
    t = torch.randint(0, 512, (4096,), generator=gen)
    (xent.cross_entropy(x, t, label_smoothing=0.1) * 4096).backward()
    ours = x.grad.double()
    x.grad = None
    (F.cross_entropy(x, t, label_smoothing=0.1) * 4096).backward()
    theirs = x.grad.double()
    xd = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(F.cross_entropy(xd, t, label_smoothing=0.1) * 4096, xd)
    err = lambda g: ((g - exact).abs().sum() / exact.abs().sum()).item()  # noqa: E731
    assert err(ours) <= 2 * err(theirs) + 1e-4
    assert (ours == 0).float().mean() <= (theirs == 0).float().mean() + 1e-3


def test_no_grad_computes_no_gradient_and_never_overwrites():
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    before = x.detach().clone()
    with torch.no_grad():
        loss = xent.cross_entropy(x, t, inplace_backward=True)
    torch.testing.assert_close(loss, F.cross_entropy(before, t))
    assert torch.equal(x.detach(), before)


def test_compiled_operator_passes_opcheck():
    from xent._engine.options import CEParams

    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.xent.cross_entropy_fwd,
            (x, t, None, reduction, "torch", CEParams().options(), [True, False]),
        )
