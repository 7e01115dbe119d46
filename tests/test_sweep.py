"""A generated sweep of every xent function and module that has a PyTorch namesake, run against it.

Each case builds seeded inputs on a grid of shapes (empty and K-dimensional included), dtypes,
reductions, options and call styles (keywords, PyTorch's positional order, the legacy
``size_average``/``reduce`` slots), calls PyTorch and xent the same way, and compares:

- when PyTorch raises, xent raises an instance of PyTorch's exception class;
- otherwise the output's dtype and shape exactly, its values, and the gradient of a seeded
  cotangent with respect to every floating input (and module parameter) that PyTorch can
  differentiate.

Values and gradients agree with PyTorch's within a dtype's tolerance, or else are at least as close
to the float64 answer (PyTorch run on the same inputs in float64) as PyTorch's own result is, plus
that tolerance: xent may be more accurate than PyTorch, never less. PyTorch computes every
expectation.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_error_floor

import xent
import xent.nn

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# Relative tolerance per dtype, used both against PyTorch's result and as the slack over
# PyTorch's own error against the float64 answer.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}
SHIFTS = {"shift1e3": 1e3, "shift1e4": 1e4, "shift1e7": 1e7}
REDUCTIONS = ("none", "mean", "sum")
# The legacy slots and the reduction PyTorch translates them to (the case's reduction label).
LEGACY = {
    "legacy_sum": {"size_average": False},
    "legacy_none": {"reduce": False},
    "legacy_mean": {"size_average": True, "reduce": True},
}
SAMPLE_SEED = 15


@dataclass(frozen=True)
class Case:
    """One point of the grid: ``fn`` names the function (``nn.X`` a module), ``p`` its axes."""

    fn: str
    p: tuple[tuple[str, Any], ...]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.p)

    @property
    def id(self) -> str:
        parts = [self.fn]
        for k, v in self.p:
            if k == "shape":
                v = "x".join(map(str, v)) if v else "scalar"
            elif isinstance(v, tuple):
                v = "dims" + "_".join(map(str, v))
            elif k == "dim":
                v = f"dim{v}"
            elif k == "delta":
                v = f"delta{v}"
            elif k == "bias":
                v = "bias" if v else "nobias"
            elif k == "keepdim":
                v = "keepdim" if v else "nokeepdim"
            elif k == "log_target":
                v = "logtarget" if v else "probtarget"
            elif k == "dtype_kw":
                v = f"dtype={v}"
            parts.append(str(v))
        return "-".join(parts)


@dataclass
class Call:
    """One call, made the same way on both sides: ``values`` maps PyTorch's parameter names to
    the values to pass (tensors shared by both sides; the floating ones that require grad are
    differentiated), ``style`` says how they are passed (``kw``, ``pos``, ``legacy_*``). A module
    case gives its constructor every value but ``input`` and ``target``."""

    values: dict[str, Any]
    style: str = "kw"


# --------------------------------------------------------------------------- inputs


def _gen(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case.id.encode()))


def _randn(
    g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.is_floating_point())


def _weight(t: torch.Tensor, opt: str) -> torch.Tensor:
    """A weight: a leaf to differentiate under the ``weight_grad`` option, else a constant (PyTorch
    refuses a class weight that requires grad for class-index targets)."""
    return _leaf(t) if opt == "weight_grad" else t


def _class_dim(shape: tuple[int, ...]) -> int:
    return 0 if len(shape) == 1 else 1


def _index_target(g, shape, opt, ignore_index):
    """Class indices for logits of ``shape`` (class axis 0 for 1-D, else 1), with the option's
    ignored or faulty entries."""
    c = shape[_class_dim(shape)]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, max(c, 1), tshape, generator=g)
    if "ignore" in opt and t.numel():
        t.view(-1)[::2] = ignore_index
    if opt == "all_ignored":
        t = torch.full_like(t, ignore_index)
    if opt == "oob" and t.numel():
        t.view(-1)[-1] = c
    if opt == "int32_target":
        t = t.int()
    if opt == "uint8_target":
        t = t.clamp(min=0).to(torch.uint8)
    if opt == "batch_mismatch":
        t = torch.zeros((tshape[0] + 1, *tshape[1:]) if tshape else (2,), dtype=torch.long)
    return t


def _class_weight(g, c, dtype, opt):
    if "weight" not in opt:
        return None
    n = c + 1 if opt == "bad_weight" else c
    return _weight((0.25 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype), opt)


def _logits(g, shape, dtype, opt):
    if opt in SHIFTS:
        return _leaf(
            (3 * torch.randn(shape, generator=g, dtype=torch.float64)).add(SHIFTS[opt]).to(dtype)
        )
    x = _randn(g, shape, dtype, 3.0)
    if opt == "ninf" and x.numel() > 1:
        x.view(-1)[1::3] = -math.inf
    if opt == "all_ninf" and x.numel():
        if x.dim() <= 1:
            x.fill_(-math.inf)
        else:
            x[0] = -math.inf
    if opt == "pinf" and x.numel():
        x.view(-1)[0] = math.inf
    return _leaf(x)


# --------------------------------------------------------------------------- builders


def _build_cross_entropy(case: Case, g) -> Call:
    p = case.params
    shape, dtype, opt = p["shape"], DTYPES[p["dtype"]], p["opt"]
    c = shape[_class_dim(shape)]
    x = _logits(g, shape, dtype, opt)
    ignore_index = 1 if opt == "ignore_cls" else -100
    values: dict[str, Any] = {"input": x}
    if p["target"] == "index":
        values["target"] = _index_target(g, shape, opt, ignore_index)
    else:
        q = torch.rand(shape, generator=g, dtype=torch.float64)
        q = q / q.sum(_class_dim(shape), keepdim=True).clamp(min=1e-3)
        values["target"] = _leaf(q.to(dtype))
    w = _class_weight(g, c, dtype, opt)
    if w is not None:
        values["weight"] = w
    if "ignore" in opt:
        values["ignore_index"] = ignore_index
    if "smooth" in opt:
        values["label_smoothing"] = 0.2
    values["reduction"] = p["reduction"]
    return Call(values, p["style"])


def _build_nll_loss(case: Case, g) -> Call:
    call = _build_cross_entropy(case, g)
    x = call.values["input"]
    call.values["input"] = _leaf(x.detach().double().log_softmax(_class_dim(x.shape)).to(x.dtype))
    return call


def _probabilities(g, shape, dtype, opt):
    p = torch.rand(shape, generator=g, dtype=torch.float64) * 0.98 + 0.01
    if opt == "saturated" and p.numel():
        p.view(-1)[::3] = 0.0
        p.view(-1)[1::3] = 1.0
    if opt == "oob_input" and p.numel():
        p.view(-1)[0] = 1.5
    return _leaf(p.to(dtype))


def _elementwise_weights(g, shape, dtype, opt, values):
    last = shape[-1:] if shape else ()
    if opt in ("weight", "weight_grad", "weight_pos_weight"):
        w = torch.rand(shape, generator=g, dtype=torch.float64).add(0.5).to(dtype)
        values["weight"] = _weight(w, opt)
    if opt == "weight_bcast":
        values["weight"] = torch.rand(last, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    if opt in ("pos_weight", "weight_pos_weight"):
        values["pos_weight"] = torch.rand(last, generator=g, dtype=torch.float64).mul(3).to(dtype)


def _binary_target(g, shape, dtype, opt):
    if opt == "shape_mismatch":
        shape = (*shape, 2)
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    if opt == "hard_targets":
        y = y.round()
    return _leaf(y.to(dtype))


def _build_binary_cross_entropy(case: Case, g) -> Call:
    p = case.params
    shape, dtype, opt = p["shape"], DTYPES[p["dtype"]], p["opt"]
    values = {
        "input": _probabilities(g, shape, dtype, opt),
        "target": _binary_target(g, shape, dtype, opt),
    }
    _elementwise_weights(g, shape, dtype, opt, values)
    values["reduction"] = p["reduction"]
    return Call(values, p["style"])


def _build_binary_cross_entropy_with_logits(case: Case, g) -> Call:
    p = case.params
    shape, dtype, opt = p["shape"], DTYPES[p["dtype"]], p["opt"]
    scale = 50.0 if opt == "large" else 3.0
    values = {
        "input": _leaf(_randn(g, shape, dtype, scale)),
        "target": _binary_target(g, shape, dtype, opt),
    }
    _elementwise_weights(g, shape, dtype, opt, values)
    values["reduction"] = p["reduction"]
    return Call(values, p["style"])


def _build_kl_div(case: Case, g) -> Call:
    p = case.params
    shape, dtype, opt = p["shape"], DTYPES[p["dtype"]], p["opt"]
    dim = -1
    x = torch.randn(shape, generator=g, dtype=torch.float64).log_softmax(dim)
    tshape = shape[-1:] if opt == "broadcast" else shape
    q = torch.randn(tshape, generator=g, dtype=torch.float64).softmax(dim)
    if opt == "zero_target" and q.numel():
        q.view(-1)[::3] = 0.0
    t = q.log() if p["log_target"] else q
    values = {
        "input": _leaf(x.to(dtype)),
        "target": _leaf(t.to(dtype)),
        "reduction": p["reduction"],
        "log_target": p["log_target"],
    }
    return Call(values, p["style"])


def _build_huber_loss(case: Case, g) -> Call:
    p = case.params
    shape, dtype, opt = p["shape"], DTYPES[p["dtype"]], p["opt"]
    values = {
        "input": _leaf(_randn(g, shape, dtype, 2.0)),
        "target": _leaf(_randn(g, shape, dtype, 2.0)),
        "reduction": p["reduction"],
        "delta": p["delta"],
    }
    _elementwise_weights(g, shape, dtype, opt, values)
    return Call(values, p["style"])


def _build_softmax(case: Case, g) -> Call:
    p = case.params
    values = {"input": _logits(g, p["shape"], DTYPES[p["dtype"]], p["opt"]), "dim": p["dim"]}
    if p["dtype_kw"] != "none":
        values["dtype"] = DTYPES[p["dtype_kw"]]
    return Call(values, p["style"])


def _build_logsumexp(case: Case, g) -> Call:
    p = case.params
    values = {
        "input": _logits(g, p["shape"], DTYPES[p["dtype"]], p["opt"]),
        "dim": p["dim"],
        "keepdim": p["keepdim"],
    }
    return Call(values, p["style"])


def _build_linear_cross_entropy(case: Case, g) -> Call:
    p = case.params
    dtype, opt = DTYPES[p["dtype"]], p["opt"]
    n, h, c, k = p["shape"]  # k: the linear weight's extra dimension (0: none, -1: unbatched)
    xshape = (h,) if k < 0 else (n, h)
    wshape = (c, k, h) if k > 0 else (c, h)
    x = _leaf(_randn(g, xshape, dtype))
    w = _leaf(_randn(g, wshape, dtype, 1.0 / math.sqrt(h)))
    lshape = wshape[:-1] if k < 0 else (n, *wshape[:-1])  # the logits' shape
    values: dict[str, Any] = {"input": x, "linear_weight": w}
    if p["target"] == "index":
        values["target"] = _index_target(g, lshape, opt, -100)
    else:
        q = torch.rand(lshape, generator=g, dtype=torch.float64)
        values["target"] = _leaf((q / q.sum(_class_dim(lshape), keepdim=True)).to(dtype))
    if p["bias"] or opt in SHIFTS:
        b = torch.randn(wshape[:-1], generator=g, dtype=torch.float64) + SHIFTS.get(opt, 0.0)
        values["linear_bias"] = _leaf(b.to(dtype))
    w_cls = _class_weight(g, c, dtype, opt)
    if w_cls is not None:
        values["weight"] = w_cls
    if opt in ("ignore", "all_ignored"):
        values["ignore_index"] = -100
    if "smooth" in opt:
        values["label_smoothing"] = 0.2
    values["reduction"] = p["reduction"]
    return Call(values, p["style"])


BUILDERS: dict[str, Callable[[Case, torch.Generator], Call]] = {
    "cross_entropy": _build_cross_entropy,
    "nll_loss": _build_nll_loss,
    "binary_cross_entropy": _build_binary_cross_entropy,
    "binary_cross_entropy_with_logits": _build_binary_cross_entropy_with_logits,
    "kl_div": _build_kl_div,
    "huber_loss": _build_huber_loss,
    "log_softmax": _build_softmax,
    "softmax": _build_softmax,
    "logsumexp": _build_logsumexp,
    "linear_cross_entropy": _build_linear_cross_entropy,
}
MODULES = {
    "CrossEntropyLoss": "cross_entropy",
    "NLLLoss": "nll_loss",
    "BCELoss": "binary_cross_entropy",
    "BCEWithLogitsLoss": "binary_cross_entropy_with_logits",
    "KLDivLoss": "kl_div",
    "HuberLoss": "huber_loss",
    "LinearCrossEntropyLoss": "linear_cross_entropy",
}
# What a module's forward takes; the rest of a functional call's values go to its constructor.
FORWARD_ARGS = ("input", "target")


def _torch_function(name: str) -> Callable[..., Any]:
    return torch.logsumexp if name == "logsumexp" else getattr(F, name)


def _torch_order(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    if fn is torch.logsumexp:
        P = inspect.Parameter
        return [
            P(n, P.POSITIONAL_OR_KEYWORD, default=d)
            for n, d in (("input", P.empty), ("dim", P.empty), ("keepdim", False))
        ]
    return list(inspect.signature(fn).parameters.values())[
        int(inspect.isclass(fn) or fn.__name__ == "__init__") :
    ]


def _arguments(
    call: Call,
    signature: list[inspect.Parameter],
    values: dict[str, Any],
    required: tuple[str, ...],
):
    """The ``(args, kwargs)`` of a call in the case's style, by PyTorch's parameter order."""
    values = dict(values)
    if call.style.startswith("legacy"):
        values.pop("reduction", None)
        values.update(LEGACY[call.style])
    if call.style == "pos":
        positional = [
            q for q in signature if q.kind == q.POSITIONAL_OR_KEYWORD and not q.name.startswith("_")
        ]
        last = max((i for i, q in enumerate(positional) if q.name in values), default=-1)
        args = [
            values.pop(q.name) if q.name in values else q.default for q in positional[: last + 1]
        ]
        return tuple(args), values
    args = tuple(values.pop(name) for name in required if name in values)
    return args, values


# --------------------------------------------------------------------------- grid


def _product(fn: str, **axes: Any) -> Iterator[Case]:
    names = list(axes)
    for combo in itertools.product(*axes.values()):
        yield Case(fn, tuple(zip(names, combo, strict=True)))


def _thin(cases: list[Case], keep: Callable[[dict[str, Any]], bool], cap: int) -> list[Case]:
    """All cases ``keep`` marks as core, plus a seeded sample of the rest, an equal share per
    dtype, up to ``cap`` in all."""
    core = [c for c in cases if keep(c.params)]
    rest: dict[str, list[Case]] = {}
    for c in cases:
        if not keep(c.params):
            rest.setdefault(c.params["dtype"], []).append(c)
    rng = random.Random(SAMPLE_SEED)
    share = max(0, cap - len(core)) // max(len(rest), 1)
    return core + [c for d in sorted(rest) for c in rng.sample(rest[d], min(share, len(rest[d])))]


CE_SHAPES = [
    (7,),
    (1, 1),
    (5, 1),
    (5, 7),
    (0, 7),
    (0, 0),
    (3, 0),
    (2, 4, 0),
    (0, 4, 3),
    (2, 4, 3),
    (2, 3, 2, 2),
]
CE_INDEX_OPTS = [
    "plain",
    "weight",
    "weight_grad",
    "ignore",
    "ignore_cls",
    "all_ignored",
    "smooth",
    "weight_smooth_ignore",
    "ninf",
    *SHIFTS,
    "oob",
    "int32_target",
    "uint8_target",
    "bad_weight",
    "batch_mismatch",
]
CE_PROB_OPTS = ["plain", "weight", "weight_grad", "smooth", "weight_smooth", "ignore", *SHIFTS]
# Options run only in fp32 with keywords: the ones PyTorch refuses (any reduction for the last two).
NARROW_OPTS = {"weight_grad", "uint8_target"}
ERROR_OPTS = {
    "oob",
    "int32_target",
    "bad_weight",
    "batch_mismatch",
    "oob_input",
    "shape_mismatch",
    "bad_delta",
}
# How a call is made: keywords, PyTorch's positional order, the legacy slots, or keywords under
# CPU autocast (bf16) with fp32 inputs.
STYLES = ["kw", "pos", *LEGACY, "autocast"]


def _sensible(p: dict[str, Any]) -> bool:
    opt, style = p.get("opt", "plain"), p.get("style", "kw")
    if opt in SHIFTS and p["dtype"] != "fp32":
        return False
    if (opt in ERROR_OPTS or style != "kw") and p["dtype"] != "fp32":
        return False
    if style.startswith("legacy") and p.get("reduction") != "mean":
        return False  # the legacy slots choose the reduction
    if (
        (opt in ERROR_OPTS or style != "kw")
        and p.get("reduction", "mean") != "mean"
        and not style.startswith("legacy")
    ):
        return False
    if opt in ERROR_OPTS | NARROW_OPTS and style != "kw":
        return False
    if opt in NARROW_OPTS and p["dtype"] != "fp32":
        return False
    return True


def _label_legacy(cases: Iterator[Case]) -> Iterator[Case]:
    """A legacy call's reduction label says which reduction it asks for."""
    for c in cases:
        p = c.params
        if p.get("style", "kw").startswith("legacy"):
            p["reduction"] = p["style"].removeprefix("legacy_")
            c = Case(c.fn, tuple(p.items()))
        yield c


