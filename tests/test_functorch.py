"""``torch.func`` transforms over xent's functions on logits and probabilities.

Every case pairs a xent function with its PyTorch namesake and an input builder; every transform
(``grad``, ``vmap``, ``vmap∘grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``jacfwd∘jacrev``,
``jacrev∘jacfwd``) is applied
to both and the results compared in fp64. Per-sample gradients of a tiny ``nn.Linear`` model go
through ``torch.func.functional_call``, as differential-privacy training does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import func

import xent

B, N, C = 3, 4, 5  # batch of samples for vmap, rows per sample, classes
TOL = {"rtol": 1e-10, "atol": 1e-12}


@dataclass
class Case:
    """``ours(*args, **kwargs)`` against ``theirs(*args, **kwargs)``; ``build(lead)`` makes the
    positional tensors with a leading ``lead`` shape (``()`` unbatched, ``(B,)`` for vmap);
    ``diff`` lists the positions that are differentiated."""

    name: str
    ours: Callable[..., torch.Tensor]
    theirs: Callable[..., torch.Tensor]
    build: Callable[[tuple[int, ...], torch.Generator], tuple[torch.Tensor, ...]]
    diff: tuple[int, ...] = (0,)
    kwargs: dict = field(default_factory=dict)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(lead, g, *shape):
    return torch.randn(*lead, *shape, generator=g, dtype=torch.float64)


def _index(lead, g, *shape, ignore=True):
    t = torch.randint(0, C, (*lead, *shape), generator=g)
    if ignore and t.dim():
        t.view(-1)[1] = -100  # one ignored row per sample (or batch)
    return t


def _probs(lead, g, *shape):
    return torch.softmax(_logits(lead, g, *shape), dim=-1)


def _unit(lead, g, *shape):
    return torch.rand(*lead, *shape, generator=g, dtype=torch.float64) * 0.9 + 0.05


W = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
PW = torch.linspace(0.3, 3.0, C, dtype=torch.float64)
EW = torch.linspace(0.2, 1.5, N * C, dtype=torch.float64).reshape(N, C)


def _ce_idx(lead, g):
    return _logits(lead, g, N, C), _index(lead, g, N)


def _ce_idx_no_ignore(lead, g):
    return _logits(lead, g, N, C), _index(lead, g, N, ignore=False)


def _ce_idx_3d(lead, g):
    return _logits(lead, g, 2, C, 3), _index(lead, g, 2, 3)


def _ce_prob(lead, g):
    return _logits(lead, g, N, C), _probs(lead, g, N, C)


def _ce_1d(lead, g):
    return _logits(lead, g, C), _index(lead, g, ignore=False)


def _nll(lead, g):
    return torch.log_softmax(_logits(lead, g, N, C), -1), _index(lead, g, N)


def _bce(lead, g):
    return _unit(lead, g, N, C), _unit(lead, g, N, C)


def _bce_logits(lead, g):
    return _logits(lead, g, N, C), _unit(lead, g, N, C)


def _kl(lead, g):
    return torch.log_softmax(_logits(lead, g, N, C), -1), _probs(lead, g, N, C)


def _huber(lead, g):
    return 2 * _logits(lead, g, N, C), _logits(lead, g, N, C)


def _x(lead, g):
    return (_logits(lead, g, N, C),)


def _p(lead, g):
    return (_probs(lead, g, N, C),)


def _torch_entropy(p, dim=-1):
    return -torch.xlogy(p, p).sum(dim)


def _torch_ce_z_loss(x, y, *, z_loss, softcap=None, **kw):
    """PyTorch composition of cross-entropy with a soft cap and PaLM's z-loss."""
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = (y != kw.get("ignore_index", -100)).to(z.dtype)
    ce = F.cross_entropy(z, y, reduction="none", **kw)
    return (ce + z_loss * lse**2 * valid).sum() / valid.sum()


def _torch_ce_weighted_mean(x, y, *, weight, ignore_index=-100, **kw):
    """PyTorch's weighted mean from its per-row losses: its own ``"mean"`` with weights and
    label smoothing takes a ``masked_select`` that ``vmap`` refuses when the target is batched."""
    rows = F.cross_entropy(x, y, weight, ignore_index=ignore_index, reduction="none", **kw)
    valid = y != ignore_index
    return rows.sum() / torch.where(valid, weight[torch.where(valid, y, 0)], 0.0).sum()


