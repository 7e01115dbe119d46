"""Every public function and module takes PyTorch's parameters in PyTorch's order.

For each pair (xent callable, its torch namesake) the tests compare the signatures (names, order,
kinds and defaults of PyTorch's parameters; xent's own options must come after them, keyword-only)
and then call both with the same arguments, drawn from a generated set: the product of a few
values for every PyTorch parameter (the deprecated ``size_average`` and ``reduce`` included),
each combination passed positionally, by keyword, in every positional/keyword split, and with
only the non-default values named. Both must return the same value (or raise the same built-in
exception type) and emit the same warnings, PyTorch's deprecation warning first among them.

``xent.linear_cross_entropy`` and ``xent.nn.LinearCrossEntropyLoss`` are not covered here.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import xent

_gen = torch.Generator().manual_seed(15)
LOGITS = 2 * torch.randn(4, 3, generator=_gen)
LOGITS_3D = 2 * torch.randn(2, 3, 5, generator=_gen)
PROBS = torch.rand(4, 3, generator=_gen) * 0.9 + 0.05
TARGET = torch.tensor([0, 2, 1, 2])
CLASS_WEIGHT = torch.rand(3, generator=_gen) + 0.5
ELEMENT_WEIGHT = torch.rand(4, 3, generator=_gen) + 0.5
LEGACY = (None, True, False)  # the values every size_average and reduce slot runs through


@dataclass(frozen=True)
class Fresh:
    """A value made anew for every call (an ``out=`` tensor that a call writes into)."""

    make: Callable[[], Any]


@dataclass(frozen=True)
class Pair:
    """xent's callable and torch's, the data both are called on, and candidate values for
    every other PyTorch parameter (for a module: its constructor's parameters)."""

    ours: Callable[..., Any]
    theirs: Callable[..., Any]
    data: tuple[tuple[Any, ...], ...]
    options: dict[str, tuple[Any, ...]]
    module: bool = False


def _logsumexp_signature() -> inspect.Signature:
    """``torch.logsumexp``'s signature, read off the first line of its docstring (a builtin has
    no ``inspect.signature``)."""
    line = torch.logsumexp.__doc__.strip().splitlines()[0]
    assert line.startswith("logsumexp(") and line.endswith(")"), line
    namespace: dict[str, Any] = {}
    exec(f"def {line}: pass", namespace)
    return inspect.signature(namespace["logsumexp"])


PAIRS: dict[str, Pair] = {
    "cross_entropy": Pair(
        xent.cross_entropy,
        F.cross_entropy,
        ((LOGITS, TARGET),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            ignore_index=(-100, 1),
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
            label_smoothing=(0.0, 0.2),
        ),
    ),
    "cross_entropy[probabilities]": Pair(
        xent.cross_entropy,
        F.cross_entropy,
        ((LOGITS, PROBS.softmax(1)),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            ignore_index=(-100,),
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
            label_smoothing=(0.0, 0.2),
        ),
    ),
    "nll_loss": Pair(
        xent.nll_loss,
        F.nll_loss,
        ((LOGITS.log_softmax(1), TARGET),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            ignore_index=(-100, 1),
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
        ),
    ),
    "binary_cross_entropy": Pair(
        xent.binary_cross_entropy,
        F.binary_cross_entropy,
        ((PROBS, PROBS.flip(0)),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
        ),
    ),
    "binary_cross_entropy_with_logits": Pair(
        xent.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        ((LOGITS, PROBS),),
        dict(
            weight=(None, ELEMENT_WEIGHT),
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
            pos_weight=(None, CLASS_WEIGHT),
        ),
    ),
    "kl_div": Pair(
        xent.kl_div,
        F.kl_div,
        ((LOGITS.log_softmax(1), PROBS.softmax(1)),),
        dict(
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none", "batchmean"),
            log_target=(False, True),
        ),
    ),
    "huber_loss": Pair(
        xent.huber_loss,
        F.huber_loss,
        ((LOGITS, PROBS), (LOGITS, PROBS[0])),  # the second with PyTorch's broadcast warning
        dict(
            reduction=("mean", "sum", "none"),
            delta=(1.0, 0.5),
            weight=(None, ELEMENT_WEIGHT),
        ),
    ),
    "softmax": Pair(
        xent.softmax,
        F.softmax,
        ((LOGITS,), (LOGITS_3D,)),  # the implicit dim is 1 for 2-d inputs, 0 for 3-d ones
        dict(dim=(None, 0, -1), _stacklevel=(3,), dtype=(None, torch.float64)),
    ),
    "log_softmax": Pair(
        xent.log_softmax,
        F.log_softmax,
        ((LOGITS,), (LOGITS_3D,)),
        dict(dim=(None, 0, -1), _stacklevel=(3,), dtype=(None, torch.float64)),
    ),
    "logsumexp": Pair(
        xent.logsumexp,
        torch.logsumexp,
        ((LOGITS,), (LOGITS_3D,)),
        dict(
            dim=(0, 1, (0, 1)),
            keepdim=(False, True),
            out=(None, Fresh(lambda: torch.empty(0))),
        ),
    ),
    "nn.CrossEntropyLoss": Pair(
        xent.nn.CrossEntropyLoss,
        torch.nn.CrossEntropyLoss,
        ((LOGITS, TARGET), (LOGITS, PROBS.softmax(1))),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            ignore_index=(-100,),
            reduce=LEGACY,
            reduction=("mean", "none"),
            label_smoothing=(0.0, 0.2),
        ),
        module=True,
    ),
    "nn.NLLLoss": Pair(
        xent.nn.NLLLoss,
        torch.nn.NLLLoss,
        ((LOGITS.log_softmax(1), TARGET),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            ignore_index=(-100, 1),
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
        ),
        module=True,
    ),
    "nn.BCELoss": Pair(
        xent.nn.BCELoss,
        torch.nn.BCELoss,
        ((PROBS, PROBS.flip(0)),),
        dict(
            weight=(None, CLASS_WEIGHT),
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
        ),
        module=True,
    ),
    "nn.BCEWithLogitsLoss": Pair(
        xent.nn.BCEWithLogitsLoss,
        torch.nn.BCEWithLogitsLoss,
        ((LOGITS, PROBS),),
        dict(
            weight=(None, ELEMENT_WEIGHT),
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none"),
            pos_weight=(None, CLASS_WEIGHT),
        ),
        module=True,
    ),
    "nn.KLDivLoss": Pair(
        xent.nn.KLDivLoss,
        torch.nn.KLDivLoss,
        ((LOGITS.log_softmax(1), PROBS.softmax(1)),),
        dict(
            size_average=LEGACY,
            reduce=LEGACY,
            reduction=("mean", "sum", "none", "batchmean"),
            log_target=(False, True),
        ),
        module=True,
    ),
    "nn.HuberLoss": Pair(
        xent.nn.HuberLoss,
        torch.nn.HuberLoss,
        ((LOGITS, PROBS),),
        dict(reduction=("mean", "sum", "none"), delta=(1.0, 0.5, 2)),
        module=True,
    ),
}


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """The parameters a caller passes: ``self`` left out of a module's ``__init__``."""
    if fn is torch.logsumexp:
        return list(_logsumexp_signature().parameters.values())
    if inspect.isclass(fn):
        return list(inspect.signature(fn.__init__).parameters.values())[1:]
    return list(inspect.signature(fn).parameters.values())