def _classification_cases(fn: str, cap: int) -> list[Case]:
    cases = []
    kinds = (
        [("index", CE_INDEX_OPTS), ("prob", CE_PROB_OPTS)]
        if fn == "cross_entropy"
        else [("index", CE_INDEX_OPTS)]
    )
    for target, opts in kinds:
        # nll_loss takes log-probabilities (made in float64): no smoothing, no offsets to lose.
        opts = [o for o in opts if fn == "cross_entropy" or ("smooth" not in o and o not in SHIFTS)]
        cases += _product(
            fn,
            shape=CE_SHAPES,
            target=[target],
            dtype=DTYPES,
            reduction=REDUCTIONS,
            opt=opts,
            style=STYLES,
        )
    cases = [c for c in cases if _sensible(c.params)]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and (
            p["shape"] in [(5, 7), (0, 7), (2, 4, 3), (7,)] or p["opt"] == "plain"
        )

    return list(_label_legacy(iter(_thin(cases, core, cap))))


ELEM_SHAPES = [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)]


def _binary_cases(fn: str, cap: int) -> list[Case]:
    opts = ["plain", "weight", "weight_grad", "weight_bcast", "hard_targets", "shape_mismatch"]
    opts += (
        ["saturated", "oob_input"]
        if fn == "binary_cross_entropy"
        else ["pos_weight", "weight_pos_weight", "large"]
    )
    cases = [
        c
        for c in _product(
            fn, shape=ELEM_SHAPES, dtype=DTYPES, reduction=REDUCTIONS, opt=opts, style=STYLES[:-1]
        )
        if _sensible(c.params)
    ]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" or p["opt"] == "plain"

    return list(_label_legacy(iter(_thin(cases, core, cap))))


