"""Misuse: every public function called wrongly, with PyTorch (or scikit-learn) as the oracle.

The table ``TABLE`` holds, for every public name, one correct call and the function that is its
oracle. From each correct call the tests derive the misuses: every tensor argument in turn is
replaced by a list, a NumPy array and a number, and cast to int64, int32, uint8, bool and
complex64. Each misuse runs through xent and through the oracle: where the oracle raises, xent
must raise an exception of the same built-in type (with a message naming the argument, or the
dtype); where the oracle computes, xent must return the same value in the same dtype. Never a
truncated number.

Deliberate differences are listed in ``DEVIATIONS`` with the reason, and misuses the generator
cannot express (``dtype=`` arguments, process groups) are explicit ``Case`` entries.

A new public function (in ``xent.__all__``, ``xent.nn`` or ``xent.distributed``) must join the
table: ``test_every_public_function_joins_the_misuse_table`` fails until it does.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import sklearn.metrics
import torch
import torch.distributed as dist
import torch.nn.functional as F

import xent
from xent._validation import DtypeError, InvalidValueError, NotATensorError

# --------------------------------------------------------------------------------------------
# The table: one correct call per public function, and its oracle
# --------------------------------------------------------------------------------------------

_gen = torch.Generator().manual_seed(0)
LOGITS = 3 * torch.randn(3, 5, generator=_gen)  # odd shape; casts to ints give -5..5
PROBS = torch.rand(3, 5, generator=_gen)
TARGET = torch.tensor([0, 4, 2])
HIDDEN = torch.randn(3, 4, generator=_gen)
HEAD = torch.randn(5, 4, generator=_gen)


def _module(xent_cls: type, *init: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(xent, torch)`` callables that build the module (seeded, so both get the same
    parameters) with keyword options and call it on the positional arguments."""
    torch_cls = getattr(torch.nn, xent_cls.__name__)

    def build(cls: type) -> Callable[..., Any]:
        def call(*args: Any, **options: Any) -> Any:
            torch.manual_seed(0)
            return cls(*init, **options)(*args)

        return call

    return build(xent_cls), build(torch_cls)


def _entropy_oracle(p: Any, dim: int = -1) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim)  # xent.entropy's documented equivalent


def _log_probs_oracle(logits: Any, target: Any) -> torch.Tensor:
    return -F.cross_entropy(logits, target, reduction="none")


def _linear_log_probs_oracle(hidden: Any, weight: Any, target: Any, bias: Any = None) -> Any:
    return _log_probs_oracle(F.linear(hidden, weight, bias), target)


ADVANTAGES = torch.randn(3, generator=_gen)
OLD_LOG_PROBS = -1.5 + 0.5 * torch.randn(3, generator=_gen)


def _policy_oracle(
    hidden: Any, weight: Any, target: Any, advantages: Any, old_log_probs: Any = None
) -> torch.Tensor:
    # PPO's clipped surrogate (clip 0.2 both ways), mean over tokens.
    r = (-F.cross_entropy(F.linear(hidden, weight), target, reduction="none") - old_log_probs).exp()
    return -torch.minimum(r * advantages, r.clamp(0.8, 1.2) * advantages).mean()


def _distill_oracle(student_logits: Any, teacher_logits: Any) -> torch.Tensor:
    ls, lt = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1).mean()


def _linear_distill_oracle(
    student_hidden: Any, student_weight: Any, teacher_logits: Any = None
) -> torch.Tensor:
    return _distill_oracle(F.linear(student_hidden, student_weight), teacher_logits)


@dataclass(frozen=True)
class Entry:
    """A public function: xent's callable, its oracle, and one correct call.

    ``args`` are passed positionally and ``kwargs`` by keyword (for a module: its constructor
    options); misuses are derived from every tensor among them unless ``derive`` is False.
    """

    ours: Callable[..., Any]
    oracle: Callable[..., Any]
    args: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    derive: bool = True


