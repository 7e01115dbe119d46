"""The Triton kernels (impl="triton") against torch: through the interpreter on CPU at small odd
shapes, and at real shapes on a GPU when one is present."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import xent

pytest.importorskip("triton")
from xent._engine import triton_rows as triton_ce  # after the skip

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


class _CountLaunches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _prob_reference(
    x, q, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(z, q, weight, reduction="none", label_smoothing=label_smoothing)
    per = ce + z_loss * torch.logsumexp(z, 1) ** 2
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


@pytest.mark.parametrize(
    ("opts", "reduction", "dtype"),
    list(itertools.product(OPTIONS, ["mean", "sum", "none"], [torch.float32, torch.float64])),
)
def test_probability_targets_run_the_triton_kernel(monkeypatch, opts, reduction, dtype):
    spy = _CountLaunches(triton_ce._ce_prob_row_kernel)
    monkeypatch.setattr(triton_ce, "_ce_prob_row_kernel", spy)
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(9, 77, generator=gen, dtype=dtype)).to(DEVICE).requires_grad_()
    q = torch.rand(9, 77, generator=gen, dtype=dtype).softmax(1).to(DEVICE).requires_grad_()
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(77, generator=gen, dtype=dtype) + 0.1).to(DEVICE)
    ours = xent.cross_entropy(x, q, reduction=reduction, impl="triton", **kw)
    assert spy.launches >= 1
    ref = _prob_reference(x, q, reduction=reduction, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    up = torch.randn(ours.shape, generator=gen, dtype=dtype).to(DEVICE)
    for a, b in zip(
        torch.autograd.grad(ours, (x, q), up), torch.autograd.grad(ref, (x, q), up), strict=True
    ):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_probability_targets_accurate_far_from_zero(impl):
    # The loss is formed relative to the row max: logits offset by 3·10⁴ lose nothing to
    # cancellation (fp32 holds them only to ~2·10⁻³ absolute, yet the loss stays as exact as
    # torch's).
    gen = torch.Generator().manual_seed(7)
    for offset in (0.0, 1e3, 3e4):
        x = (2 * torch.randn(8, 1000, generator=gen) + offset).to(DEVICE)
        q = torch.rand(8, 1000, generator=gen).softmax(1).to(DEVICE)
        exact = F.cross_entropy(x.double(), q.double(), reduction="none")
        ours = xent.cross_entropy(x, q, reduction="none", impl=impl).double()
        theirs = F.cross_entropy(x, q, reduction="none").double()
        assert ((ours - exact).abs() <= (theirs - exact).abs() + 1e-6 * exact.abs()).all()


def test_probability_targets_in_place_strided_and_half():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(7, 40, generator=gen).to(DEVICE)
    q = torch.rand(40, 7, generator=gen).softmax(0).to(DEVICE).t()  # strided rows
    x_ref = base.clone().requires_grad_()
    F.cross_entropy(x_ref, q, label_smoothing=0.1).backward()
    leaf = base.clone().requires_grad_()
    h = leaf * 1.0
    loss = xent.cross_entropy(h, q, label_smoothing=0.1, inplace_backward=True, impl="triton")
    torch.testing.assert_close(loss, F.cross_entropy(base, q, label_smoothing=0.1))
    loss.backward()
    torch.testing.assert_close(leaf.grad, x_ref.grad)
    xb = base.to(torch.bfloat16).requires_grad_()
    ours = xent.cross_entropy(xb, q.to(torch.bfloat16), reduction="none", impl="triton")
    exact = F.cross_entropy(xb.detach().double(), q.to(torch.bfloat16).double(), reduction="none")
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6).all()


def test_no_host_reads_on_the_gpu_path(monkeypatch):
    # On a GPU a host read (.item(), bool(t), nonzero, a tensor built from Python numbers) waits
    # for the device and breaks CUDA-graph capture. Every aten call of forward and backward is
    # recorded with the CPU's free host reads switched off, as on a GPU.
    from torch.utils._python_dispatch import TorchDispatchMode

    from xent import _numerics, _validation
    from xent._engine import policy

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    host_reads = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "unique"}
    x = torch.randn(6, 40).to(DEVICE).requires_grad_()
    t = torch.randint(0, 40, (6,)).to(DEVICE)
    t[0] = -100
    q = torch.rand(6, 40).softmax(1).to(DEVICE)
    h = torch.randn(6, 8).to(DEVICE).requires_grad_()
    w = torch.randn(40, 8).to(DEVICE).requires_grad_()
    norm = torch.full((), 3.0, device=DEVICE)
    with Record() as probe:  # the probe itself sees a host read
        bool(x.sum() > 0)
    assert "_local_scalar_dense" in probe.ops
    for module in (_numerics, _validation, policy):
        monkeypatch.setattr(module, "host_reads_cheap", lambda t: False)
    monkeypatch.setattr(policy, "drop_ignored", lambda t: False)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, impl="triton")
    calls = [
        lambda: xent.cross_entropy(x, t, **kw),
        lambda: xent.cross_entropy(x, t, reduction="none", **kw).sum(),
        lambda: xent.cross_entropy(x, q, **kw),
        lambda: xent.linear_cross_entropy(h, w, t, normalizer=norm, **kw),
        lambda: xent.linear_cross_entropy(h, w, t, reduction="none", **kw).sum(),
    ]
    for call in calls:
        call().backward()  # first call: one-time set-up (the options' small tensor)
        with Record() as rec:
            call().backward()
        assert not rec.ops & host_reads, rec.ops & host_reads


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
    # N·V > 2³¹ elements: int64 offsets matter. Checked against torch in fp32 (loss) and
    # against torch's same-dtype gradient error on a sample of rows.
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, v = 17000, 128256
    x = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[::7] = -100
    ours = xent.cross_entropy(x, t, z_loss=1e-4, label_smoothing=0.1)
    assert ours.dtype == dtype
    (g,) = torch.autograd.grad(ours, x)
    rows = torch.arange(0, n, 97, device="cuda")
    rows = torch.cat([rows, torch.tensor([n - 1], device="cuda")])
    xs = x.detach()[rows].double().requires_grad_()
    valid = (t != -100).sum()

    def ref_fn(z):
        ce = F.cross_entropy(z, t[rows], reduction="none", label_smoothing=0.1)
        zl = torch.where(t[rows] != -100, 1e-4 * torch.logsumexp(z, 1) ** 2, 0.0)
        return (ce + zl).sum() / valid

    (g_ref,) = torch.autograd.grad(ref_fn(xs), xs)
    scale = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert ((g[rows].double() - g_ref).abs() <= scale * g_ref.abs() + 1e-9).all()
    full = F.cross_entropy(x.detach().float(), t, label_smoothing=0.1, reduction="sum")
    lse = torch.logsumexp(x.detach().float(), 1)
    ref = (full + 1e-4 * torch.where(t != -100, lse**2, 0.0).sum()) / valid
    torch.testing.assert_close(ours.float(), ref, atol=1e-3, rtol=1e-3)


@cuda
def test_cuda_graph_capture_and_replay():
    x = torch.randn(64, 5000, device="cuda").requires_grad_()
    t = torch.randint(0, 5000, (64,), device="cuda")
    t[::5] = -100
    h = torch.randn(64, 32, device="cuda").requires_grad_()
    w = torch.randn(5000, 32, device="cuda").requires_grad_()

    def step():
        loss = xent.cross_entropy(x, t, label_smoothing=0.1) + xent.linear_cross_entropy(h, w, t)
        return loss, torch.autograd.grad(loss, (x, h, w))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (compiles the kernels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grads = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        h.copy_(torch.randn_like(h))
    graph.replay()
    ref_loss, ref_grads = step()
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@cuda
@pytest.mark.parametrize(("h", "v"), [(1024, 128256), (2304, 256000)])
def test_linear_cross_entropy_real_shapes_on_gpu(h, v):
    # bf16 on the tensor-core path against the fp32 definition on sampled tokens.
    gen = torch.Generator(device="cuda").manual_seed(1)
    n = 2048
    x = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[::9] = -100
    ours = xent.linear_cross_entropy(x, w, t, z_loss=1e-4)
    gx, gw = torch.autograd.grad(ours, (x, w))
    ref = xent.linear_cross_entropy_reference(x.float(), w.float(), t, z_loss=1e-4)
    rgx, rgw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=1e-2)
    for a, b in ((gx, rgx), (gw, rgw)):
        err = (a.float() - b.float()).abs().max()
        assert err <= 2e-2 * b.float().abs().max(), err


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