def _kl_cases(cap: int) -> list[Case]:
    shapes = [(5,), (4, 7), (0, 5), (3, 0), (2, 3, 4)]
    cases = _product(
        "kl_div",
        shape=shapes,
        dtype=DTYPES,
        reduction=[*REDUCTIONS, "batchmean"],
        log_target=[False, True],
        opt=["plain", "zero_target", "broadcast"],
        style=STYLES[:-1],
    )
    cases = [
        c
        for c in cases
        if _sensible(c.params)
        and not (c.params["reduction"] == "batchmean" and c.params["style"] != "kw")
    ]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and p["style"] == "kw"

    return list(_label_legacy(iter(_thin(cases, core, cap))))


def _huber_cases(cap: int) -> list[Case]:
    cases = _product(
        "huber_loss",
        shape=ELEM_SHAPES,
        dtype=DTYPES,
        reduction=REDUCTIONS,
        delta=[1.0, 0.5, 2.5, 0.0],
        opt=["plain", "weight", "weight_grad", "weight_bcast"],
        style=["kw", "pos"],
    )
    cases = [
        c
        for c in cases
        if _sensible(c.params) and not (c.params["delta"] == 0.0 and c.params["dtype"] != "fp32")
    ]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and p["opt"] == "plain"

    return _thin(cases, core, cap)


