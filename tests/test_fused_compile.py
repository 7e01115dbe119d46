"""torch.compile(fullgraph=True) of models that call xent's cross-entropy and fused linear
cross-entropy: no graph breaks, dynamic batch sizes without recompiling, values and gradients
equal to eager mode. Tiny models; the "aot_eager" backend (autograd traced, no code generation)
except one inductor test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import xent

H, C = 5, 7
SIZES = (4, 6, 9)


def _indices(n, gen):
    t = torch.randint(0, C, (n,), generator=gen)
    t[0] = -100
    return t


def _inputs(kind, n, gen):
    if kind == "logits":
        return torch.randn(n, C, generator=gen).requires_grad_(), _indices(n, gen)
    x = torch.randn(n, H, generator=gen).requires_grad_()
    if kind == "probs":
        return x, torch.randn(n, C, generator=gen).softmax(1).requires_grad_()
    if kind == "kdim":
        t = torch.randint(0, C, (n, 2), generator=gen)
        t[0, 1] = -100
        return x, t
    return x, _indices(n, gen)


def _models():
    torch.manual_seed(0)
    head = xent.nn.LinearCrossEntropyLoss(H, C, bias=True)
    kdim = xent.nn.LinearCrossEntropyLoss(H, C, out_features=(2,), label_smoothing=0.1)
    ce = xent.nn.CrossEntropyLoss(label_smoothing=0.1)
    w = head.linear.weight
    return {
        "cross_entropy": ("logits", lambda z, t: xent.cross_entropy(z, t)),
        "nn.CrossEntropyLoss": ("logits", ce),
        "linear_cross_entropy": ("index", lambda x, t: xent.linear_cross_entropy(x, w, t)),
        "linear_cross_entropy-none": (
            "index",
            lambda x, t: xent.linear_cross_entropy(x, w, t, reduction="none").sum(),
        ),
        "linear_cross_entropy-probs": (
            "probs",
            lambda x, q: xent.linear_cross_entropy(x, w, q, linear_bias=head.linear.bias),
        ),
        "nn.LinearCrossEntropyLoss": ("index", head),
        "nn.LinearCrossEntropyLoss-kdim": ("kdim", kdim),
    }


MODELS = list(_models())


def _run(fn, kind, sizes, backend="aot_eager", dynamic=None):
    """Compile ``fn``, run it on each batch size against eager mode; the graph count."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    gen = torch.Generator().manual_seed(1)
    params = [p for p in getattr(fn, "parameters", lambda: [])()]
    for n in sizes:
        args = _inputs(kind, n, gen)
        leaves = [a for a in args if a.requires_grad] + params
        got = compiled(*args)
        g_got = torch.autograd.grad(got, leaves)
        want = fn(*args)
        g_want = torch.autograd.grad(want, leaves)
        torch.testing.assert_close(got, want)
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_true_one_graph_for_all_batch_sizes(name):
    kind, fn = _models()[name]
    assert _run(fn, kind, SIZES, dynamic=True) == 1


@pytest.mark.parametrize(
    "name", ["cross_entropy", "linear_cross_entropy", "nn.LinearCrossEntropyLoss"]
)
def test_automatic_dynamic_shapes_recompile_once(name):
    # The first batch size compiles a static graph, the second a dynamic one that the third
    # reuses: no recompilation after the second.
    kind, fn = _models()[name]
    assert _run(fn, kind, SIZES) == 2


def test_inductor_linear_cross_entropy_module():
    kind, fn = _models()["nn.LinearCrossEntropyLoss"]
    assert _run(fn, kind, SIZES[:2], backend="inductor", dynamic=True) == 1


def test_autocast_region_compiles():
    torch.manual_seed(0)
    w = torch.randn(C, H, requires_grad=True)

    def step(x, t):
        with torch.autocast("cpu", torch.bfloat16):
            return xent.linear_cross_entropy(x, w, t)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    x, t = torch.randn(6, H).bfloat16(), torch.randint(0, C, (6,))
    got = compiled(x, t)
    assert got.dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        ref = F.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_compiled_out_of_range_target_raises():
    w = torch.randn(C, H)
    compiled = torch.compile(
        lambda x, t: xent.linear_cross_entropy(x, w, t), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        compiled(torch.randn(3, H), torch.tensor([0, 9, 1]))


def test_linear_operators_pass_opcheck():
    from xent._engine.options import CEParams

    x = torch.randn(6, H, requires_grad=True)
    w = torch.randn(C, H, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2, 1])
    q = torch.randn(6, C).softmax(1).requires_grad_()
    options = [*CEParams().options(), 4.0, 0.0]
    for target in (t, q):
        for reduction in ("mean", "none"):
            torch.library.opcheck(
                torch.ops.xent.linear_cross_entropy_fwd,
                (x, w, b, target, None, None, None, reduction, "torch", options, [True] * 4),
            )