TABLE: dict[str, Entry] = {
    "softmax": Entry(xent.softmax, F.softmax, dict(input=LOGITS, dim=1)),
    "log_softmax": Entry(xent.log_softmax, F.log_softmax, dict(input=LOGITS, dim=1)),
    "logsumexp": Entry(xent.logsumexp, torch.logsumexp, dict(input=LOGITS, dim=1)),
    "entropy": Entry(xent.entropy, _entropy_oracle, dict(p=PROBS)),
    "cross_entropy": Entry(
        xent.cross_entropy,
        F.cross_entropy,
        dict(input=LOGITS, target=TARGET, weight=PROBS[0]),
    ),
    "nll_loss": Entry(
        xent.nll_loss, F.nll_loss, dict(input=LOGITS, target=TARGET, weight=PROBS[0])
    ),
    "binary_cross_entropy": Entry(
        xent.binary_cross_entropy,
        F.binary_cross_entropy,
        dict(input=PROBS, target=PROBS.flip(0), weight=PROBS[1]),
    ),
    "binary_cross_entropy_with_logits": Entry(
        xent.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        dict(input=LOGITS, target=PROBS, weight=PROBS[1]),
        dict(pos_weight=PROBS[2] + 0.5),
    ),
    "kl_div": Entry(
        xent.kl_div,
        F.kl_div,
        dict(input=LOGITS.log_softmax(1), target=PROBS.softmax(1)),
        dict(reduction="batchmean"),
    ),
    "huber_loss": Entry(
        xent.huber_loss,
        F.huber_loss,
        dict(input=LOGITS, target=PROBS),
        dict(weight=PROBS.flip(1)),
    ),
    "linear_cross_entropy": Entry(
        xent.linear_cross_entropy,
        F.linear_cross_entropy,
        dict(input=HIDDEN, linear_weight=HEAD, target=TARGET),
        dict(linear_bias=PROBS[0], weight=PROBS[1]),
    ),
    "linear_cross_entropy_reference": Entry(
        xent.linear_cross_entropy_reference,
        F.linear_cross_entropy,
        dict(input=HIDDEN, linear_weight=HEAD, target=TARGET),
        dict(linear_bias=PROBS[0], weight=PROBS[1]),
    ),
    "reference.cross_entropy_reference": Entry(
        xent.reference.cross_entropy_reference,
        F.cross_entropy,
        dict(input=LOGITS, target=TARGET, weight=PROBS[0]),
    ),
    "reference.linear_cross_entropy_reference": Entry(
        xent.reference.linear_cross_entropy_reference,
        F.linear_cross_entropy,
        dict(input=HIDDEN, linear_weight=HEAD, target=TARGET),
        dict(linear_bias=PROBS[0], weight=PROBS[1]),
    ),
    "log_loss": Entry(
        xent.log_loss,
        sklearn.metrics.log_loss,
        dict(y_true=TARGET.remainder(3), y_proba=PROBS[:, :3].double().softmax(1)),
    ),
    "nn.CrossEntropyLoss": Entry(
        *_module(xent.nn.CrossEntropyLoss),
        dict(input=LOGITS, target=TARGET),
        dict(weight=PROBS[0]),
    ),
    "nn.NLLLoss": Entry(
        *_module(xent.nn.NLLLoss), dict(input=LOGITS, target=TARGET), dict(weight=PROBS[0])
    ),
    "nn.BCELoss": Entry(
        *_module(xent.nn.BCELoss),
        dict(input=PROBS, target=PROBS.flip(0)),
        dict(weight=PROBS[1]),
    ),
    "nn.BCEWithLogitsLoss": Entry(
        *_module(xent.nn.BCEWithLogitsLoss),
        dict(input=LOGITS, target=PROBS),
        dict(weight=PROBS[1], pos_weight=PROBS[2] + 0.5),
    ),
    "nn.KLDivLoss": Entry(
        *_module(xent.nn.KLDivLoss),
        dict(input=LOGITS.log_softmax(1), target=PROBS.softmax(1)),
        dict(reduction="batchmean"),
    ),
    "nn.HuberLoss": Entry(*_module(xent.nn.HuberLoss), dict(input=LOGITS, target=PROBS)),
    "nn.LinearCrossEntropyLoss": Entry(
        *_module(xent.nn.LinearCrossEntropyLoss, 4, 5), dict(input=HIDDEN, target=TARGET)
    ),
    # Post-training: log p(y) is minus the per-token cross-entropy; the divergence with the
    # default β = 0 is kl_div's forward KL, summed over the vocabulary and averaged over tokens.
    "log_probs": Entry(xent.log_probs, _log_probs_oracle, dict(logits=LOGITS, target=TARGET)),
    "linear_log_probs": Entry(
        xent.linear_log_probs,
        _linear_log_probs_oracle,
        dict(hidden=HIDDEN, weight=HEAD, target=TARGET),
        dict(bias=PROBS[0]),
    ),
    "linear_policy_loss": Entry(
        xent.linear_policy_loss,
        _policy_oracle,
        dict(hidden=HIDDEN, weight=HEAD, target=TARGET, advantages=ADVANTAGES),
        dict(old_log_probs=OLD_LOG_PROBS),
    ),
    "distill_divergence": Entry(
        xent.distill_divergence,
        _distill_oracle,
        dict(student_logits=LOGITS, teacher_logits=PROBS),
    ),
    "linear_distill_divergence": Entry(
        xent.linear_distill_divergence,
        _linear_distill_oracle,
        dict(student_hidden=HIDDEN, student_weight=HEAD),
        dict(teacher_logits=PROBS),
    ),
    # Vocabulary-parallel functions run in a one-rank gloo group (the ``group`` fixture below),
    # where the whole vocabulary is on the one rank and the single-process losses are the
    # oracle. Misuses are not derived for them (integer logits and non-tensor targets are not
    # yet refused there); their cases are explicit, in CASES.
    "distributed.vocab_parallel_cross_entropy": Entry(
        xent.distributed.vocab_parallel_cross_entropy,
        F.cross_entropy,
        dict(logits=LOGITS, target=TARGET),
        derive=False,
    ),
    "distributed.vocab_parallel_linear_cross_entropy": Entry(
        xent.distributed.vocab_parallel_linear_cross_entropy,
        F.linear_cross_entropy,
        dict(input=HIDDEN, linear_weight=HEAD, target=TARGET),
        derive=False,
    ),
}