ACT_SHAPES = [(), (0,), (5,), (3, 7), (2, 0, 4), (2, 3, 0), (2, 3, 4)]
ACT_OPTS = ["plain", "ninf", "all_ninf", *SHIFTS]


def _dims(shape: tuple[int, ...]) -> list[int]:
    nd = max(len(shape), 1)
    return sorted({0, -1, nd - 1, 1 if nd > 2 else 0, nd})  # nd: out of range


def _softmax_cases(fn: str, cap: int) -> list[Case]:
    cases = []
    for shape in ACT_SHAPES:
        cases += _product(
            fn,
            shape=[shape],
            dtype=DTYPES,
            dim=_dims(shape),
            dtype_kw=["none", "fp64", "fp32"],
            opt=ACT_OPTS,
            style=["kw", "pos", "autocast"],
        )
    keep = []
    for c in cases:
        p = c.params
        if p["opt"] in SHIFTS and p["dtype"] != "fp32":
            continue
        if p["style"] != "kw" and (p["dtype_kw"] != "none" or p["dtype"] != "fp32"):
            continue
        if p["dtype_kw"] == "fp32" and p["dtype"] not in ("bf16", "fp16"):
            continue
        if p["dim"] == max(len(p["shape"]), 1) and (p["dtype"], p["opt"], p["dtype_kw"]) != (
            "fp32",
            "plain",
            "none",
        ):
            continue  # an out-of-range dim: one call per shape is enough
        keep.append(c)

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and p["dtype_kw"] == "none" and p["style"] == "kw"

    return _thin(keep, core, cap)


