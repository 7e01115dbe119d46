"""The Triton kernels (impl="triton") against torch: through the interpreter on CPU at small odd
shapes, and at real shapes on a GPU when one is present."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from oracles import Counted, torch_cross_entropy

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
    ref = torch_cross_entropy(x, q, reduction=reduction, **kw)
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

    from xent import _validation
    from xent._engine import dispatch, policy

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
    # Where the CPU's free host reads are decided: the target range check, the upstream scaling,
    # and whether ignored tokens are dropped (all off, as on a GPU during graph capture).
    stand_ins = [Counted(lambda t: False) for _ in range(3)]
    monkeypatch.setattr(_validation, "host_reads_cheap", stand_ins[0])
    monkeypatch.setattr(dispatch, "host_reads_cheap", stand_ins[1])
    monkeypatch.setattr(policy, "drop_ignored", stand_ins[2])
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
    # Every patched policy was consulted (a patch nobody reads would prove nothing).
    assert all(s.calls for s in stand_ins)


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

    triton_ce.warm_up(step)  # outside the capture: compiles every kernel variant step needs
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


class _CountGrid:
    """Stands in for a Triton kernel; records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("prob", [False, True])
def test_rows_beyond_the_grid_limit_are_looped_over(monkeypatch, prob):
    # GRID_LIMIT lowered from 2³¹ - 1 to 2: each program then walks several rows.
    name = "_ce_prob_row_kernel" if prob else "_ce_row_kernel"
    spy = _CountGrid(getattr(triton_ce, name))
    monkeypatch.setattr(triton_ce, name, spy)
    monkeypatch.setattr(triton_ce, "GRID_LIMIT", 2)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(9, 37, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    if prob:
        t = torch.rand(9, 37, generator=gen, dtype=torch.float64).softmax(1).to(DEVICE)
    else:
        t = torch.randint(0, 37, (9,), generator=gen).to(DEVICE)
    for reduction in ("mean", "none"):
        ours = xent.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, impl="triton")
        ref = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
        up = torch.randn(ours.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        g_ours, g_ref = (torch.autograd.grad(v, x, up)[0] for v in (ours, ref))
        torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-12)
    assert spy.grids and all(grid == (2,) for grid in spy.grids), spy.grids