def _check_layout(ours: list[inspect.Parameter], theirs: list[inspect.Parameter]) -> None:
    """PyTorch's parameters first, each with its name, kind and default; then xent's own,
    keyword-only."""
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for mine, torch_param in zip(ours, theirs, strict=False):
        assert mine.kind == torch_param.kind, (mine, torch_param)
        default, expected = mine.default, torch_param.default
        assert type(default) is type(expected) and default == expected, (mine, torch_param)
    extra = ours[len(theirs) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), extra


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_signature_is_pytorchs(name: str) -> None:
    pair = PAIRS[name]
    _check_layout(_parameters(pair.ours), _parameters(pair.theirs))
    if pair.module:
        forward = list(inspect.signature(pair.ours.forward).parameters.values())
        torch_forward = list(inspect.signature(pair.theirs.forward).parameters.values())
        _check_layout(forward, torch_forward)


def test_every_loss_in_the_modules_is_paired() -> None:
    """Every public function of the covered modules, and every ``xent.nn`` module but the
    linear one, has its pair above (``entropy`` has no torch namesake)."""
    covered = {name.split("[")[0] for name in PAIRS}
    modules = (
        xent.activation,
        xent.classification,
        xent.binary,
        xent.divergence,
        xent.regression,
    )
    public = {
        name
        for module in modules
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and name in xent.__all__
    }
    public |= {f"nn.{name}" for name in xent.nn.__all__}
    assert public - covered == {"entropy", "nn.LinearCrossEntropyLoss"}