def _logsumexp_cases(cap: int) -> list[Case]:
    cases = []
    for shape in ACT_SHAPES:
        dims = _dims(shape) + ([(0, -1)] if len(shape) >= 2 else [])
        cases += _product(
            "logsumexp",
            shape=[shape],
            dtype=DTYPES,
            dim=dims,
            keepdim=[False, True],
            opt=[*ACT_OPTS, "pinf"],
            style=["kw", "pos", "autocast"],
        )
    cases = [
        c
        for c in cases
        if not (c.params["opt"] in SHIFTS and c.params["dtype"] != "fp32")
        and not (c.params["style"] != "kw" and c.params["dtype"] != "fp32")
        and not (
            c.params["dim"] == max(len(c.params["shape"]), 1)
            and (c.params["dtype"], c.params["opt"]) != ("fp32", "plain")
        )
    ]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and p["style"] == "kw"

    return _thin(cases, core, cap)


def _linear_cases(cap: int) -> list[Case]:
    # (N, H, C, K): K = 0 a (C, H) head, K > 0 a (C, K, H) head, K = -1 an unbatched (H,) input.
    shapes = [
        (5, 3, 6, 0),
        (1, 3, 1, 0),
        (0, 3, 6, 0),
        (5, 3, 0, 0),
        (4, 3, 5, 2),
        (0, 3, 5, 2),
        (1, 3, 6, -1),
    ]
    opts = [
        "plain",
        "weight",
        "weight_grad",
        "ignore",
        "all_ignored",
        "smooth",
        "weight_smooth",
        *SHIFTS,
    ]
    cases = _product(
        "linear_cross_entropy",
        shape=shapes,
        target=["index", "prob"],
        dtype=DTYPES,
        reduction=REDUCTIONS,
        bias=[False, True],
        opt=opts,
        style=["kw", "autocast"],
    )
    cases = [
        c
        for c in cases
        if _sensible(c.params)
        and not (c.params["target"] == "prob" and c.params["opt"] in ("ignore", "all_ignored"))
        and not (c.params["opt"] in SHIFTS and not c.params["bias"])
    ]

    def core(p: dict[str, Any]) -> bool:
        return p["dtype"] == "fp32" and not p["bias"]

    return _thin(cases, core, cap)