# --------------------------------------------------------------------------------------------
# Cases: derived misuses, deliberate deviations, and explicit cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One misuse of ``name``: xent gets ``args``/``kwargs``; the oracle gets ``oracle_args``
    (default: the same) — unless ``raises`` gives the exception xent must raise instead."""

    name: str
    id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    oracle_args: tuple[Any, ...] | None = None
    oracle_kwargs: dict[str, Any] | None = None
    raises: type[BaseException] | None = None
    mentions: tuple[str, ...] = ()  # words xent's error message must contain


NON_TENSORS: dict[str, Callable[[torch.Tensor], Any]] = {
    "list": torch.Tensor.tolist,
    "ndarray": lambda t: t.numpy(),
    "number": lambda t: 2.0,
}
DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)


def _with(name: str, slot: str, value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``TABLE[name]``'s correct call with ``slot`` replaced by ``value``."""
    entry = TABLE[name]
    args = {k: (value if k == slot else v) for k, v in entry.args.items()}
    kwargs = {k: (value if k == slot else v) for k, v in entry.kwargs.items()}
    return tuple(args.values()), kwargs


def _derived(name: str, entry: Entry) -> Iterator[Case]:
    """Each tensor argument in turn as a non-tensor, then cast to each other dtype, then (for
    functions of several tensors) on the meta device while the others stay on the CPU: PyTorch's
    ``RuntimeError``, naming both devices."""
    slots = {**entry.args, **entry.kwargs}
    several = sum(isinstance(v, torch.Tensor) for v in slots.values()) > 1
    for slot, value in slots.items():
        if not isinstance(value, torch.Tensor):
            continue
        if several and name != "log_loss":  # log_loss reads array-likes, not devices
            yield Case(
                name,
                f"{slot}-meta",
                *_with(name, slot, value.to("meta")),
                raises=RuntimeError,
                mentions=("same device", "cpu", "meta"),
            )
        for kind, make in NON_TENSORS.items():
            yield Case(name, f"{slot}-{kind}", *_with(name, slot, make(value)), mentions=(slot,))
        for dtype in DTYPES:
            if dtype != value.dtype:
                dtype_name = str(dtype).removeprefix("torch.")
                call = _with(name, slot, value.to(dtype))
                yield Case(name, f"{slot}-{dtype_name}", *call, mentions=(dtype_name,))


