"""xent.linear_cross_entropy against F.linear + F.cross_entropy, torch's own fused op, and the
in-package reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from oracles import Counted, torch_linear_cross_entropy

import xent


def _problem(n=29, h=12, v=41, dtype=torch.float64, seed=0, ignore_every=5, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype)
    w.requires_grad_()
    b = (
        torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        if bias
        else None
    )
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, b, t


def _grads(loss, params, upstream):
    return torch.autograd.grad(loss, [p for p in params if p is not None], upstream)


OPTION_SETS = [
    {},
    dict(label_smoothing=0.15),
    dict(z_loss=1e-2),
    dict(softcap=4.0),
    dict(weight="w"),
    dict(token_weight="t"),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, weight="w", token_weight="t"),
]


@pytest.mark.parametrize(
    ("opts", "reduction", "chunk"),
    list(itertools.product(OPTION_SETS, ["mean", "sum", "none"], [None, 1, 7, 1000])),
)
def test_matches_materialised_torch_float64(opts, reduction, chunk):
    x, w, b, t = _problem()
    gen = torch.Generator().manual_seed(1)
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(w.shape[0], generator=gen, dtype=torch.float64) + 0.1
    if kw.get("token_weight") == "t":
        kw["token_weight"] = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 2
    ours = xent.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk, **kw
    )
    ref = torch_linear_cross_entropy(x, w, b, t, reduction=reduction, **kw)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    for g_ours, g_ref in zip(_grads(ours, (x, w, b), up), _grads(ref, (x, w, b), up), strict=True):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_impl_is_the_same_function(reduction):
    x, w, b, t = _problem(seed=3)
    kw = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    fused = xent.linear_cross_entropy(x, w, t, **kw)
    ref = xent.linear_cross_entropy(x, w, t, impl="reference", **kw)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        xent.linear_cross_entropy_reference(x, w, t, **kw), ref, atol=0, rtol=0
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_matches_torch_linear_cross_entropy(reduction, label_smoothing):
    x, w, b, t = _problem(n=64, h=16, v=100, dtype=torch.float32, seed=4)
    kw = dict(linear_bias=b, reduction=reduction, label_smoothing=label_smoothing)
    ours = xent.linear_cross_entropy(x, w, t, ignore_index=-100, **kw)
    theirs = F.linear_cross_entropy(x, w, t, ignore_index=-100, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if label_smoothing == 0.0:  # torch's chunked path supports no smoothing
        chunked = F.linear_cross_entropy(
            x, w, t, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions(), **kw
        )
        torch.testing.assert_close(ours, chunked, atol=1e-5, rtol=1e-5)
    up = torch.ones_like(ours)
    for g_ours, g_ref in zip(
        _grads(ours, (x, w, b), up), _grads(theirs, (x, w, b), up), strict=True
    ):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torchs_own_error(dtype):
    x64, w64, b64, t = _problem(n=67, h=32, v=203, seed=5)
    x, w, b = (p.detach().to(dtype).requires_grad_() for p in (x64, w64, b64))
    ours = xent.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16)
    theirs = F.cross_entropy(F.linear(x, w, b), t)
    exact = torch_linear_cross_entropy(
        *(p.detach().double().requires_grad_() for p in (x, w, b)), t
    )
    assert ours.dtype == dtype
    floor = (theirs.double() - exact).abs().item()
    assert abs(ours.double() - exact).item() <= floor + 1e-3
    # Gradients: every element within torch's same-dtype error plus a small tolerance.
    g_ours = _grads(ours, (x, w, b), torch.ones((), dtype=dtype))
    g_theirs = _grads(theirs, (x, w, b), torch.ones((), dtype=dtype))
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    g_exact = _grads(
        torch_linear_cross_entropy(xd, wd, bd, t), (xd, wd, bd), torch.ones((), dtype=torch.float64)
    )
    for go, gt, ge in zip(g_ours, g_theirs, g_exact, strict=True):
        assert go.dtype == dtype
        err, err_floor = (go.double() - ge).abs(), (gt.double() - ge).abs()
        scale = ge.abs().max().item()
        assert (err <= err_floor + 2e-2 * scale).all()


def test_chunk_where_every_token_is_ignored_and_all_ignored():
    x, w, b, t = _problem(n=12, ignore_every=0, seed=6)
    t[4:8] = -100  # with chunk_size=4 the second chunk is entirely ignored
    ours = xent.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4)
    ref = torch_linear_cross_entropy(x, w, b, t)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    for go, gr in zip(_grads(ours, (x, w, b), None), _grads(ref, (x, w, b), None), strict=True):
        torch.testing.assert_close(go, gr, atol=1e-12, rtol=1e-12)
    t_all = torch.full_like(t, -100)
    for reduction in ("mean", "sum", "none"):
        ours = xent.linear_cross_entropy(x, w, t_all, linear_bias=b, reduction=reduction)
        ref = F.cross_entropy(F.linear(x, w, b), t_all, reduction=reduction)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        grads = _grads(ours.sum(), (x, w, b), None)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradient_accumulation_with_normalizer_equals_full_batch():
    x, w, b, t = _problem(n=40, seed=7)
    full = xent.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    g_full = _grads(full, (w, b), None)
    count = (t != -100).sum()  # all target tokens of the whole step
    total = 0.0
    acc = [torch.zeros_like(w), torch.zeros_like(b)]
    for part in torch.arange(40).split(13):  # uneven micro-batches
        micro = xent.linear_cross_entropy(
            x[part], w, t[part], linear_bias=b, label_smoothing=0.1, normalizer=count
        )
        total = total + micro
        for a, g in zip(acc, _grads(micro, (w, b), None), strict=True):
            a += g
    torch.testing.assert_close(total, full, atol=1e-12, rtol=1e-12)
    for a, g in zip(acc, g_full, strict=True):
        torch.testing.assert_close(a, g, atol=1e-12, rtol=1e-12)
    # A plain number works too, and equals the tensor form.
    torch.testing.assert_close(
        xent.linear_cross_entropy(x, w, t, normalizer=25.0),
        xent.linear_cross_entropy(x, w, t, normalizer=torch.tensor(25.0, dtype=torch.float64)),
    )


def test_k_dimensional_input_and_no_bias():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(19, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 19, (3, 5), generator=gen)
    t[1, 2] = -100
    for reduction in ("mean", "none"):
        ours = xent.linear_cross_entropy(x, w, t, reduction=reduction)
        ref = F.cross_entropy(F.linear(x, w).flatten(0, 1), t.flatten(), reduction=reduction)
        assert ours.shape == (() if reduction == "mean" else (3, 5))
        torch.testing.assert_close(ours.flatten(), ref.flatten(), atol=1e-12, rtol=1e-12)
        up = torch.ones_like(ours)
        for go, gr in zip(
            _grads(ours, (x, w), up), _grads(ref, (x, w), up.reshape(ref.shape)), strict=True
        ):
            torch.testing.assert_close(go, gr, atol=1e-12, rtol=1e-12)


def test_gradcheck_and_upstream_scaling():
    x, w, b, t = _problem(n=6, h=3, v=5, seed=9, ignore_every=4)

    def f(x, w, b):
        return xent.linear_cross_entropy(
            x, w, t, linear_bias=b, label_smoothing=0.1, z_loss=0.01, chunk_size=4
        )

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: xent.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction="none", chunk_size=4
        ),
        (x, w, b),
    )


def test_module_form_owns_its_linear_layer():
    x, _, _, t = _problem(seed=10)
    torch.manual_seed(0)
    loss_fn = xent.nn.LinearCrossEntropyLoss(
        12, 41, bias=True, dtype=torch.float64, label_smoothing=0.1, z_loss=0.0
    )
    ours = loss_fn(x, t)
    ref = F.cross_entropy(loss_fn.linear(x), t, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    g_ours = _grads(ours, (loss_fn.linear.weight, loss_fn.linear.bias), None)
    g_ref = _grads(ref, (loss_fn.linear.weight, loss_fn.linear.bias), None)
    for go, gr in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(go, gr, atol=1e-12, rtol=1e-12)
    assert set(loss_fn.state_dict()) == {"linear.weight", "linear.bias"}


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (dict(reduction="avg"), ValueError, "'avg'"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(normalizer=0.0), ValueError, "normalizer must be a finite number > 0, got 0.0"),
        (dict(normalizer=5.0, reduction="sum"), ValueError, "reduction='sum'"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(token_weight=torch.ones(3)), ValueError, r"token_weight must have the target's"),
        (
            dict(linear_bias=torch.ones(7, dtype=torch.float64)),
            RuntimeError,
            r"linear_bias must have shape \(41,\)",
        ),
    ],
)
def test_errors(kwargs, exc, message):
    x, w, _, t = _problem()
    with pytest.raises(exc, match=message):
        xent.linear_cross_entropy(x, w, t, **kwargs)


def test_shape_and_range_errors_name_values():
    x, w, _, t = _problem()
    with pytest.raises(RuntimeError, match=r"got \(41, 13\)"):
        xent.linear_cross_entropy(x, torch.randn(41, 13, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"\(29,\) \(class indices\).*got \(28,\)"):
        xent.linear_cross_entropy(x, w, t[:28])
    t_bad = t.clone()
    t_bad[3] = 41
    with pytest.raises(IndexError, match="Target 41 is out of bounds"):
        xent.linear_cross_entropy(x, w, t_bad)
    with pytest.raises(RuntimeError, match="same dtype"):
        xent.linear_cross_entropy(x, w.float(), t)


def test_fp16_input_gradient_survives_loss_scaling():
    x64, w64, _, t = _problem(n=512, h=32, v=300, seed=11, bias=False)
    x, w = (p.detach().half().requires_grad_() for p in (x64, w64))
    (xent.linear_cross_entropy(x, w, t, chunk_size=64) * 1024).backward()
    ours = x.grad.double()
    x.grad = None
    (F.cross_entropy(F.linear(x, w), t) * 1024).backward()
    theirs = x.grad.double()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double()
    (exact,) = torch.autograd.grad(F.cross_entropy(F.linear(xd, wd), t) * 1024, xd)
    rel = lambda g: ((g - exact).abs().sum() / exact.abs().sum()).item()  # noqa: E731
    assert rel(ours) <= 2 * rel(theirs) + 1e-4


def test_bias_dtype_and_double_backward_errors_are_clear():
    x, w, b, t = _problem()
    with pytest.raises(RuntimeError, match="input and linear_bias must have the same dtype"):
        xent.linear_cross_entropy(x, w, t, linear_bias=b.float())
    loss = xent.linear_cross_entropy(x, w, t)
    with pytest.raises(RuntimeError, match="use impl='reference' for double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    ref = xent.linear_cross_entropy(x, w, t, impl="reference")
    (g,) = torch.autograd.grad(ref, x, create_graph=True)
    assert g.requires_grad


def _emulated_mm_fp32(a, b, out, *, bias=None, accumulate=False):
    """What `torch.mm(a, b, out_dtype=torch.float32)` computes on a GPU (bf16 operands, wide
    accumulators), on the CPU where that operator does not exist: for the data-flow test."""
    prod = a.double() @ b.double()
    if bias is not None:
        prod += bias.double()
    if accumulate:
        prod += out.double()
    return out.copy_(prod)


@pytest.mark.parametrize("drop_ignored", [True, False])
def test_bf16_tensor_core_path_within_torchs_own_error(monkeypatch, drop_ignored):
    # The CUDA bf16 path (fp32 logits from bf16 products, the kernel writing ∂L/∂z in bf16, dX,
    # dW, db from bf16 operands into fp32), with the product emulated, on the CPU.
    from xent._engine import policy, walker

    patches = {
        (walker, "fp32_out_gemms"): Counted(lambda x: x.dtype == torch.bfloat16),
        (walker, "mm_fp32"): Counted(_emulated_mm_fp32),
        (policy, "drop_ignored"): Counted(lambda t: drop_ignored),
    }
    for (module, name), stand_in in patches.items():
        monkeypatch.setattr(module, name, stand_in)
    x64, w64, b64, t = _problem(n=67, h=32, v=203, seed=6)
    x, w, b = (p.detach().to(torch.bfloat16).requires_grad_() for p in (x64, w64, b64))
    for reduction in ("mean", "none"):
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        ours = xent.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16, **kw)
        theirs = torch_linear_cross_entropy(x, w, b, t, **kw)
        xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
        exact = torch_linear_cross_entropy(xd, wd, bd, t, **kw)
        assert ours.dtype == torch.bfloat16
        up = torch.ones_like(exact)
        for go, gt, ge in zip(
            _grads(ours, (x, w, b), up.to(torch.bfloat16)),
            _grads(theirs, (x, w, b), up.to(torch.bfloat16)),
            _grads(exact, (xd, wd, bd), up),
            strict=True,
        ):
            assert go.dtype == torch.bfloat16
            err, err_floor = (go.double() - ge).abs(), (gt.double() - ge).abs()
            assert (err <= err_floor + 2e-2 * ge.abs().max()).all()
        floor = (theirs.double() - exact).abs()
        assert ((ours.double() - exact).abs() <= floor + 1e-2 * exact.abs() + 1e-3).all()
    assert all(stand_in.calls for stand_in in patches.values())  # the patched paths ran


def test_every_token_computed_when_ignored_ones_are_kept(monkeypatch):
    # While a CUDA graph is captured, ignored tokens go through the products with weight 0.
    from xent._engine import policy

    keep_all = Counted(lambda t: False)
    monkeypatch.setattr(policy, "drop_ignored", keep_all)
    x, w, b, t = _problem(seed=7)
    tw = torch.rand(t.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        kw = dict(reduction=reduction, label_smoothing=0.1, token_weight=tw)
        ours = xent.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=7, **kw)
        ref = torch_linear_cross_entropy(x, w, b, t, **kw)
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
        up = torch.randn(ours.shape, dtype=torch.float64)
        for g_ours, g_ref in zip(
            _grads(ours, (x, w, b), up), _grads(ref, (x, w, b), up), strict=True
        ):
            torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-12)
    # Ignored tokens' hidden states (padding, possibly NaN) add nothing, not 0·NaN.
    ignored = (t == -100)[:, None]
    padded = x.detach().masked_fill(ignored, torch.nan).requires_grad_()
    loss = xent.linear_cross_entropy(padded, w, t, linear_bias=b, chunk_size=7)
    ref = torch_linear_cross_entropy(x, w, b, t)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    g_pad, g_w, g_b = torch.autograd.grad(loss, (padded, w, b))
    r_x, r_w, r_b = torch.autograd.grad(ref, (x, w, b))
    torch.testing.assert_close(g_pad, r_x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_w, r_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_b, r_b, atol=1e-12, rtol=1e-12)
    assert keep_all.calls > 0


@pytest.mark.parametrize("fp32_accumulate", [True, False])
def test_fp32_out_products_are_well_formed(monkeypatch, fp32_accumulate):
    # torch.mm/addmm with out_dtype exist on CUDA only; their meta versions check the arguments
    # (dtypes, shapes, out=) that xent passes, including the blockwise fallback's.
    from xent._engine import walker

    if not walker._HAS_OUT_DTYPE:
        pytest.skip("this torch has no out_dtype products")
    monkeypatch.setattr(walker, "_FP32_ACCUMULATE", [fp32_accumulate])

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    out = meta(8, 5, dtype=torch.float32)
    assert walker.mm_fp32(meta(8, 3), meta(3, 5), out) is out
    assert walker.mm_fp32(meta(8, 3), meta(3, 5), out, bias=meta(5)) is out
    acc = meta(9000, 5000, dtype=torch.float32)  # several fallback row blocks
    res = walker.mm_fp32(meta(5000, 9000).t(), meta(5000, 5000), acc, accumulate=True)
    assert res is acc and res.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_differentiate_class_weights(reduction):
    """With probability targets the class weights receive ``Σ_i g_i c_i q'_iv (lse_i − z_iv)``,
    as PyTorch's composition gives, chunk by chunk (K-dimensional weight, soft-cap, smoothing and
    token weights included); class-index targets still refuse them."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, 2, generator=gen, dtype=torch.float64).requires_grad_()
    q = torch.rand(7, 5, 2, generator=gen, dtype=torch.float64).softmax(1)
    cw = torch.rand(5, generator=gen, dtype=torch.float64).requires_grad_()
    tw = torch.rand(7, 2, generator=gen, dtype=torch.float64)
    cap, eps = 2.0, 0.1
    loss = xent.linear_cross_entropy(
        x,
        w,
        q,
        linear_bias=b,
        weight=cw,
        reduction=reduction,
        label_smoothing=eps,
        softcap=cap,
        token_weight=tw,
        chunk_size=3,
    )
    z = cap * torch.tanh((torch.einsum("nh,vph->nvp", x, w) + b) / cap)
    qs = (1 - eps) * q + eps / 5
    rows = -(cw[:, None] * qs * z.log_softmax(1)).sum(1) * tw
    ref = {"mean": rows.sum() / rows.numel(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(loss, ref)
    cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(loss, [x, w, b, cw], cot)
    want = torch.autograd.grad(ref, [x, w, b, cw], cot)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want)
    with pytest.raises(RuntimeError, match="not differentiable"):
        xent.linear_cross_entropy(x, w[:, 0], torch.tensor([0] * 7), weight=cw)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probabilities_unbatched_and_without_classes_match_torch(impl, reduction):
    """An ``(H,)`` input with a ``()`` or ``(V,)`` target, a K-dimensional weight with
    probabilities, and probabilities over no class (``V = 0``: each loss an empty sum, the
    "mean" 0/0) give PyTorch's values, shapes and gradients, fused or materialised."""
    gen = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x1, x, w, w3, w0 = randn(3), randn(5, 3), randn(4, 3), randn(4, 2, 3), randn(0, 3)
    q1 = torch.rand(4, generator=gen, dtype=torch.float64).softmax(0)
    q3 = torch.rand(5, 4, 2, generator=gen, dtype=torch.float64).softmax(1)
    calls = [
        (x1, w, torch.tensor(2)),
        (x1, w, q1),
        (x, w3, q3),
        (x, w0, torch.zeros(5, 0, dtype=torch.float64)),
    ]
    for inp, lw, t in calls:
        ours = xent.linear_cross_entropy(inp, lw, t, reduction=reduction, impl=impl)
        theirs = F.linear_cross_entropy(inp, lw, t, reduction=reduction)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        got = torch.autograd.grad(ours.sum(), [inp, lw])
        want = torch.autograd.grad(theirs.sum(), [inp, lw])
        for g_got, g_want in zip(got, want, strict=True):
            torch.testing.assert_close(g_got, g_want)
