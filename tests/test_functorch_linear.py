"""The losses on hidden states and the log-probability losses under ``torch.func`` transforms.

A table of cases (an xent call, the equivalent PyTorch composition or float64 reference, and
the differentiable inputs) runs through each transform: grad, vmap, vmap∘grad, jacrev, jacfwd,
jvp and per-sample gradients through ``functional_call``; every result must equal the
reference's under the same transform. Shapes are tiny and odd, chunks split the tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import xent
from xent.posttrain import (
    linear_log_probs_reference,
    linear_policy_loss_reference,
    log_probs_reference,
)

N, H, V, B = 5, 3, 7, 3
DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


# Fixed data shared by the cases: class indices with one ignored token, a mask, weights.
Y = torch.tensor([2, -100, 6, 0, 3])
MASK = torch.tensor([True, True, False, True, True])
TOKEN_W = torch.linspace(0.5, 1.5, N, dtype=DT)
CLASS_W = torch.linspace(0.2, 1.8, V, dtype=DT)
TEMP = torch.linspace(0.7, 1.3, N, dtype=DT)
TEACHER_Z = _randn(N, V, seed=11)
TEACHER_H, TEACHER_W = _randn(N, 4, seed=12), _randn(V, 4, seed=13)
ADV = torch.linspace(-1.0, 1.5, N, dtype=DT)
OLD_LP = -2.0 + _randn(N, seed=14)  # ratios far from 1 on some tokens: clipped ones too


def _stack(out) -> torch.Tensor:
    """One tensor from a LogProbs result (log-probabilities and entropy), else the tensor."""
    return torch.stack((out.log_probs, out.entropy)) if isinstance(out, xent.LogProbs) else out


# name -> (xent call, reference, differentiable inputs' shapes)
CASES = {
    "lce_mean": (
        lambda x, w, b: xent.linear_cross_entropy(x, w, Y, linear_bias=b, chunk_size=2),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), Y),
        [(N, H), (V, H), (V,)],
    ),
    "lce_sum_smooth_weight": (
        lambda x, w: xent.linear_cross_entropy(
            x, w, Y, weight=CLASS_W, reduction="sum", label_smoothing=0.2, chunk_size=3
        ),
        lambda x, w: F.cross_entropy(
            F.linear(x, w), Y, weight=CLASS_W, reduction="sum", label_smoothing=0.2
        ),
        [(N, H), (V, H)],
    ),
    "lce_none_token_weight": (
        lambda x, w, b: xent.linear_cross_entropy(
            x, w, Y, linear_bias=b, reduction="none", token_weight=TOKEN_W, chunk_size=2
        ),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), Y, reduction="none") * TOKEN_W,
        [(N, H), (V, H), (V,)],
    ),
    "lce_softcap_zloss_normalizer": (
        lambda x, w: xent.linear_cross_entropy(
            x,
            w,
            Y,
            softcap=2.0,
            z_loss=0.1,
            normalizer=torch.tensor(3.0, dtype=DT),
            chunk_size=4,
        ),
        lambda x, w: xent.linear_cross_entropy(
            x,
            w,
            Y,
            softcap=2.0,
            z_loss=0.1,
            normalizer=torch.tensor(3.0, dtype=DT),
            impl="reference",
        ),
        [(N, H), (V, H)],
    ),
    "log_probs": (
        lambda z: _stack(xent.log_probs(z, Y, return_entropy=True)),
        lambda z: _stack(log_probs_reference(z, Y, return_entropy=True)),
        [(N, V)],
    ),
    "log_probs_softcap_temperature": (
        lambda z: xent.log_probs(z, Y, temperature=TEMP, softcap=1.5, logit_scale=0.8),
        lambda z: log_probs_reference(z, Y, temperature=TEMP, softcap=1.5, logit_scale=0.8),
        [(N, V)],
    ),
    "linear_log_probs": (
        lambda x, w, b: _stack(
            xent.linear_log_probs(x, w, Y, bias=b, return_entropy=True, softcap=2.5, chunk_size=2)
        ),
        lambda x, w, b: _stack(
            linear_log_probs_reference(x, w, Y, bias=b, return_entropy=True, softcap=2.5)
        ),
        [(N, H), (V, H), (V,)],
    ),
    "linear_log_probs_temperature": (
        lambda x, w: xent.linear_log_probs(x, w, Y, temperature=0.6, chunk_size=3),
        lambda x, w: linear_log_probs_reference(x, w, Y, temperature=0.6),
        [(N, H), (V, H)],
    ),
    "distill_mean_beta": (
        lambda z: xent.distill_divergence(z, TEACHER_Z, Y, beta=0.3, temperature=1.7),
        lambda z: xent.distill_divergence(
            z, TEACHER_Z, Y, beta=0.3, temperature=1.7, impl="reference"
        ),
        [(N, V)],
    ),
    "distill_kl_none": (
        lambda z: xent.distill_divergence(z, TEACHER_Z, MASK, reduction="none"),
        lambda z: (
            F.kl_div(
                z.log_softmax(-1), TEACHER_Z.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            * MASK
        ),
        [(N, V)],
    ),
    "linear_distill_teacher_head": (
        lambda x, w, b: xent.linear_distill_divergence(
            x,
            w,
            Y,
            student_bias=b,
            teacher_hidden=TEACHER_H,
            teacher_weight=TEACHER_W,
            beta=0.5,
            token_weight=TOKEN_W,
            chunk_size=2,
        ),
        lambda x, w, b: xent.linear_distill_divergence(
            x,
            w,
            Y,
            student_bias=b,
            teacher_hidden=TEACHER_H,
            teacher_weight=TEACHER_W,
            beta=0.5,
            token_weight=TOKEN_W,
            impl="reference",
        ),
        [(N, H), (V, H), (V,)],
    ),
    "linear_distill_logits_none": (
        lambda x, w: xent.linear_distill_divergence(
            x, w, MASK, teacher_logits=TEACHER_Z, reduction="none", chunk_size=3
        ),
        lambda x, w: (
            F.kl_div(
                F.linear(x, w).log_softmax(-1),
                TEACHER_Z.log_softmax(-1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * MASK
        ),
        [(N, H), (V, H)],
    ),
    "linear_policy_mean_off_policy": (
        lambda x, w, b: xent.linear_policy_loss(
            x, w, Y, ADV, old_log_probs=OLD_LP, bias=b, clip_high=0.3, entropy_coef=0.1,
            chunk_size=2,
        ),
        lambda x, w, b: linear_policy_loss_reference(
            x, w, Y, ADV, old_log_probs=OLD_LP, bias=b, clip_high=0.3, entropy_coef=0.1
        ),
        [(N, H), (V, H), (V,)],
    ),
    "linear_policy_none_softcap_temperature": (
        lambda x, w: xent.linear_policy_loss(
            x, w, Y, ADV, reduction="none", temperature=TEMP, softcap=2.0, entropy_coef=0.05,
            chunk_size=3,
        ),
        lambda x, w: linear_policy_loss_reference(
            x, w, Y, ADV, reduction="none", temperature=TEMP, softcap=2.0, entropy_coef=0.05
        ),
        [(N, H), (V, H)],
    ),
    "linear_policy_mean_normalizer": (
        lambda x, w: xent.linear_policy_loss(
            x, w, Y, ADV, old_log_probs=OLD_LP, normalizer=torch.tensor(4.0, dtype=DT),
            chunk_size=2,
        ),
        lambda x, w: linear_policy_loss_reference(
            x, w, Y, ADV, old_log_probs=OLD_LP, normalizer=torch.tensor(4.0, dtype=DT)
        ),
        [(N, H), (V, H)],
    ),
}  # fmt: skip
NAMES = list(CASES)


def _inputs(name: str, seed: int = 0) -> list[torch.Tensor]:
    return [_randn(*shape, seed=seed + i) for i, shape in enumerate(CASES[name][2])]


def _scalar(f):
    """A scalar of ``f``'s output: a fixed weighted sum (the output itself when it is one)."""

    @functools.wraps(f)
    def wrapped(*args):
        out = f(*args)
        u = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        return (out * u).sum()

    return wrapped