def _module_cases(functional: list[Case], cap: int) -> list[Case]:
    """A seeded sample of the functional cases, run through the modules."""
    out = []
    for module, fn in MODULES.items():
        mine = [c for c in functional if c.fn == fn and c.params.get("opt") not in ("bad_weight",)]
        mine = random.Random(SAMPLE_SEED).sample(mine, min(cap, len(mine)))
        out += [Case(f"nn.{module}", c.p) for c in mine]
    return out


def _all_cases() -> list[Case]:
    functional = [
        *_classification_cases("cross_entropy", 1300),
        *_classification_cases("nll_loss", 550),
        *_binary_cases("binary_cross_entropy", 350),
        *_binary_cases("binary_cross_entropy_with_logits", 420),
        *_kl_cases(300),
        *_huber_cases(300),
        *_softmax_cases("log_softmax", 320),
        *_softmax_cases("softmax", 320),
        *_logsumexp_cases(520),
        *_linear_cases(600),
    ]
    return functional + _module_cases(functional, 80)


ALL_CASES = _all_cases()


# --------------------------------------------------------------------------- running one case


def _double(obj: Any, memo: dict[int, torch.Tensor]) -> Any:
    """``obj`` with every floating tensor (and dtype) in float64, leaves kept as leaves."""
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().double().requires_grad_(obj.requires_grad)
        return memo[id(obj)]
    if isinstance(obj, torch.dtype) and obj.is_floating_point:
        return torch.float64
    if isinstance(obj, dict):
        return {k: _double(v, memo) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_double(v, memo) for v in obj)
    return obj


