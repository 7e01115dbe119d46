"""xent.linear_cross_entropy and xent.nn.LinearCrossEntropyLoss against PyTorch's own
``F.linear_cross_entropy`` and ``nn.LinearCrossEntropyLoss`` on the same inputs: K-dimensional
weights, probability targets, ``options=`` and autocast, in every floating dtype."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import xent
from xent.fused import _chunk_tokens

# (loss, gradient) tolerances as (rtol, atol) against PyTorch in the same dtype. In bf16/fp16
# PyTorch rounds the logits (and, for fp16, the softmax) to the input's dtype before the loss;
# xent keeps them in fp32, so the two differ by a few of the dtype's ulps.
TOL = {
    torch.float64: ((1e-12, 1e-12), (1e-10, 1e-12)),
    torch.float32: ((2e-6, 2e-6), (2e-5, 2e-6)),
    torch.bfloat16: ((2e-2, 2e-2), (5e-2, 2e-2)),
    torch.float16: ((4e-3, 4e-3), (1e-2, 2e-3)),
}
DTYPES = list(TOL)


def _problem(dtype, out_features, probs, n=7, h=6, c=5, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = torch.randn(c, *out_features, h, generator=gen, dtype=torch.float64) / h**0.5
    b = torch.randn(c, *out_features, generator=gen, dtype=torch.float64) if bias else None
    if probs:
        t = torch.randn(n, c, *out_features, generator=gen, dtype=torch.float64).softmax(1)
        t = t.to(dtype).requires_grad_()
    else:
        t = torch.randint(0, c, (n, *out_features), generator=gen)
        t.view(-1)[::3] = -100  # ignored positions (PyTorch's default ignore_index)
    leaves = [v.to(dtype).requires_grad_() for v in (x, w, b) if v is not None]
    return leaves, t


def _loss_and_grads(fn, leaves, t, upstream, **kw):
    x, w, *rest = leaves
    b = rest[0] if rest else None
    loss = fn(x, w, t, linear_bias=b, **kw)
    params = [*leaves, *([t] if t.is_floating_point() else [])]
    grads = torch.autograd.grad(loss, params, upstream(loss))
    return loss, grads


def _upstream(loss):
    gen = torch.Generator().manual_seed(5)
    return torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype) + 0.5


@pytest.mark.parametrize(
    ("dtype", "out_features", "probs", "reduction"),
    list(itertools.product(DTYPES, [(), (3,), (2, 3)], [False, True], ["mean", "sum", "none"])),
)
def test_function_matches_torch(dtype, out_features, probs, reduction):
    leaves, t = _problem(dtype, out_features, probs)
    kw = dict(reduction=reduction)
    ours, g_ours = _loss_and_grads(xent.linear_cross_entropy, leaves, t, _upstream, **kw)
    ref, g_ref = _loss_and_grads(F.linear_cross_entropy, leaves, t, _upstream, **kw)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    (lr, la), (gr, ga) = TOL[dtype]
    torch.testing.assert_close(ours, ref, rtol=lr, atol=la)
    assert len(g_ours) == len(g_ref)
    for a, r in zip(g_ours, g_ref, strict=True):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=gr, atol=ga)


@pytest.mark.parametrize(
    ("out_features", "probs", "options"),
    list(
        itertools.product(
            [(), (2, 3)],
            [False, True],
            [
                dict(label_smoothing=0.2),
                dict(weight="w"),
                dict(label_smoothing=0.1, weight="w", reduction="none"),
            ],
        )
    ),
)
def test_function_options_match_torch_float64(out_features, probs, options):
    leaves, t = _problem(torch.float64, out_features, probs, seed=3)
    kw = dict(options)
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.2, 1.7, 5, dtype=torch.float64)
    ours, g_ours = _loss_and_grads(xent.linear_cross_entropy, leaves, t, _upstream, **kw)
    ref, g_ref = _loss_and_grads(F.linear_cross_entropy, leaves, t, _upstream, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # The materialising path agrees too.
    x, w, b = leaves
    again = xent.linear_cross_entropy(x, w, t, linear_bias=b, impl="reference", **kw)
    torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_probability_target_chunks_agree(chunk):
    leaves, q = _problem(torch.float64, (), True, n=11)
    x, w, b = leaves
    ref = F.linear_cross_entropy(x, w, q, linear_bias=b, reduction="none")
    ours = xent.linear_cross_entropy(x, w, q, linear_bias=b, reduction="none", chunk_size=chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref.sum(), [q])[0]
    g_ours = torch.autograd.grad(ours.sum(), [q])[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_unbatched_input_and_batched_leading_axes():
    leaves, _ = _problem(torch.float64, (), False, n=6)
    x, w, b = leaves
    # (H) input: a 0-d index target or a (C) probability target, as in PyTorch.
    for target in (torch.tensor(3), torch.rand(5, dtype=torch.float64).softmax(0)):
        ours = xent.linear_cross_entropy(x[0], w, target, linear_bias=b)
        ref = F.linear_cross_entropy(x[0], w, target, linear_bias=b)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # xent also takes (..., H) inputs (PyTorch: at most one batch axis); the class axis of a
    # probability target follows the batch axes.
    q = torch.rand(2, 3, 5, dtype=torch.float64).softmax(-1)
    ours = xent.linear_cross_entropy(x.reshape(2, 3, -1), w, q, reduction="none")
    ref = F.linear_cross_entropy(x, w, q.reshape(6, 5), reduction="none").reshape(2, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_ignore_index_default_and_explicit():
    leaves, t = _problem(torch.float64, (3,), False)
    x, w, _ = leaves
    t = t.clone()
    t[t == -100] = 2
    for ignore in (None, 2, -100):
        ours = xent.linear_cross_entropy(x, w, t, ignore_index=ignore)
        ref = F.linear_cross_entropy(x, w, t, ignore_index=ignore)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    q = torch.rand(7, 5, 3, dtype=torch.float64).softmax(1)
    with pytest.raises(RuntimeError, match="ignore_index"):
        F.linear_cross_entropy(x, w, q, ignore_index=-100)
    with pytest.raises(RuntimeError, match="ignore_index"):
        xent.linear_cross_entropy(x, w, q, ignore_index=-100)


# --------------------------------------------------------------------------------------------
# options=
# --------------------------------------------------------------------------------------------

OPTIONS = [
    dict(),
    dict(batch_chunk_size=3),
    dict(chunking_method="aspect_ratio"),
    dict(chunking_method="aspect_ratio:4"),
    dict(chunking_method=None),
    dict(chunking_method=None, batch_chunk_size=5),
    dict(acc_policy="compact", acc_dtype=torch.float32),
]


@pytest.mark.parametrize("fields", OPTIONS)
def test_options_give_torch_chunk_sizes_and_values(fields):
    options = torch.nn.LinearCrossEntropyOptions(**fields)
    for n, h, c in [(37, 4, 9), (64, 8, 1000), (5, 16, 3)]:
        adjusted = options._adjust(n, h, c, torch.float32, torch.device("cpu"))
        ours = _chunk_tokens(None, options, n, h, c)
        if fields.get("chunking_method", "auto") == "auto" and "batch_chunk_size" not in fields:
            assert ours is None  # "auto": xent's own default chunk
        else:
            assert ours == adjusted.batch_chunk_size
    leaves, t = _problem(torch.float64, (), False, n=13)
    x, w, b = leaves
    ours = xent.linear_cross_entropy(x, w, t, linear_bias=b, options=options)
    ref = F.linear_cross_entropy(x, w, t, linear_bias=b)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_options_conflicts_are_refused():
    x, w, t = torch.randn(6, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    clash = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3, chunking_method="aspect_ratio")
    with pytest.raises(ValueError, match="disagree"):
        xent.linear_cross_entropy(x, w, t, options=clash)
    with pytest.raises(ValueError, match="chunk_size=2"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
        xent.linear_cross_entropy(x, w, t, options=options, chunk_size=2)
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):
        xent.linear_cross_entropy(x, w, t, options={"batch_chunk_size": 3})


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "out_features", "probs"),
    list(itertools.product(DTYPES, [(), (2, 3)], [False, True])),
)
def test_module_matches_torch(dtype, out_features, probs):
    kw = dict(out_features=out_features, bias=True, dtype=dtype, label_smoothing=0.1)
    torch.manual_seed(0)
    ref_mod = torch.nn.LinearCrossEntropyLoss(6, 5, **kw)
    torch.manual_seed(0)
    mod = xent.nn.LinearCrossEntropyLoss(6, 5, **kw)
    assert {k: v.shape for k, v in mod.state_dict().items()} == {
        k: v.shape for k, v in ref_mod.state_dict().items()
    }
    for a, r in zip(mod.parameters(), ref_mod.parameters(), strict=True):
        assert torch.equal(a, r)
    (x, *_), t = _problem(dtype, out_features, probs)
    ours, ref = mod(x, t), ref_mod(x, t)
    (lr, la), (gr, ga) = TOL[dtype]
    torch.testing.assert_close(ours, ref, rtol=lr, atol=la)
    ours.backward()
    ref.backward()
    for a, r in [(x.grad, None), *zip(mod.parameters(), ref_mod.parameters(), strict=True)]:
        if r is None:
            continue
        torch.testing.assert_close(a.grad, r.grad, rtol=gr, atol=ga)


def test_module_options_weight_and_extras():
    weight = torch.linspace(0.5, 1.5, 5)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    torch.manual_seed(1)
    ref_mod = torch.nn.LinearCrossEntropyLoss(4, 5, weight=weight, options=options)
    torch.manual_seed(1)
    mod = xent.nn.LinearCrossEntropyLoss(4, 5, weight=weight, options=options, z_loss=0.0)
    x, t = torch.randn(9, 4), torch.randint(0, 5, (9,))
    torch.testing.assert_close(mod(x, t), ref_mod(x, t))
    assert torch.equal(mod.weight, weight)
    with pytest.raises(RuntimeError, match=r"weight shape"):
        xent.nn.LinearCrossEntropyLoss(4, 5, weight=torch.ones(4))


# --------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("autocast_dtype", "probs"),
    list(itertools.product([torch.bfloat16, torch.float16], [False, True])),
)
def test_autocast_matches_torch(autocast_dtype, probs):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=gen).to(autocast_dtype).requires_grad_()  # a region's output
    w = (torch.randn(5, 6, generator=gen) / 6**0.5).requires_grad_()  # an fp32 head
    b = torch.randn(5, generator=gen).requires_grad_()
    t = torch.randn(9, 5, generator=gen).softmax(1) if probs else torch.randint(0, 5, (9,))
    results = []
    for fn in (xent.linear_cross_entropy, F.linear_cross_entropy):
        with torch.autocast("cpu", autocast_dtype):
            loss = fn(x, w, t, linear_bias=b)
        results.append((loss, torch.autograd.grad(loss, [x, w, b])))
    (ours, g_ours), (ref, g_ref) = results
    assert ours.dtype == ref.dtype == torch.float32
    (lr, la), (gr, ga) = TOL[autocast_dtype]
    torch.testing.assert_close(ours, ref, rtol=lr, atol=la)
    for a, r, leaf in zip(g_ours, g_ref, (x, w, b), strict=True):
        assert a.dtype == r.dtype == leaf.dtype
        torch.testing.assert_close(a, r, rtol=gr, atol=ga)


def test_autocast_module_and_mixed_dtypes_outside_autocast():
    torch.manual_seed(3)
    ref_mod = torch.nn.LinearCrossEntropyLoss(6, 5, bias=True)
    torch.manual_seed(3)
    mod = xent.nn.LinearCrossEntropyLoss(6, 5, bias=True)
    x, t = torch.randn(8, 6).bfloat16(), torch.randint(0, 5, (8,))
    with torch.autocast("cpu", torch.bfloat16):
        ours, ref = mod(x, t), ref_mod(x, t)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    # Outside an autocast region the dtypes must agree, as for F.linear.
    with pytest.raises(RuntimeError):
        ref_mod(x, t)
    with pytest.raises(RuntimeError, match="same dtype"):
        mod(x, t)


@pytest.mark.parametrize(
    ("out_features", "probs", "reduction"),
    list(itertools.product([(), (2,)], [False, True], ["mean", "none"])),
)
def test_triton_kernel_on_k_dim_and_probabilities(out_features, probs, reduction):
    pytest.importorskip("triton")
    leaves, t = _problem(torch.float32, out_features, probs, n=5)
    kw = dict(reduction=reduction, impl="triton", chunk_size=2)
    ours, g_ours = _loss_and_grads(xent.linear_cross_entropy, leaves, t, _upstream, **kw)
    kw = dict(reduction=reduction)
    ref, g_ref = _loss_and_grads(F.linear_cross_entropy, leaves, t, _upstream, **kw)
    (lr, la), (gr, ga) = TOL[torch.float32]
    torch.testing.assert_close(ours, ref, rtol=lr, atol=la)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=gr, atol=ga)