def test_rows_in_flight_bounded_by_l2():
    # V = 128256 bf16 rows (256 KiB) on an H100 (132 SMs, 50 MiB L2): one program per SM,
    # not one per row.
    assert triton_ce.rows_in_flight(128256 * 2, 132, 50 << 20) == 132
    # 32 KiB rows: 800 fit in half the L2; capped at 4 programs per SM.
    assert triton_ce.rows_in_flight(32 << 10, 132, 50 << 20) == 528
    # 128 KiB rows: bounded by L2 (200 rows), between the two.
    assert triton_ce.rows_in_flight(128 << 10, 132, 50 << 20) == 200


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_classes_follow_torch(reduction):
    # V = 0 with every class-index target ignored: torch's loss is 0 per row (NaN mean) and the
    # gradient is empty; the kernels are not launched.
    x = torch.zeros(3, 0, device=DEVICE, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), -100, device=DEVICE)
    ours = xent.cross_entropy(x, t, reduction=reduction, impl="triton")
    ref = F.cross_entropy(x, t, reduction=reduction)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == (3, 0)
    params = xent.classification.CEParams(impl="triton")
    q = torch.zeros(3, 0, dtype=torch.float64, device=DEVICE)
    for target in (t, q):
        loss, m, log_s = triton_ce.cross_entropy_pass_triton(x.detach(), target, None, None, params)
        assert torch.equal(loss, torch.zeros(3, dtype=torch.float64, device=DEVICE))
        assert torch.equal(m, torch.zeros(3, dtype=torch.float64, device=DEVICE))
        assert torch.equal(log_s, torch.full((3,), -torch.inf, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_unless_one(monkeypatch, dtype):
    spy = _CountGrid(triton_ce._scale_kernel)
    monkeypatch.setattr(triton_ce, "_scale_kernel", spy)
    monkeypatch.setattr(triton_ce, "SCALE_BLOCK", 16)
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(5, 13, generator=gen).to(dtype).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stores = []
    if DEVICE == "cpu":  # count the interpreter's stores: none at all when the factor is 1
        from triton.runtime.interpreter import InterpreterBuilder

        real_store = InterpreterBuilder.create_masked_store

        def counting_store(self, *args, **kwargs):
            stores.append(1)
            return real_store(self, *args, **kwargs)

        monkeypatch.setattr(InterpreterBuilder, "create_masked_store", counting_store)
    one = torch.ones((), dtype=acc, device=DEVICE)
    grad = base.clone()
    assert triton_ce.scale_unless_one_(grad, one) is grad
    assert torch.equal(grad, base)  # untouched
    assert not stores
    half = torch.full((), -0.37, dtype=acc, device=DEVICE)
    triton_ce.scale_unless_one_(grad, half)
    assert len(stores) == (5 if DEVICE == "cpu" else 0)  # one block of 16 per program
    # Exact, but bf16 to one rounding step (Triton's interpreter rounds it by truncation).
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(grad, (base.to(acc) * -0.37).to(dtype), atol=0, rtol=rtol)
    assert spy.grids == [(5,), (5,)]  # 65 elements in blocks of 16, both launched
    strided = base.clone().t()  # not contiguous: multiplied by torch instead
    triton_ce.scale_unless_one_(strided, half)
    assert len(spy.grids) == 2
    torch.testing.assert_close(strided, base.t() * half.to(dtype))
    assert triton_ce.scale_unless_one_(None, half) is None


def test_backward_scales_on_the_device(monkeypatch):
    # With host reads off (as on a GPU), backward's upstream factor goes through the scaling
    # kernel: no launch of work when it is 1, the right gradient when it is not.
    from xent._engine import dispatch

    monkeypatch.setattr(dispatch, "host_reads_cheap", lambda t: False)
    calls = []
    real = triton_ce.scale_unless_one_
    monkeypatch.setattr(triton_ce, "scale_unless_one_", lambda g, f: calls.append(g) or real(g, f))
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, 20, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.randint(0, 20, (6,), generator=gen).to(DEVICE)
    h = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(20, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    for factor in (1.0, 2.5):
        ours = xent.cross_entropy(x, t, label_smoothing=0.1, impl="triton") * factor
        ref = F.cross_entropy(x, t, label_smoothing=0.1) * factor
        torch.testing.assert_close(
            torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], atol=1e-12, rtol=0
        )
        ours = xent.linear_cross_entropy(h, w, t, impl="triton") * factor
        ref = F.cross_entropy(h @ w.t(), t) * factor
        for a, b in zip(
            torch.autograd.grad(ours, (h, w)), torch.autograd.grad(ref, (h, w)), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert len(calls) == 2 * (2 + 4)  # ∂x, ∂q (None) of CE; ∂h, ∂w, ∂b, ∂q (None) of LCE


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unaligned_rows_and_mismatched_gradient_alignment(monkeypatch, offset):
    # Rows starting off a 16-byte boundary (odd V, sliced logits): a masked head, mask-free
    # blocks and a masked tail. An fp32 input with a bf16 gradient buffer (the fused path's
    # split) has its gradient on another boundary: the unhinted branch.
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 16)
    gen = torch.Generator().manual_seed(11)
    big = (3 * torch.randn(8, 53, generator=gen, dtype=torch.float64)).to(DEVICE)
    x = big[offset:].reshape(-1)[offset:].reshape(-1)[: (8 - offset) * 53 - 53]
    x = x.reshape(-1, 53)  # a view whose rows start at an odd element offset
    t = torch.randint(0, 53, (x.shape[0],), generator=gen).to(DEVICE)
    params = xent.classification.CEParams(label_smoothing=0.1, impl="triton")
    coef = torch.ones(x.shape[0], dtype=torch.float64, device=DEVICE)
    grad = torch.empty(x.shape, dtype=torch.float64, device=DEVICE)
    loss, _, _ = triton_ce.cross_entropy_pass_triton(x, t, None, coef, params, grad_out=grad)
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=1e-12)
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(grad, g_ref, atol=1e-12, rtol=1e-12)
    x32 = x.float()[:, 1:]  # fp32 rows off alignment, a dense bf16 gradient
    g16 = torch.empty(x32.shape, dtype=torch.bfloat16, device=DEVICE)
    loss, _, _ = triton_ce.cross_entropy_pass_triton(
        x32, t.clamp(max=51), None, coef.float(), params, grad_out=g16
    )
    xr = x32.clone().requires_grad_()
    ref = F.cross_entropy(xr, t.clamp(max=51), reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref.detach(), atol=2e-5, rtol=2e-5)
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(g16.float(), g_ref, atol=2e-2 * g_ref.abs().max(), rtol=0)


def test_tensor_arguments_on_another_device_are_named():
    x = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    params = xent.classification.CEParams(impl="triton")
    weight = torch.rand(10, device="meta")  # stands for a CPU weight beside CUDA logits
    with pytest.raises(RuntimeError, match=r"weight is on meta but the logits are on"):
        triton_ce.cross_entropy_pass_triton(x, t, weight, None, params)
    with pytest.raises(RuntimeError, match=r"target is on meta"):
        triton_ce.cross_entropy_pass_triton(x, t.to("meta"), None, None, params)
    with pytest.raises(RuntimeError, match=r"grad_out is on meta"):
        triton_ce.cross_entropy_pass_triton(
            x, t, None, torch.ones(4), params, grad_out=torch.empty(4, 10, device="meta")
        )
    with pytest.raises(TypeError, match=r"does not support logits of dtype torch\.complex64"):
        triton_ce.cross_entropy_pass_triton(x.to(torch.complex64), t, None, None, params)


def test_fp8_e4m3_needs_sm89():
    triton_ce._check_dtype(torch.float8_e4m3fn, (9, 0))
    triton_ce._check_dtype(torch.float8_e5m2, (8, 0))
    triton_ce._check_dtype(torch.float8_e4m3fn, None)  # the interpreter
    with pytest.raises(TypeError, match=r"compute capability 8\.9 or newer \(this one is 8\.0\)"):
        triton_ce._check_dtype(torch.float8_e4m3fn, (8, 0))


def test_warm_up_runs_the_step_once():
    calls = []
    x = torch.randn(3, 7, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 3, 6], device=DEVICE)
    loss = triton_ce.warm_up(lambda: calls.append(1) or xent.cross_entropy(x, t, impl="triton"))
    assert calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(x, t))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocabulary_slice_gradient_equals_the_torch_kernel(weighted, reduction):
    # One rank's slice [first, first + width) of C classes, from the global (m, log s): the kernel
    # forms the same gradient as the torch kernel, whose slice is checked against single-process
    # xent on 2 and 3 processes (tests/test_distributed.py), and the same as the columns of the
    # whole-vocabulary gradient.
    from dataclasses import replace

    from xent._engine.options import CEParams
    from xent._engine.torch_rows import cross_entropy_pass

    gen = torch.Generator().manual_seed(11)
    rows, vocab, first, width = 9, 53, 17, 21
    z = (3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(DEVICE)
    t = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    t[0], t[1], t[2] = -100, first, first + width - 1  # ignored, first and last of the slice
    w = (
        (torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
        if weighted
        else None
    )
    coef = torch.rand(rows, generator=gen, dtype=torch.float64).to(DEVICE)
    base = CEParams(-100, reduction, 0.1, 1e-2, 4.0)
    whole = torch.empty_like(z)
    _, *stats = cross_entropy_pass(z, t, w, coef, base, grad_out=whole)
    sliced = replace(base, class_start=first, num_classes=vocab)
    part = z[:, first : first + width].contiguous()
    g_torch, g_triton = torch.empty_like(part), torch.empty_like(part)
    cross_entropy_pass(part, t, w, coef, sliced, stats_in=stats, grad_out=g_torch)
    triton_ce.cross_entropy_pass_triton(
        part, t, w, coef, replace(sliced, impl="triton"), stats_in=stats, grad_out=g_triton
    )
    torch.testing.assert_close(g_torch, whole[:, first : first + width], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_triton, g_torch, atol=1e-12, rtol=1e-12)