def _oracle_on(name: str, slot: str, value: Any) -> dict[str, Any]:
    args, kwargs = _with(name, slot, value)
    return dict(oracle_args=args, oracle_kwargs=kwargs)


# Where xent deliberately differs from its oracle: case id -> what the test expects instead.
DEVIATIONS: dict[str, dict[str, Any]] = {
    # Outside PyTorch's namesakes (whose int64/uint8 rule xent mirrors), class-index targets
    # may have any integer dtype: the loss equals the oracle's on the same targets as int64.
    **{
        f"{name}/target-int32": _oracle_on(name, "target", TARGET)
        for name in (
            "linear_cross_entropy_reference",
            "reference.cross_entropy_reference",
            "reference.linear_cross_entropy_reference",
            "log_probs",
            "linear_log_probs",
            "linear_policy_loss",
        )
    },
    # Advantages and old log-probabilities are data of the loss's own dtype: xent refuses
    # non-tensors and non-floating dtypes, where the oracle's arithmetic would take a number or
    # promote an integer tensor.
    **{
        f"linear_policy_loss/{slot}-{kind}": dict(raises=raises)
        for slot in ("advantages", "old_log_probs")
        for kind, raises in (
            ("list", NotATensorError),
            ("ndarray", NotATensorError),
            ("number", NotATensorError),
            ("int64", DtypeError),
            ("int32", DtypeError),
            ("uint8", DtypeError),
            ("bool", DtypeError),
            ("complex64", DtypeError),
        )
    },
    # PyTorch returns a complex "loss" here; a complex target or weight has no meaning.
    **{
        f"{name}/target-complex64": dict(raises=DtypeError)
        for name in ("binary_cross_entropy_with_logits", "nn.BCEWithLogitsLoss")
    },
    "huber_loss/weight-complex64": dict(raises=DtypeError),
    # Boolean labels are two classes against three columns: scikit-learn's class-count error.
    "log_loss/y_true-bool": dict(mentions=()),
    # PyTorch forms ``pos_weight - 1`` in the weight's dtype: it fails for bool and wraps
    # around for uint8 (0 - 1 = 255); xent reads both as the 0/1 weights they hold.
    **{
        f"{name}/pos_weight-{kind}": _oracle_on(
            name, "pos_weight", (PROBS[2] + 0.5).to(dtype).float()
        )
        for name in ("binary_cross_entropy_with_logits", "nn.BCEWithLogitsLoss")
        for kind, dtype in (("bool", torch.bool), ("uint8", torch.uint8))
    },
}
# Misuses the generator cannot express. Vocabulary-parallel cases go here too (the ``group``
# fixture gives them a one-rank process group): a layout that does not cover [0, V) — e.g.
# ``vocab_start=1`` on the one rank — is a misuse the oracle cannot judge, so such a case gives
# ``raises=``; where the single-process loss is the oracle, ``args`` suffice.
_INTS = LOGITS.long()
CASES: list[Case] = [
    Case("softmax", "int-dtype-float32", (_INTS, 1), dict(dtype=torch.float32)),
    Case("softmax", "bool-dtype-float64", (_INTS > 0, 1), dict(dtype=torch.float64)),
    Case("softmax", "int-dtype-float16", (_INTS, 1), dict(dtype=torch.float16)),
    Case("softmax", "complex-dtype-float32", (LOGITS.cfloat(), 1), dict(dtype=torch.float32)),
    Case("softmax", "float-dtype-int64", (LOGITS, 1), dict(dtype=torch.int64), mentions=("int64",)),
    Case("softmax", "int-dtype-int64", (_INTS, 1), dict(dtype=torch.int64), mentions=("int64",)),
    Case("softmax", "float-dtype-bool", (LOGITS, 1), dict(dtype=torch.bool), mentions=("bool",)),
    Case("softmax", "float-dtype-complex", (LOGITS, 1), dict(dtype=torch.complex64)),
    Case("softmax", "dtype-str", (LOGITS, 1), dict(dtype="float32"), mentions=("'dtype'",)),
    Case("log_softmax", "int-dtype-float32", (_INTS, 1), dict(dtype=torch.float32)),
    Case("log_softmax", "uint8-dtype-float64", (_INTS.abs().byte(), 1), dict(dtype=torch.float64)),
    Case(
        "log_softmax", "int-dtype-int32", (_INTS, 1), dict(dtype=torch.int32), mentions=("int32",)
    ),
    Case("log_softmax", "float-dtype-complex", (LOGITS, 1), dict(dtype=torch.complex64)),
    Case(
        "logsumexp",
        "complex128",
        (torch.randn(3, 5, dtype=torch.complex128, generator=_gen), 1),
        {},
    ),
    Case("logsumexp", "large-ints", (torch.tensor([2**40, 2**40 + 1, 7]), 0), {}),
    Case("logsumexp", "int-keepdim", (_INTS, (0, 1)), dict(keepdim=True)),
    Case("entropy", "bool", (PROBS > 0.5,), dict(dim=0)),
    Case("cross_entropy", "float-index-target", (LOGITS, TARGET.float()), {}),
    Case("cross_entropy", "int-probability-target", (LOGITS, _INTS), {}),
    Case(
        "distributed.vocab_parallel_cross_entropy", "target-float32", (LOGITS, TARGET.float()), {}
    ),
    Case(
        "distributed.vocab_parallel_linear_cross_entropy",
        "target-float32",
        (HIDDEN, HEAD, TARGET.float()),
        {},
    ),
    # Probability targets (the logits' shape) take no ignore_index, as in PyTorch; integer
    # ones of that shape are refused; a K-dimensional head needs a batched input.
    Case(
        "linear_cross_entropy",
        "probabilities-with-ignore_index",
        (HIDDEN, HEAD, PROBS),
        dict(ignore_index=-100),
    ),
    Case("linear_cross_entropy", "int-probability-target", (HIDDEN, HEAD, _INTS), {}),
    Case(
        "linear_cross_entropy",
        "k-dim-unbatched",
        (HIDDEN[0], HEAD[:, None].expand(5, 2, 4), TARGET[:2]),
        {},
    ),
    Case(
        "linear_cross_entropy",
        "k-dim-bias-shape",
        (HIDDEN, HEAD[:, None].expand(5, 2, 4), TARGET[:, None].expand(3, 2)),
        dict(linear_bias=PROBS[0]),
    ),
    Case(
        "linear_cross_entropy",
        "options-not-options",
        (HIDDEN, HEAD, TARGET),
        dict(options=4),
        raises=TypeError,
        mentions=("options",),
    ),
    Case(
        "linear_cross_entropy",
        "options-chunk-conflict",
        (HIDDEN, HEAD, TARGET),
        dict(options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2), chunk_size=3),
        raises=ValueError,
        mentions=("chunk_size",),
    ),
]