def _calls(
    parameters: list[inspect.Parameter], values: dict[str, Any]
) -> Iterator[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """One combination of values passed in every way a caller can: all positional, each
    positional/keyword split, and only the non-default values by keyword."""
    positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword_only = {p.name for p in parameters} - set(positional)
    always_keyword = {k: v for k, v in values.items() if k in keyword_only}
    named = [n for n in positional if n in values]
    for split in range(len(named) + 1):
        args = tuple(values[n] for n in named[:split])
        kwargs = {n: values[n] for n in named[split:]} | always_keyword
        yield f"{split} positional", args, kwargs
    defaults = {p.name: p.default for p in parameters}
    changed = {k: v for k, v in values.items() if not _same(v, defaults[k])}
    yield "non-defaults by keyword", (), changed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _resolve(value: Any) -> Any:
    return value.make() if isinstance(value, Fresh) else value


def _run(
    pair: Pair, fn: Callable[..., Any], data: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict
) -> tuple[Any, list[tuple[type[Warning], str]], str | None]:
    """The value (or exception), the warnings, and for a module its ``reduction`` attribute."""
    args, kwargs = tuple(map(_resolve, args)), {k: _resolve(v) for k, v in kwargs.items()}
    reduction = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if pair.module:
                module = fn(*args, **kwargs)
                reduction = module.reduction
                result = module(*data)
            else:
                result = fn(*data, *args, **kwargs)
        except Exception as exc:  # compared by type below
            result = exc
    return result, [(w.category, str(w.message)) for w in caught], reduction


def _builtin_type(exc: BaseException) -> type[BaseException]:
    return next(t for t in type(exc).__mro__ if t.__module__ == "builtins")


def _combinations(pair: Pair) -> Iterator[dict[str, Any]]:
    names = list(pair.options)
    for combo in itertools.product(*(pair.options[n] for n in names)):
        yield dict(zip(names, combo, strict=True))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_call_means_what_it_means_in_pytorch(name: str) -> None:
    pair = PAIRS[name]
    parameters = _parameters(pair.theirs)
    calls = 0
    for data in pair.data:
        for values in _combinations(pair):
            for style, args, kwargs in _calls(parameters, values):
                where = f"{name}{tuple(t.shape for t in data)} {values} ({style})"
                theirs, their_warnings, their_reduction = _run(
                    pair, pair.theirs, data, args, kwargs
                )
                ours, our_warnings, our_reduction = _run(pair, pair.ours, data, args, kwargs)
                calls += 1
                assert our_warnings == their_warnings, where
                assert our_reduction == their_reduction, where
                if isinstance(theirs, Exception):
                    assert isinstance(ours, _builtin_type(theirs)), f"{where}: {theirs!r}, {ours!r}"
                    continue
                assert isinstance(ours, torch.Tensor), f"{where}: {ours!r}"
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
                # allclose first: assert_close costs a millisecond a call, and runs on a miss.
                if not torch.allclose(ours, theirs, rtol=1.3e-6, atol=1e-5, equal_nan=True):
                    torch.testing.assert_close(ours, theirs, msg=lambda m, w=where: f"{w}: {m}")
    assert calls >= 2 * len(list(_combinations(pair)))


@pytest.mark.parametrize(
    ("size_average", "reduce"),
    [(None, False), (False, None), (True, True), (False, False), (0, 1), (1, 0)],
)
def test_the_deprecated_arguments_warn_and_pick_pytorchs_reduction(
    size_average: Any, reduce: Any
) -> None:
    """PyTorch's own legacy rule picks the reduction (truthiness, so 0 and 1 work too) and
    PyTorch's warning words it; the result equals the one with that ``reduction``."""
    reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    with pytest.warns(UserWarning) as record:
        theirs = F.nll_loss(LOGITS, TARGET, None, size_average, -100, reduce)
    expected = [(w.category, str(w.message)) for w in record]
    assert len(expected) == 1 and f"reduction='{reduction}'" in expected[0][1]
    with pytest.warns(UserWarning) as record:
        ours = xent.nll_loss(LOGITS, TARGET, None, size_average, -100, reduce)
    assert [(w.category, str(w.message)) for w in record] == expected
    assert record[0].filename == __file__
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, xent.nll_loss(LOGITS, TARGET, reduction=reduction))
    with pytest.warns(UserWarning) as record:
        module = xent.nn.BCELoss(None, size_average, reduce)
    assert [(w.category, str(w.message)) for w in record] == expected
    assert module.reduction == reduction
    assert record[0].filename == __file__  # the warning points at the line that built it
    with pytest.warns(UserWarning) as record:
        xent.nn.KLDivLoss(size_average, reduce)
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    "name", sorted(n for n, p in PAIRS.items() if "reduction" in p.options and not p.module)
)
def test_elementwise_mean_is_pytorchs_deprecated_mean(name: str) -> None:
    """``reduction="elementwise_mean"``, PyTorch's old name of ``"mean"``: the same value and the
    same warnings, pointing at the caller's line."""
    pair = PAIRS[name]
    data = pair.data[0]
    asked = dict(reduction="elementwise_mean")
    theirs, their_warnings, _ = _run(pair, pair.theirs, data, (), asked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = pair.ours(*data, **asked)
    assert [(w.category, str(w.message)) for w in caught] == their_warnings
    assert their_warnings and all(w.filename == __file__ for w in caught)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, pair.ours(*data, reduction="mean"))


def test_a_positional_call_is_never_read_as_another_parameter() -> None:
    """The examples that used to differ: the fourth slot is ``size_average``, the fifth
    ``ignore_index``."""
    with pytest.warns(UserWarning, match="reduction='mean'"):
        ours = xent.cross_entropy(LOGITS, TARGET, None, 1)
    torch.testing.assert_close(ours, F.cross_entropy(LOGITS, TARGET))
    ours = xent.cross_entropy(LOGITS, TARGET, None, None, 1)
    torch.testing.assert_close(ours, F.cross_entropy(LOGITS, TARGET, None, None, 1))
    torch.testing.assert_close(ours, F.cross_entropy(LOGITS, TARGET, ignore_index=1))
    with pytest.raises(TypeError, match="positional arguments"):  # z_loss is keyword-only
        xent.cross_entropy(LOGITS, TARGET, None, None, -100, None, "mean", 0.0, 0.1)