def _close(got, want) -> None:
    if isinstance(want, tuple | list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _close(g, w)
        return
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


def _args(n: int) -> tuple[int, ...]:
    return tuple(range(n))


@pytest.mark.parametrize("name", NAMES)
def test_values_match_reference(name):
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    want = ref(*args)
    assert want.abs().sum() > 0
    _close(ours(*args), want)


@pytest.mark.parametrize("name", NAMES)
def test_grad(name):
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    a = _args(len(args))
    want = grad(_scalar(ref), argnums=a)(*args)
    assert all(w.abs().sum() > 0 for w in want)
    _close(grad(_scalar(ours), argnums=a)(*args), want)


@pytest.mark.parametrize("name", NAMES)
def test_vmap(name):
    """Every input batched (each sample its own reduction), and only the first one."""
    ours, ref, _ = CASES[name]
    samples = [_inputs(name, seed=10 * s) for s in range(B)]
    batched = [torch.stack(parts) for parts in zip(*samples, strict=True)]
    _close(vmap(ours)(*batched), vmap(ref)(*batched))
    rest = _inputs(name)[1:]
    dims = (0, *(None,) * len(rest))
    _close(vmap(ours, in_dims=dims)(batched[0], *rest), vmap(ref, in_dims=dims)(batched[0], *rest))


PER_TOKEN = ["lce_none_token_weight", "log_probs", "log_probs_softcap_temperature",
             "linear_log_probs", "linear_log_probs_temperature", "distill_kl_none",
             "linear_distill_logits_none", "linear_policy_none_softcap_temperature"]  # fmt: skip


@pytest.mark.parametrize("name", PER_TOKEN)
def test_vmap_per_token_folds_into_rows(name, monkeypatch):
    """Per-token outputs vmapped over the hidden states (here along dimension 1) are one call
    on all samples' tokens: the per-sample loop must not run."""
    from xent._engine import transforms

    def no_loop(*args):
        raise AssertionError("the per-sample loop ran")

    monkeypatch.setattr(transforms, "_loop", no_loop)
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    xs = torch.stack([_inputs(name, seed=10 * s)[0] for s in range(B)], dim=1)
    dims = (1, *(None,) * (len(args) - 1))
    _close(vmap(ours, in_dims=dims)(xs, *args[1:]), vmap(ref, in_dims=dims)(xs, *args[1:]))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad(name):
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    xs = torch.stack([_inputs(name, seed=10 * s)[0] for s in range(B)])
    dims = (0, *(None,) * (len(args) - 1))
    a = _args(len(args))
    want = vmap(grad(_scalar(ref), argnums=a), in_dims=dims)(xs, *args[1:])
    _close(vmap(grad(_scalar(ours), argnums=a), in_dims=dims)(xs, *args[1:]), want)


@pytest.mark.parametrize("name", NAMES)
def test_grad_of_vmap(name):
    """The gradient through a vmapped loss: the batching rule's outputs are differentiable."""
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    xs = torch.stack([_inputs(name, seed=10 * s)[0] for s in range(B)])
    dims = (0, *(None,) * (len(args) - 1))

    def total(f):
        return lambda xs, *rest: _scalar(vmap(f, in_dims=dims))(xs, *rest)

    a = _args(len(args))
    _close(grad(total(ours), argnums=a)(xs, *args[1:]), grad(total(ref), argnums=a)(xs, *args[1:]))


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
@pytest.mark.parametrize("name", NAMES)
def test_jacobians(name, transform):
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    a = _args(len(args))
    _close(transform(ours, argnums=a)(*args), transform(ref, argnums=a)(*args))


@pytest.mark.parametrize("name", NAMES)
def test_jvp(name):
    ours, ref, _ = CASES[name]
    args = _inputs(name)
    tangents = tuple(_inputs(name, seed=100))
    value, tangent = jvp(ours, tuple(args), tangents)
    want_value, want_tangent = jvp(ref, tuple(args), tangents)
    assert want_tangent.abs().sum() > 0
    _close((value, tangent), (want_value, want_tangent))
    # One input's tangent at a time, the others constants (no tangent at all inside).
    for i in range(len(args)):

        def only(f, i=i):
            return lambda a: f(*args[:i], a, *args[i + 1 :])

        _close(
            jvp(only(ours), (args[i],), (tangents[i],)), jvp(only(ref), (args[i],), (tangents[i],))
        )


@pytest.mark.parametrize("name", [n for n in NAMES if len(CASES[n][2]) > 1])
def test_per_sample_grads_functional_call(name):
    """Per-sample gradients of a tiny model whose head feeds the loss: vmap over the batch of
    grad over the parameters, through functional_call."""
    ours, ref, shapes = CASES[name]
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "body": torch.nn.Linear(2, H, dtype=DT),
            "head": torch.nn.Linear(H, V, bias=len(shapes) == 3, dtype=DT),
        }
    )
    params = {k: v.detach() for k, v in model.named_parameters()}
    inputs = _randn(B, N, 2, seed=7)

    def sample_loss(f):
        def loss(p, sample):
            body = {k[5:]: v for k, v in p.items() if k.startswith("body.")}
            hidden = torch.tanh(functional_call(model["body"], body, sample))
            head = [p["head.weight"]] + ([p["head.bias"]] if "head.bias" in p else [])
            return _scalar(f)(hidden, *head)

        return loss

    want = vmap(grad(sample_loss(ref)), in_dims=(None, 0))(params, inputs)
    got = vmap(grad(sample_loss(ours)), in_dims=(None, 0))(params, inputs)
    assert set(got) == set(want)
    for k in want:
        assert want[k].abs().sum() > 0
        _close(got[k], want[k])