def _option(name: str, option: str, value: Any, **expect: Any) -> Case:
    """``TABLE[name]``'s correct call with ``option`` set to ``value`` (for a module: a
    constructor option); the message must name the option unless ``mentions`` says otherwise."""
    if isinstance(value, torch.Tensor):
        shown = f"tensor-{str(value.dtype).removeprefix('torch.')}"
    elif isinstance(value, (str, complex, bool)) or value is None:
        shown = type(value).__name__
    else:
        shown = repr(value)
    if option in TABLE[name].args:
        args, kwargs = _with(name, option, value)
    else:
        args, kwargs = _with(name, option, None)
        kwargs[option] = value
    mentions = expect.pop("mentions", (option,))
    return Case(name, f"{option}={shown}", args, kwargs, mentions=mentions, **expect)


# Numeric options: what PyTorch's argument parser refuses (TypeError), what its kernels refuse
# (RuntimeError: xent's error is also a ValueError, InvalidValueError) and where xent is stricter.
_CE_LIKE = ("cross_entropy", "nn.CrossEntropyLoss")
_NLL_LIKE = ("cross_entropy", "nll_loss", "nn.CrossEntropyLoss", "nn.NLLLoss")
OPTION_CASES: list[Case] = [
    *(_option(n, "label_smoothing", v) for n in _CE_LIKE for v in (1j, "0.1", None)),
    *(_option(n, "label_smoothing", 1.5, mentions=("1.5",)) for n in _CE_LIKE),
    # PyTorch silently ignores negative and NaN smoothing: xent refuses it (a deviation).
    *(
        _option(n, "label_smoothing", v, raises=InvalidValueError, mentions=(repr(v),))
        for n in _CE_LIKE
        for v in (-0.1, float("nan"))
    ),
    *(_option(n, "ignore_index", v) for n in _NLL_LIKE for v in (1.0, True, "a", 1j)),
    # A class weight of another dtype than the input's: PyTorch's RuntimeError.
    *(
        _option(n, "weight", PROBS[0].to(dtype), mentions=(str(dtype),))
        for n in _NLL_LIKE
        for dtype in (torch.float64, torch.float16)
    ),
    *(_option(n, "delta", v, mentions=(repr(v),)) for n in ("huber_loss",) for v in (0.0, -1.0)),
    _option("huber_loss", "delta", float("nan"), mentions=("nan",)),
    *(_option("huber_loss", "delta", v) for v in (1j, "1", None, torch.ones(1))),
    *(_option("nn.HuberLoss", "delta", v) for v in (1j, "1", None, torch.tensor(1.0))),
    _option("nn.HuberLoss", "delta", -1.0, mentions=("-1.0",)),
    *(_option(n, "log_target", v) for n in ("kl_div", "nn.KLDivLoss") for v in ("yes", 1j, 1)),
    _option("softmax", "dim", 1.0),
    _option("log_softmax", "dim", "1"),
    # Probabilities outside [0, 1]: PyTorch's RuntimeError, with the value here.
    Case("binary_cross_entropy", "input-above-1", (PROBS + 1, PROBS), {}, mentions=("input",)),
    Case("nn.BCELoss", "target-below-0", (PROBS, -PROBS), {}, mentions=("target",)),
]