CASES = [
    Case("ce_index_mean", xent.cross_entropy, F.cross_entropy, _ce_idx),
    Case("ce_index_sum_w", xent.cross_entropy, F.cross_entropy, _ce_idx,
         kwargs={"weight": W, "reduction": "sum"}),
    Case("ce_index_none_ls", xent.cross_entropy, F.cross_entropy, _ce_idx,
         kwargs={"reduction": "none", "label_smoothing": 0.2}),
    Case("ce_index_mean_w_ls", xent.cross_entropy, _torch_ce_weighted_mean, _ce_idx,
         kwargs={"weight": W, "label_smoothing": 0.1}),
    Case("ce_index_3d_none", xent.cross_entropy, F.cross_entropy, _ce_idx_3d,
         kwargs={"reduction": "none"}),
    Case("ce_index_1d", xent.cross_entropy, F.cross_entropy, _ce_1d),
    Case("ce_ignore_index_2", xent.cross_entropy, F.cross_entropy, _ce_idx_no_ignore,
         kwargs={"ignore_index": 2}),
    Case("ce_prob_mean", xent.cross_entropy, F.cross_entropy, _ce_prob, diff=(0, 1)),
    Case("ce_prob_none_w_ls", xent.cross_entropy, F.cross_entropy, _ce_prob, diff=(0, 1),
         kwargs={"weight": W, "reduction": "none", "label_smoothing": 0.3}),
    Case("ce_z_loss_softcap", xent.cross_entropy, _torch_ce_z_loss, _ce_idx,
         kwargs={"z_loss": 1e-2, "softcap": 2.5}),
    Case("nll_mean_w", xent.nll_loss, F.nll_loss, _nll, kwargs={"weight": W}),
    Case("nll_none", xent.nll_loss, F.nll_loss, _nll, kwargs={"reduction": "none"}),
    Case("nll_sum", xent.nll_loss, F.nll_loss, _nll, kwargs={"reduction": "sum"}),
    Case("bce_mean_w", xent.binary_cross_entropy, F.binary_cross_entropy, _bce, diff=(0, 1),
         kwargs={"weight": EW}),
    Case("bce_none", xent.binary_cross_entropy, F.binary_cross_entropy, _bce, diff=(0, 1),
         kwargs={"reduction": "none"}),
    Case("bce_logits_mean", xent.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits, _bce_logits, diff=(0, 1)),
    Case("bce_logits_sum_w_pw", xent.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits, _bce_logits, diff=(0, 1),
         kwargs={"weight": EW, "pos_weight": PW, "reduction": "sum"}),
    Case("bce_logits_none_pw", xent.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits, _bce_logits, diff=(0, 1),
         kwargs={"pos_weight": PW, "reduction": "none"}),
    Case("kl_batchmean", xent.kl_div, F.kl_div, _kl, diff=(0, 1),
         kwargs={"reduction": "batchmean"}),
    Case("kl_none_log_target", xent.kl_div, F.kl_div,
         lambda lead, g: (_kl(lead, g)[0], _kl(lead, g)[0]), diff=(0, 1),
         kwargs={"reduction": "none", "log_target": True}),
    Case("huber_mean", xent.huber_loss, F.huber_loss, _huber, diff=(0, 1),
         kwargs={"delta": 0.7}),
    Case("huber_none", xent.huber_loss, F.huber_loss, _huber, diff=(0, 1),
         kwargs={"reduction": "none"}),
    Case("log_softmax", xent.log_softmax, F.log_softmax, _x, kwargs={"dim": -1}),
    Case("softmax", xent.softmax, F.softmax, _x, kwargs={"dim": 0}),
    Case("logsumexp", xent.logsumexp, torch.logsumexp, _x, kwargs={"dim": -1}),
    Case("entropy", xent.entropy, _torch_entropy, _p),
    Case("nn_ce", xent.nn.CrossEntropyLoss(weight=W, reduction="none", label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(weight=W, reduction="none", label_smoothing=0.1), _ce_idx),
    Case("nn_nll", xent.nn.NLLLoss(reduction="sum"), torch.nn.NLLLoss(reduction="sum"), _nll),
    Case("nn_bce", xent.nn.BCELoss(), torch.nn.BCELoss(), _bce, diff=(0, 1)),
    Case("nn_bce_logits", xent.nn.BCEWithLogitsLoss(pos_weight=PW),
         torch.nn.BCEWithLogitsLoss(pos_weight=PW), _bce_logits, diff=(0, 1)),
    Case("nn_kl", xent.nn.KLDivLoss(reduction="batchmean"),
         torch.nn.KLDivLoss(reduction="batchmean"), _kl, diff=(0, 1)),
    Case("nn_huber", xent.nn.HuberLoss(delta=0.5), torch.nn.HuberLoss(delta=0.5), _huber,
         diff=(0, 1)),
]  # fmt: skip


def _bind(case: Case, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return functools.partial(fn, **case.kwargs)


def _scalar(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda *a: fn(*a).sum()


def _only_diff(case: Case, fn: Callable[..., torch.Tensor], args: tuple) -> Callable:
    """``fn`` as a function of the differentiated arguments only (the rest held fixed)."""

    def call(*diff):
        full = list(args)
        for i, t in zip(case.diff, diff, strict=True):
            full[i] = t
        return fn(*full)

    return call


def _apply(transform: str, case: Case, fn: Callable[..., torch.Tensor], g: torch.Generator):
    if transform == "vmap":
        return func.vmap(fn)(*case.build((B,), g))
    if transform == "vmap_grad":
        return func.vmap(func.grad(_scalar(fn), argnums=case.diff))(*case.build((B,), g))
    args = case.build((), g)
    if transform == "grad":
        return func.grad(_scalar(fn), argnums=case.diff)(*args)
    if transform == "jacrev":
        return func.jacrev(fn, argnums=case.diff)(*args)
    if transform == "jacfwd":
        return func.jacfwd(fn, argnums=case.diff)(*args)
    if transform == "jvp":
        f = _only_diff(case, fn, args)
        primals = tuple(args[i] for i in case.diff)
        tangents = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals)
        return func.jvp(f, primals, tangents)
    if transform == "hessian":  # forward over reverse: jvp through the closed-form gradient
        return func.jacfwd(func.jacrev(_scalar(fn), argnums=case.diff), argnums=case.diff)(*args)
    if transform == "hessian_rev_fwd":  # reverse over forward: backward through the jvp formulas
        return func.jacrev(func.jacfwd(_scalar(fn), argnums=case.diff), argnums=case.diff)(*args)
    raise AssertionError(transform)


# Forward over forward (jacfwd∘jacfwd) is left out: PyTorch drops the outer tangent of every
# autograd.Function's jvp (pytorch/pytorch#197867), so it is zero for any custom Function.
TRANSFORMS = ("grad", "vmap", "vmap_grad", "jacrev", "jacfwd", "jvp", "hessian", "hessian_rev_fwd")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_transform_matches_torch(case: Case, transform: str) -> None:
    ours = _apply(transform, case, _bind(case, case.ours), _gen())
    theirs = _apply(transform, case, _bind(case, case.theirs), _gen())
    torch.testing.assert_close(ours, theirs, **TOL)


# --------------------------------------------------------------------------------------------
# Per-sample gradients of a tiny model
# --------------------------------------------------------------------------------------------

H = 6


def _index_target(g):
    return torch.randint(0, C, (B,), generator=g)


def _ce_ls_z(o, y):
    return F.cross_entropy(o, y, label_smoothing=0.1) + 1e-3 * torch.logsumexp(o, 0) ** 2


def _heads():
    """``(name, ours, theirs, target builder)``: a loss on the model's ``(C)`` output."""
    return [
        ("ce", xent.cross_entropy, F.cross_entropy, _index_target),
        ("ce_ls_z", functools.partial(xent.cross_entropy, label_smoothing=0.1, z_loss=1e-3),
         _ce_ls_z, _index_target),
        ("ce_prob", xent.cross_entropy, F.cross_entropy, lambda g: _probs((B,), g, C)),
        ("nll", lambda o, y: xent.nll_loss(xent.log_softmax(o, 0), y, weight=W),
         lambda o, y: F.nll_loss(F.log_softmax(o, 0), y, weight=W),
         _index_target),
        ("bce", lambda o, y: xent.binary_cross_entropy(torch.sigmoid(o), y),
         lambda o, y: F.binary_cross_entropy(torch.sigmoid(o), y), lambda g: _unit((B,), g, C)),
        ("bce_logits", functools.partial(xent.binary_cross_entropy_with_logits, pos_weight=PW),
         functools.partial(F.binary_cross_entropy_with_logits, pos_weight=PW),
         lambda g: _unit((B,), g, C)),
        ("kl", lambda o, y: xent.kl_div(xent.log_softmax(o, 0), y, reduction="sum"),
         lambda o, y: F.kl_div(F.log_softmax(o, 0), y, reduction="sum"),
         lambda g: _probs((B,), g, C)),
        ("huber", xent.huber_loss, F.huber_loss, lambda g: _logits((B,), g, C)),
        ("entropy_lse", lambda o, y: xent.entropy(xent.softmax(o, 0)) + xent.logsumexp(o, 0),
         lambda o, y: _torch_entropy(F.softmax(o, 0)) + torch.logsumexp(o, 0),
         lambda g: torch.zeros(B)),
        ("nn_ce", xent.nn.CrossEntropyLoss(weight=W), torch.nn.CrossEntropyLoss(weight=W),
         _index_target),
    ]  # fmt: skip


@pytest.mark.parametrize("head", _heads(), ids=lambda h: h[0])
def test_per_sample_grads_of_a_model(head) -> None:
    _, ours, theirs, make_target = head
    torch.manual_seed(0)
    model = torch.nn.Linear(H, C, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = _gen(1)
    x = torch.randn(B, H, generator=g, dtype=torch.float64)
    y = make_target(g)

    def per_sample(loss_fn):
        def loss(p, xi, yi):
            return loss_fn(func.functional_call(model, p, (xi,)), yi)

        return func.vmap(func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample(ours), per_sample(theirs)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL)
    # The per-sample gradients add up to the batch's gradient (a sum of per-sample losses).
    total = func.grad(
        lambda p: sum(ours(func.functional_call(model, p, (x[i],)), y[i]) for i in range(B))
    )(params)
    for k in want:
        torch.testing.assert_close(got[k].sum(0), total[k], **TOL)


# --------------------------------------------------------------------------------------------
# Checks under transforms, and transforms under torch.compile
# --------------------------------------------------------------------------------------------


def test_out_of_range_targets_raise_under_transforms() -> None:
    """The target range is read beneath the wrappers: every sample of a vmap at once."""
    x = torch.randn(B, N, C, dtype=torch.float64)
    y = torch.randint(0, C, (B, N))
    y[2, 1] = C + 2
    for fn in (xent.cross_entropy, xent.nll_loss):
        with pytest.raises(IndexError, match=f"Target {C + 2} is out of bounds"):
            func.vmap(fn)(x, y)
        with pytest.raises(IndexError, match=f"Target {C + 2} is out of bounds"):
            func.vmap(func.grad(fn))(x, y)
        with pytest.raises(IndexError, match=f"Target {C + 2} is out of bounds"):
            func.grad(fn)(x[2], y[2])


def test_probabilities_outside_the_unit_interval_raise_under_transforms() -> None:
    p = torch.rand(B, N, dtype=torch.float64)
    y = torch.rand(B, N, dtype=torch.float64)
    p[1, 2] = 1.5
    with pytest.raises(ValueError, match=r"input should be between 0 and 1, got 1\.5"):
        func.vmap(func.grad(xent.binary_cross_entropy))(p, y)
    with pytest.raises(ValueError, match=r"target should be between 0 and 1, got 1\.5"):
        func.jacfwd(xent.binary_cross_entropy)(y[1], p[1])


def test_compiled_transforms_match_torch() -> None:
    """``torch.compile(fullgraph=True)`` of per-sample gradients traces without graph breaks."""
    g = _gen(2)
    x = _logits((B,), g, N, C)
    y = _index((B,), g, N)
    p = _unit((B,), g, N, C)

    def ce(ce_fn):
        return func.vmap(func.grad(functools.partial(ce_fn, label_smoothing=0.1, reduction="sum")))

    def bce(bce_fn):
        return func.vmap(func.grad(functools.partial(bce_fn, pos_weight=PW), argnums=(0, 1)))

    compiled = torch.compile(ce(xent.cross_entropy), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), ce(F.cross_entropy)(x, y), **TOL)
    compiled = torch.compile(
        bce(xent.binary_cross_entropy_with_logits), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x, p), bce(F.binary_cross_entropy_with_logits)(x, p), **TOL)