class Side:
    """One library's way to run a call: the function, or the module built from the call."""

    def __init__(self, case: Case, lib: str) -> None:
        self.case, self.lib = case, lib
        self.module_name = case.fn.removeprefix("nn.") if case.fn.startswith("nn.") else None
        fn = MODULES[self.module_name] if self.module_name else case.fn
        self.torch_fn = _torch_function(fn)
        self.fn = self.torch_fn if lib == "torch" else getattr(xent, fn)

    def __call__(
        self, call: Call, values: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.nn.Parameter]]:
        """The output, and the module parameters to differentiate (none for a function)."""
        if self.module_name is None:
            required = (
                ("input", "linear_weight", "target")
                if self.case.fn == "linear_cross_entropy"
                else (("input", "dim") if "dim" in values else ("input", "target"))
            )
            args, kwargs = _arguments(call, _torch_order(self.torch_fn), values, required)
            return self.fn(*args, **kwargs), {}
        torch_cls = getattr(torch.nn, self.module_name)
        cls = torch_cls if self.lib == "torch" else getattr(xent.nn, self.module_name)
        ctor = {k: v for k, v in values.items() if k not in FORWARD_ARGS}
        fwd = [values["input"], values["target"]]
        if self.module_name == "LinearCrossEntropyLoss":
            w = ctor.pop("linear_weight")
            b = ctor.pop("linear_bias", None)
            c, h = w.shape[0], w.shape[-1]
            if w.dim() > 2:
                ctor["out_features"] = tuple(w.shape[1:-1])
            ctor.update(bias=b is not None, dtype=w.dtype)
            module = cls(h, c, **ctor)
            module.linear.weight = torch.nn.Parameter(w.detach().reshape(-1, h).clone())
            params = {"linear.weight": module.linear.weight}
            if b is not None:
                module.linear.bias = torch.nn.Parameter(b.detach().reshape(-1).clone())
                params["linear.bias"] = module.linear.bias
            return module(*fwd), params
        args, kwargs = _arguments(call, _torch_order(torch_cls.__init__), ctor, ())
        return cls(*args, **kwargs)(*fwd), {}


def _run(
    side: Side, call: Call, values: dict[str, Any], *, reference: bool = False
) -> tuple[torch.Tensor, dict[str, torch.nn.Parameter]]:
    """The call on one side, warnings silenced; an ``autocast`` case runs under CPU bf16
    autocast, except for its float64 reference."""
    autocast = call.style == "autocast" and not reference
    with warnings.catch_warnings(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        warnings.simplefilter("ignore")
        return side(call, values)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out, leaves, cot, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads, strict=True)]


def _torch_differentiable(
    out: torch.Tensor, leaves: dict[str, torch.Tensor], cot: torch.Tensor
) -> list[str]:
    """The leaves PyTorch can differentiate the output by (its backward raises for the others)."""
    names = []
    for name, leaf in leaves.items():
        try:
            torch.autograd.grad(out, [leaf], cot, retain_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError):
            continue
        names.append(name)
    return names


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> bool:
    rtol = RTOL.get(dtype, 0.0)
    finite = theirs[torch.isfinite(theirs)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    try:
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale, equal_nan=True)
    except AssertionError:
        return False
    return True