def test_per_sample_targets_batched():
    """vmap over hidden states and targets together: each sample its own mean."""
    x = _randn(B, N, H, seed=1)
    w = _randn(V, H, seed=2)
    y = torch.stack([Y, Y.roll(1), torch.full_like(Y, -100)])  # the last sample all ignored

    def ours(x, y):
        return xent.linear_cross_entropy(x, w, y, chunk_size=2)

    def ref(x, y):
        return F.cross_entropy(F.linear(x, w), y)

    got, want = vmap(ours)(x, y), vmap(ref)(x, y)
    torch.testing.assert_close(got[:2], want[:2], **TOL)
    assert torch.isnan(want[2]) and torch.isnan(got[2])  # 0/0, as PyTorch has it
    _close(vmap(grad(ours))(x[:2], y[:2]), vmap(grad(ref))(x[:2], y[:2]))


def test_vmap_batched_teacher_and_targets():
    """Each sample its own teacher (logits, or hidden states), mask and token weights."""
    zs, zt = _randn(B, N, V, seed=20), _randn(B, N, V, seed=21)
    mask = torch.stack([MASK, MASK.roll(1), MASK.roll(2)])
    tw = torch.stack([TOKEN_W, TOKEN_W.flip(0), TOKEN_W.roll(1)])

    def ours(zs, zt, mask, tw):
        return xent.distill_divergence(zs, zt, mask, beta=0.4, token_weight=tw)

    def ref(zs, zt, mask, tw):
        return xent.distill_divergence(zs, zt, mask, beta=0.4, token_weight=tw, impl="reference")

    _close(vmap(ours)(zs, zt, mask, tw), vmap(ref)(zs, zt, mask, tw))
    _close(vmap(grad(ours))(zs, zt, mask, tw), vmap(grad(ref))(zs, zt, mask, tw))
    x, th = _randn(B, N, H, seed=22), _randn(B, N, 4, seed=23)
    w = _randn(V, H, seed=24)
    y = torch.stack([Y, Y.roll(1), Y.roll(2)])
    for reduction in ("none", "batchmean"):

        def lin(x, th, y, impl="auto", reduction=reduction):
            return xent.linear_distill_divergence(
                x, w, y, teacher_hidden=th, teacher_weight=TEACHER_W, reduction=reduction,
                chunk_size=2, impl=impl,
            )  # fmt: skip

        def lin_ref(x, th, y):
            return lin(x, th, y, impl="reference")

        _close(vmap(lin)(x, th, y), vmap(lin_ref)(x, th, y))
        _close(vmap(grad(_scalar(lin)))(x, th, y), vmap(grad(_scalar(lin_ref)))(x, th, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_grads_match_eager(dtype):
    """torch.func.grad in fp32 and bf16: the eager path's gradients, in the inputs' dtypes."""
    x = _randn(N, H, seed=30).to(dtype).requires_grad_()
    w = _randn(V, H, seed=31).to(dtype).requires_grad_()

    def loss(x, w):
        return xent.linear_cross_entropy(x, w, Y, label_smoothing=0.1, chunk_size=2)

    loss(x, w).backward()
    got = grad(loss, argnums=(0, 1))(x.detach(), w.detach())
    for g, want in zip(got, (x.grad, w.grad), strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-3)  # fmt: skip


def test_module_per_sample_grads():
    """xent.nn.LinearCrossEntropyLoss owns its head: per-sample gradients of its parameters
    through functional_call, targets batched with the hidden states."""
    torch.manual_seed(0)
    module = xent.nn.LinearCrossEntropyLoss(
        H, V, bias=True, dtype=DT, chunk_size=2, label_smoothing=0.1
    )
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = _randn(B, N, H, seed=3)
    y = torch.stack([Y, Y.roll(2), Y.flip(0)])

    def ours(p, x, y):
        return functional_call(module, p, (x, y))

    def ref(p, x, y):
        z = F.linear(x, p["linear.weight"], p["linear.bias"])
        return F.cross_entropy(z, y, label_smoothing=0.1)

    want = vmap(grad(ref), in_dims=(None, 0, 0))(params, x, y)
    got = vmap(grad(ours), in_dims=(None, 0, 0))(params, x, y)
    assert set(got) == set(want) == {"linear.weight", "linear.bias"}
    for k in want:
        _close(got[k], want[k])


def test_bad_values_raise_inside_transforms():
    x, w = _randn(N, H, seed=3), _randn(V, H, seed=4)
    bad = Y.clone()
    bad[0] = V
    with pytest.raises(IndexError, match=str(V)):
        grad(lambda x: xent.linear_cross_entropy(x, w, bad))(x)
    with pytest.raises(IndexError, match=str(V)):
        vmap(lambda z: xent.log_probs(z, bad))(_randn(B, N, V, seed=5))
    with pytest.raises(ValueError, match="temperature"):
        grad(lambda z: xent.log_probs(z, Y, temperature=-TEMP).sum())(_randn(N, V, seed=5))


def test_no_second_derivative():
    z = _randn(N, V, seed=5)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        jacrev(jacrev(lambda z: xent.log_probs(z, Y).sum()))(z)


@pytest.mark.parametrize(
    "call",
    [
        lambda z: xent.distributed.vocab_parallel_cross_entropy(z, Y),
        lambda z: xent.posttrain.vocab_parallel_log_probs(z, Y),
        lambda z: xent.posttrain.vocab_parallel_linear_log_probs(
            z[:, :H], torch.ones(V, H, dtype=DT), Y
        ),
        lambda z: xent.distributed.vocab_parallel_linear_cross_entropy(
            z[:, :H], torch.ones(V, H, dtype=DT), Y
        ),
    ],
)
def test_vocab_parallel_refuses_transforms(call):
    z = _randn(N, V, seed=5)
    with pytest.raises(RuntimeError, match=r"does not support torch\.func"):
        grad(lambda z: call(z).sum())(z)
    with pytest.raises(RuntimeError, match=r"does not support torch\.func"):
        vmap(call)(z[None])


def test_policy_stats_under_vmap_match_eager():
    """return_stats under vmap: each sample's loss and per-token statistics, as eager, and the
    clip flags still bool."""
    xs = torch.stack([_inputs("linear_policy_mean_off_policy", seed=10 * s)[0] for s in range(B)])
    w = _randn(V, H, seed=40)

    def f(x):
        return xent.linear_policy_loss(
            x, w, Y, ADV, old_log_probs=OLD_LP, entropy_coef=0.1, return_stats=True, chunk_size=2
        )

    got = vmap(f)(xs)
    assert got.clipped.dtype == torch.bool
    for i in range(B):
        want = f(xs[i])
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g[i], e, **TOL)