def _all_cases() -> list[Case]:
    cases = list(CASES) + OPTION_CASES
    for name, entry in TABLE.items():
        if entry.derive:
            cases.extend(_derived(name, entry))
    ids = [f"{case.name}/{case.id}" for case in cases]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    assert set(DEVIATIONS) <= set(ids), f"deviations of no case: {set(DEVIATIONS) - set(ids)}"
    return [
        Case(**{**c.__dict__, **DEVIATIONS.get(i, {})}) for c, i in zip(cases, ids, strict=True)
    ]


ALL_CASES = _all_cases()


# --------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    """A one-rank gloo process group (the whole vocabulary on one rank)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _outcome(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value ``fn`` returns, or the exception it raises (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            return exc


def _builtin_type(exc: BaseException) -> type[BaseException]:
    """The first built-in exception class of ``exc``'s type (scikit-learn's
    ``InvalidParameterError`` is a ``ValueError``)."""
    return next(t for t in type(exc).__mro__ if t.__module__ == "builtins")


def _assert_same_value(ours: Any, theirs: Any) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"xent returned {ours!r}, the oracle {theirs!r}"
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours.detach(), theirs.detach(), equal_nan=True)
    else:
        assert isinstance(ours, float) and ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: f"{c.name}/{c.id}")
def test_misuse_behaves_as_the_oracle(case: Case, request: pytest.FixtureRequest) -> None:
    if case.name.startswith("distributed."):
        request.getfixturevalue("group")
    entry = TABLE[case.name]
    ours = _outcome(entry.ours, case.args, case.kwargs)
    if case.raises is not None:
        assert isinstance(ours, case.raises), f"expected {case.raises.__name__}, got {ours!r}"
    else:
        theirs = _outcome(
            entry.oracle,
            case.args if case.oracle_args is None else case.oracle_args,
            case.kwargs if case.oracle_kwargs is None else case.oracle_kwargs,
        )
        if isinstance(theirs, Exception):
            expected = _builtin_type(theirs)
            assert isinstance(ours, expected), (
                f"the oracle raised {expected.__name__} ({theirs}); xent gave {ours!r}"
            )
        else:
            _assert_same_value(ours, theirs)
    if isinstance(ours, Exception):
        for word in case.mentions:
            assert word in str(ours), f"{word!r} not in the message: {ours}"


# --------------------------------------------------------------------------------------------
# Every public function joins the table; the exception types
# --------------------------------------------------------------------------------------------