def _check_values(
    what: str,
    ours: torch.Tensor,
    theirs: torch.Tensor,
    ref: Callable[[], torch.Tensor],
    precision: torch.dtype | None = None,
) -> None:
    """Within tolerance of PyTorch, or no farther from the float64 answer than PyTorch is; the
    tolerance is that of ``precision`` (by default the result's dtype)."""
    precision = precision or theirs.dtype
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"
    assert ours.shape == theirs.shape, (
        f"{what}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    )
    ours, theirs = ours.detach(), theirs.detach()
    if _close(ours, theirs, precision):
        return
    try:
        assert_error_floor(ours, theirs, ref().detach(), RTOL.get(precision, 0.0))
    except AssertionError:
        diff = (ours.double() - theirs.double()).abs().nan_to_num(math.inf)
        worst = diff.max().item() if diff.numel() else 0.0
        raise AssertionError(
            f"{what}: differs from torch (max |diff| {worst:.3g});"
            f"\n ours  {ours.flatten()[:6].tolist()}\n torch {theirs.flatten()[:6].tolist()}"
        ) from None


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_sweep_matches_torch(case: Case) -> None:
    fn = case.fn.removeprefix("nn.")
    call = BUILDERS[MODULES.get(fn, fn)](case, _gen(case))
    theirs_side, ours_side = Side(case, "torch"), Side(case, "xent")
    try:
        theirs, t_params = _run(theirs_side, call, call.values)
    except Exception as exc:
        with pytest.raises(type(exc)):
            _run(ours_side, call, call.values)
        return
    ours, o_params = _run(ours_side, call, call.values)
    assert isinstance(ours, torch.Tensor)

    memo: dict[int, torch.Tensor] = {}
    values64 = _double(call.values, memo)
    ref_cache: dict[str, Any] = {}

    def reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not ref_cache:
            ref_cache["out"], ref_cache["params"] = _run(
                theirs_side, call, values64, reference=True
            )
        return ref_cache["out"], ref_cache["params"]

    # Under autocast PyTorch computes in bf16: results are held to bf16's tolerance.
    precision = torch.bfloat16 if call.style == "autocast" else None
    _check_values("value", ours, theirs, lambda: reference()[0], precision)

    leaves = {
        k: v for k, v in call.values.items() if isinstance(v, torch.Tensor) and v.requires_grad
    }
    if not theirs.requires_grad or not theirs.is_floating_point():
        return
    assert ours.requires_grad, "xent's output does not require grad where torch's does"
    cot = torch.randn(theirs.shape, generator=_gen(case), dtype=torch.float64).to(theirs.dtype)
    t_leaves = {**leaves, **t_params}
    names = _torch_differentiable(theirs, t_leaves, cot)
    if not names:
        return
    g_theirs = dict(zip(names, _grads(theirs, [t_leaves[n] for n in names], cot), strict=True))
    o_leaves = {**leaves, **o_params}
    g_ours = dict(zip(names, _grads(ours, [o_leaves[n] for n in names], cot), strict=True))

    def grad_reference(name: str) -> torch.Tensor:
        out64, params64 = reference()
        leaves64 = {**{k: memo[id(v)] for k, v in leaves.items()}, **params64}
        return _grads(out64, [leaves64[name]], cot.double())[0]

    for name in names:
        _check_values(
            f"grad[{name}]",
            g_ours[name],
            g_theirs[name],
            lambda n=name: grad_reference(n),
            precision,
        )


def test_the_grid_covers_every_function_dtype_and_edge() -> None:
    """The sampling keeps every function and module, every dtype, every reduction, empty and
    K-dimensional shapes and the large-logit offsets (a thinned grid must not lose an axis)."""
    by_fn: dict[str, list[dict[str, Any]]] = {}
    for case in ALL_CASES:
        by_fn.setdefault(case.fn, []).append(case.params)
    assert set(by_fn) == set(BUILDERS) | {f"nn.{m}" for m in MODULES}
    public = {
        n
        for n in xent.__all__
        if inspect.isfunction(getattr(xent, n)) and (hasattr(F, n) or hasattr(torch, n))
    }
    assert public <= set(BUILDERS)
    for fn in BUILDERS:
        ps = by_fn[fn]
        assert {p["dtype"] for p in ps} == set(DTYPES), fn
        assert any(0 in p["shape"] for p in ps), fn
        if "reduction" in ps[0]:
            assert {p["reduction"] for p in ps} >= set(REDUCTIONS), fn
    for fn in ("cross_entropy", "log_softmax", "softmax", "logsumexp", "linear_cross_entropy"):
        assert {p["opt"] for p in by_fn[fn]} >= set(SHIFTS), fn
    assert any(len(p["shape"]) > 2 for p in by_fn["cross_entropy"])
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)
