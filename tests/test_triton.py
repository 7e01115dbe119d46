"""The Triton kernels (impl="triton") against torch: through the interpreter on CPU at small odd
shapes, and at real shapes on a GPU when one is present."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import xent

triton_ce = pytest.importorskip("xent._triton_ce")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several blocks per row even at small vocabularies, so the online max/sum is exercised.
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_ce, "MAX_BLOCK", 32)


def materialised(
    x,
    t,
    weight=None,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    ignore_index=-100,
):
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(
        z, t, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = t != ignore_index
    per = ce + torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    wy = valid.to(x.dtype) if weight is None else weight[t.clamp(min=0)] * valid
    return per.sum() / wy.sum()


OPTIONS = [
    {},
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(weight=True),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.0, weight=True),
]


@pytest.mark.parametrize(
    ("opts", "reduction", "shape", "dtype"),
    list(
        itertools.product(
            OPTIONS, ["mean", "sum", "none"], [(9, 77), (3, 5)], [torch.float32, torch.float64]
        )
    ),
)
def test_cross_entropy_triton_matches_torch(opts, reduction, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen, dtype=dtype)).to(DEVICE).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0],), generator=gen)
    t[::4] = -100
    t = t.to(DEVICE)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(shape[1], generator=gen, dtype=dtype) + 0.1).to(DEVICE)
    ours = xent.cross_entropy(x, t, reduction=reduction, impl="triton", **kw)
    ref = materialised(x, t, reduction=reduction, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    up = torch.randn(ours.shape, generator=gen, dtype=dtype).to(DEVICE)
    (g_ours,) = torch.autograd.grad(ours, x, up)
    (g_ref,) = torch.autograd.grad(ref, x, up)
    torch.testing.assert_close(g_ours, g_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_floor(dtype):
    gen = torch.Generator().manual_seed(1)
    x64 = 3 * torch.randn(17, 130, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 130, (17,), generator=gen).to(DEVICE)
    x = x64.to(dtype).to(DEVICE).requires_grad_()
    exact = F.cross_entropy(x.detach().double(), t, reduction="none")
    ours = xent.cross_entropy(x, t, reduction="none", impl="triton")
    theirs = F.cross_entropy(x, t, reduction="none")
    assert ours.dtype == dtype
    floor = (theirs.double() - exact).abs()
    assert ((ours.double() - exact).abs() <= floor + 1e-2 * exact.abs() + 1e-3).all()
    (g,) = torch.autograd.grad(xent.cross_entropy(x, t, impl="triton"), x)
    xd = x.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad(F.cross_entropy(xd, t), xd)
    (g_theirs,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    assert g.dtype == dtype
    # Within torch's own error plus one rounding step of the dtype (Triton's interpreter
    # converts to bf16 by truncation rather than rounding to nearest).
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    bound = (g_theirs.double() - g_exact).abs() + ulp * g_exact.abs() + 1e-6
    assert ((g.double() - g_exact).abs() <= bound).all()


def test_edge_cases_follow_torch():
    x = torch.tensor([[0.0, -torch.inf, 1.0], [2.0, 1.0, 0.5]], device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 1], device=DEVICE)
    ours, ref = xent.cross_entropy(x, t, impl="triton"), F.cross_entropy(x, t)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    all_ignored = torch.full((2,), -100, device=DEVICE)
    loss = xent.cross_entropy(x, all_ignored, impl="triton")
    assert torch.isnan(loss)
    assert torch.equal(torch.autograd.grad(loss, x)[0], torch.zeros_like(x))
    empty = torch.zeros(0, 3, device=DEVICE, requires_grad=True)
    assert (
        xent.cross_entropy(
            empty, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction="sum", impl="triton"
        ).item()
        == 0.0
    )


def test_inplace_backward_and_probability_targets():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(7, 40, generator=gen).to(DEVICE)
    t = torch.randint(0, 40, (7,), generator=gen).to(DEVICE)
    x_ref = base.clone().requires_grad_()
    F.cross_entropy(x_ref, t, label_smoothing=0.1).backward()
    leaf = base.clone().requires_grad_()
    h = leaf * 1.0
    xent.cross_entropy(h, t, label_smoothing=0.1, inplace_backward=True, impl="triton").backward()
    torch.testing.assert_close(leaf.grad, x_ref.grad)
    q = torch.rand(7, 40, generator=gen).softmax(1).to(DEVICE)  # runs the torch kernel
    torch.testing.assert_close(xent.cross_entropy(base, q, impl="triton"), F.cross_entropy(base, q))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_triton(reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(45, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.randint(0, 45, (21,), generator=gen)
    t[::6] = -100
    t = t.to(DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=8)
    ours = xent.linear_cross_entropy(x, w, t, impl="triton", **kw)
    ref = xent.linear_cross_entropy(x, w, t, impl="reference", **kw)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    up = torch.ones_like(ours)
    for a, b in zip(
        torch.autograd.grad(ours, (x, w), up), torch.autograd.grad(ref, (x, w), up), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_impl_choice_is_checked(monkeypatch):
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'torch', 'triton'"):
        xent.cross_entropy(x, t, impl="cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"runs on CUDA tensors \(got a cpu tensor"):
            xent.cross_entropy(x, t, impl="triton")
        # "auto" on a CPU tensor is the torch kernel.
        torch.testing.assert_close(xent.cross_entropy(x, t, impl="auto"), F.cross_entropy(x, t))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_shapes_on_gpu(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 128256, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    t = torch.randint(0, 128256, (4096,), device="cuda", generator=gen)
    ours = xent.cross_entropy(x, t, z_loss=1e-4)
    ref = F.cross_entropy(x.float(), t) + 1e-4 * (torch.logsumexp(x.float(), 1) ** 2).mean()
    torch.testing.assert_close(ours.float(), ref, atol=1e-2, rtol=1e-3)
    (g,) = torch.autograd.grad(ours, x)
    assert torch.isfinite(g).all()


def test_strided_targets_and_transposed_logits_in_place():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 10, generator=gen).to(DEVICE)
    pairs = torch.randint(0, 10, (6, 2), generator=gen).to(DEVICE)
    t = pairs[:, 0]  # a strided view
    torch.testing.assert_close(xent.cross_entropy(x, t, impl="triton"), F.cross_entropy(x, t))
    base = torch.randn(10, 6, generator=gen).to(DEVICE)
    ref_x = base.t().clone().requires_grad_()
    F.cross_entropy(ref_x, t).backward()
    leaf = base.clone().requires_grad_()
    h = leaf.t() * 1.0  # transposed, non-contiguous logits
    xent.cross_entropy(h, t, inplace_backward=True, impl="triton").backward()
    torch.testing.assert_close(leaf.grad.t(), ref_x.grad)