def _public_callables() -> dict[str, Any]:
    public = {}
    for name in xent.__all__:
        obj = getattr(xent, name)
        if inspect.ismodule(obj):
            public.update({f"{name}.{sub}": getattr(obj, sub) for sub in obj.__all__})
        elif inspect.isclass(obj) and issubclass(obj, tuple):
            continue  # a result type (xent.LogProbs), not a function
        elif callable(obj):
            public[name] = obj
    return public


def test_every_public_function_joins_the_misuse_table() -> None:
    public = _public_callables()
    missing = sorted(set(public) - set(TABLE))
    assert not missing, f"every public function must join the misuse table: {missing}"
    assert not sorted(set(TABLE) - set(public)), "the table names functions that are not public"
    for name, entry in TABLE.items():
        obj = public[name]
        # The table calls the public object itself (modules through a wrapper that builds it).
        assert entry.ours is obj or inspect.isclass(obj), name
    assert {"nn", "distributed"} <= set(xent.__all__)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_correct_call_matches_the_oracle(name: str, request: pytest.FixtureRequest) -> None:
    """The baseline every misuse is derived from: the table's call is right for both."""
    if name.startswith("distributed."):
        request.getfixturevalue("group")
    entry = TABLE[name]
    args, kwargs = tuple(entry.args.values()), entry.kwargs
    ours, theirs = _outcome(entry.ours, args, kwargs), _outcome(entry.oracle, args, kwargs)
    assert not isinstance(theirs, Exception), theirs
    _assert_same_value(ours, theirs)


def test_misuse_errors_are_pytorchs_types_and_the_earlier_ones() -> None:
    """A non-tensor is PyTorch's TypeError (and AttributeError, which its Python-level losses
    raise); a wrong dtype is NotImplementedError, RuntimeError and xent's earlier TypeError."""
    with pytest.raises(TypeError) as info:
        xent.cross_entropy(LOGITS, [0, 4, 2])
    assert str(info.value) == (
        "cross_entropy(): argument 'target' (position 2) must be Tensor, not list"
    )
    assert isinstance(info.value, AttributeError) and isinstance(info.value, NotATensorError)
    with pytest.raises(TypeError, match=r"argument 'pos_weight' \(position 7\) .* numpy\.ndarray"):
        xent.binary_cross_entropy_with_logits(LOGITS, PROBS, pos_weight=np.ones(5))
    with pytest.raises(TypeError, match=r"^linear_cross_entropy\(\): argument 'linear_bias' must"):
        xent.linear_cross_entropy(HIDDEN, HEAD, TARGET, linear_bias=[0.0] * 5)
    for exc_type in (NotImplementedError, RuntimeError, TypeError):
        with pytest.raises(exc_type, match=re.escape("input must have a floating dtype")):
            xent.softmax(_INTS, 1)
    with pytest.raises(ValueError, match="Complex data not supported"):
        xent.log_loss([0, 1], np.array([[0.5, 0.5], [0.2, 0.8]], dtype=complex))


def test_stricter_errors_are_value_and_runtime_errors() -> None:
    """Where PyTorch raises RuntimeError and xent refuses with a better message (or where it is
    stricter), the error is both, so code catching either keeps working; and HuberLoss refuses
    a delta that is not a float or int at construction, as PyTorch's does."""
    assert issubclass(InvalidValueError, ValueError) and issubclass(InvalidValueError, RuntimeError)
    checked = 0
    for case in OPTION_CASES:
        ours = _outcome(TABLE[case.name].ours, case.args, case.kwargs)
        theirs = _outcome(TABLE[case.name].oracle, case.args, case.kwargs)
        if isinstance(theirs, Exception) and _builtin_type(theirs) is RuntimeError:
            assert isinstance(ours, InvalidValueError), (case.name, case.id, ours)
            checked += 1
        elif case.raises is InvalidValueError:
            assert isinstance(ours, InvalidValueError), (case.name, case.id, ours)
            checked += 1
    assert checked >= 16
    for delta in (1j, "1", None, torch.tensor(1.0), np.float32(1.0)):
        with pytest.raises(TypeError):
            torch.nn.HuberLoss(delta=delta)
        with pytest.raises(TypeError, match=re.escape(repr(delta))):
            xent.nn.HuberLoss(delta=delta)
