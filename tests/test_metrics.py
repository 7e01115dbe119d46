"""xent.metrics.log_loss against sklearn.metrics.log_loss as the oracle."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss

from xent.metrics import log_loss

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
EPS16 = float(np.finfo(np.float16).eps)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with every warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    p = rng.random((n, c)) + 0.05
    return p / p.sum(axis=1, keepdims=True)


def _agree(y_true, y_pred, *, rel: float = 1e-12, **kwargs) -> float:
    """Assert xent and scikit-learn agree (neither warning) and return xent's value."""
    ours = _quiet(log_loss, y_true, y_pred, **kwargs)
    ref = _quiet(sk_log_loss, y_true, y_pred, **kwargs)
    assert type(ours) is float
    assert math.isfinite(ours)
    assert ours == pytest.approx(ref, rel=rel, abs=0.0)
    return ours


# --------------------------------------------------------------------------------------------
# The seed example
# --------------------------------------------------------------------------------------------


def test_seed_example_exact():
    value = log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]])
    assert abs(value - 0.2899092476264711) <= 1e-15
    assert value == sk_log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]])
    assert value == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2, rel=1e-15)


def test_seed_example_one_column_forms():
    # P(class 1) as a 1-D vector or an (N, 1) column gives the same number.
    assert abs(log_loss([1, 0], [0.7, 0.2]) - 0.2899092476264711) <= 1e-15
    assert abs(log_loss([1, 0], [[0.7], [0.2]]) - 0.2899092476264711) <= 1e-15


# --------------------------------------------------------------------------------------------
# Agreement with scikit-learn, float64
# --------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_P3 = _probs(_RNG, 9, 3)
_P5 = _probs(_RNG, 13, 5)
_P7 = _probs(_RNG, 257, 7)
_P2 = _probs(_RNG, 11, 2)
_Y3 = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1])
_Y5 = _RNG.permutation(np.arange(13) % 5)
_Y7 = _RNG.permutation(np.arange(257) % 7)
_Y2 = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1])
_W9 = _RNG.random(9) * 3
_W11 = _RNG.random(11) * 3
_P4 = _probs(_RNG, 4, 4)

CASES = {
    "binary-1d": (_Y2, _P2[:, 1], {}),
    "binary-2d": (_Y2, _P2, {}),
    "binary-column": (_Y2, _P2[:, 1:], {}),
    "binary-minus-plus-one": (_Y2 * 2 - 1, _P2[:, 1], {}),
    "binary-bool": (_Y2.astype(bool), _P2, {}),
    "binary-integral-float": (_Y2.astype(np.float64), _P2, {}),
    "binary-strings": (np.where(_Y2 == 1, "spam", "ham"), _P2[:, 1], {}),
    "multiclass-3": (_Y3, _P3, {}),
    "multiclass-5": (_Y5, _P5, {}),
    "multiclass-7-odd-n": (_Y7, _P7, {}),
    "multiclass-strings": (np.array(["cat", "dog", "emu"])[_Y3], _P3, {}),
    "multiclass-negative-ints": (_Y3 - 5, _P3, {}),
    "labels-absent-from-y_true": (
        np.array([0, 2, 2, 0, 4, 4]),
        _P5[:6],
        {"labels": [0, 1, 2, 3, 4]},
    ),
    "labels-strings-absent": (
        np.array(["b", "d", "b", "b"]),
        _P4,
        {"labels": ["a", "b", "c", "d"]},
    ),
    "labels-binary-one-class-present": (np.array([1, 1, 1]), _P2[:3, 1], {"labels": [0, 1]}),
    "labels-sorted-same-as-inferred": (_Y3, _P3, {"labels": [0, 1, 2]}),
    "sample_weight": (_Y3, _P3, {"sample_weight": _W9}),
    "sample_weight-binary-1d": (_Y2, _P2[:, 1], {"sample_weight": _W11}),
    "sample_weight-ints": (_Y3, _P3, {"sample_weight": np.arange(1, 10)}),
    "sample_weight-negative": (_Y3, _P3, {"sample_weight": _W9 - 1.0}),
    "normalize-false": (_Y3, _P3, {"normalize": False}),
    "normalize-false-weighted": (_Y3, _P3, {"normalize": False, "sample_weight": _W9}),
    "normalize-false-weights-sum-zero": (
        _Y2[:2],
        _P2[:2],
        {"normalize": False, "sample_weight": [1.0, -1.0]},
    ),
    "every-option": (
        np.array(["b", "d", "b", "a"]),
        _P4,
        {"labels": ["a", "b", "c", "d"], "sample_weight": [0.5, 2.0, 0.0, 1.5], "normalize": False},
    ),
    "indicator-one-hot": (np.eye(3, dtype=int)[_Y3], _P3, {}),
    "indicator-multi-hot": (np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]]), _P3[:3], {}),
    "indicator-bool": (np.eye(5, dtype=bool)[_Y5], _P5, {}),
    "column-vector-y_true": (_Y3[:, None], _P3, {}),
    "int-y_pred": (np.array([0, 1, 1]), np.array([[1, 0], [0, 1], [1, 0]]), {}),
    "single-sample": (np.array([2]), _P3[:1], {"labels": [0, 1, 2]}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("container", ["ndarray", "list", "tensor"])
def test_matches_sklearn(name: str, container: str):
    y_true, y_pred, kwargs = CASES[name]
    ref = _quiet(sk_log_loss, y_true, y_pred, **kwargs)
    if container == "list":
        y_true, y_pred = y_true.tolist(), y_pred.tolist()
    elif container == "tensor":
        y_pred = torch.from_numpy(y_pred)
        if y_true.dtype.kind != "U":
            y_true = torch.from_numpy(y_true)
    ours = _quiet(log_loss, y_true, y_pred, **kwargs)
    assert type(ours) is float
    assert ours == pytest.approx(ref, rel=1e-12, abs=0.0)


def test_float64_bit_for_bit():
    # Same clipping, same logs, same reductions: float64 results are identical, not just close.
    for name in ("multiclass-7-odd-n", "sample_weight", "normalize-false-weighted", "binary-1d"):
        y_true, y_pred, kwargs = CASES[name]
        assert log_loss(y_true, y_pred, **kwargs) == sk_log_loss(y_true, y_pred, **kwargs)


def test_normalize_false_is_weighted_sum():
    y_true, y_pred, _ = CASES["multiclass-3"]
    mean = log_loss(y_true, y_pred, sample_weight=_W9)
    total = log_loss(y_true, y_pred, sample_weight=_W9, normalize=False)
    assert total == pytest.approx(mean * _W9.sum(), rel=1e-13)
    assert log_loss(y_true, y_pred, normalize=False) == pytest.approx(
        9 * log_loss(y_true, y_pred), rel=1e-13
    )
    manual = -np.sum(_W9 * np.log(y_pred[np.arange(9), y_true])) / _W9.sum()
    assert mean == pytest.approx(manual, rel=1e-13)


def test_tensor_sample_weight_and_labels():
    y_true, y_pred, _ = CASES["labels-absent-from-y_true"]
    weights = np.linspace(0.5, 3.0, 6)
    ref = sk_log_loss(y_true, y_pred, labels=[0, 1, 2, 3, 4], sample_weight=weights)
    ours = log_loss(
        torch.from_numpy(y_true),
        torch.from_numpy(y_pred),
        labels=torch.arange(5),
        sample_weight=torch.from_numpy(weights),
    )
    assert ours == pytest.approx(ref, rel=1e-12, abs=0.0)


def test_tensor_requires_grad_and_non_contiguous():
    y_pred = torch.tensor(_P3.T.copy(), requires_grad=True).T  # transposed view, needs grad
    assert not y_pred.is_contiguous()
    ref = sk_log_loss(_Y3, _P3)
    assert log_loss(torch.from_numpy(_Y3), y_pred) == pytest.approx(ref, rel=1e-12, abs=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors():
    ref = sk_log_loss(_Y3, _P3, sample_weight=_W9)
    ours = log_loss(
        torch.from_numpy(_Y3).cuda(),
        torch.from_numpy(_P3).cuda(),
        sample_weight=torch.from_numpy(_W9).cuda(),
    )
    assert ours == pytest.approx(ref, rel=1e-12, abs=0.0)


# --------------------------------------------------------------------------------------------
# Clipping and dtypes
# --------------------------------------------------------------------------------------------


def test_clipping_at_exact_zero_and_one_float64():
    y_pred = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    ours = _agree([0, 1, 1], y_pred)
    # Rows 1 and 3 are certain and right (-log(1 - eps)); row 2 is certain and wrong (-log eps).
    expected = (-2 * math.log(1 - EPS64) - math.log(EPS64)) / 3
    assert ours == pytest.approx(expected, rel=1e-14)
    assert ours == pytest.approx(36.04365338911715 / 3, rel=1e-14)


def test_clipping_one_dimensional_binary():
    ours = _agree([0, 1, 1, 0], [0.0, 1.0, 0.0, 1.0])
    assert ours == pytest.approx(-(math.log(1 - EPS64) + math.log(EPS64)) / 2, rel=1e-14)


@pytest.mark.parametrize(
    ("dtype", "eps", "rel"), [(np.float32, EPS32, 1e-6), (np.float16, EPS16, 2e-3)]
)
def test_low_precision_ndarray_clips_at_its_own_eps(dtype, eps: float, rel: float):
    y_pred = np.array([[1.0, 0.0], [0.625, 0.375], [0.25, 0.75]], dtype=dtype)  # exact in fp16
    ours = _agree([1, 0, 1], y_pred, rel=rel)
    p = y_pred.astype(np.float64)
    expected = -(math.log(eps) + math.log(p[1, 0]) + math.log(p[2, 1])) / 3
    assert ours == pytest.approx(expected, rel=1e-14)
    # Clipping at float64's eps instead would give a very different number.
    assert ours < log_loss([1, 0, 1], p) - 1.0


def test_float32_ndarray_random_close_to_sklearn():
    y_pred = _P7.astype(np.float32)
    _agree(_Y7, y_pred, rel=1e-6)
    _agree(_Y7, y_pred, rel=1e-6, sample_weight=np.arange(257) % 4 + 0.5, normalize=False)


def test_float32_tensor_uses_float32_eps():
    y_pred32 = torch.tensor([[1.0, 0.0], [0.8, 0.2]], dtype=torch.float32)
    ours = log_loss(torch.tensor([1, 0]), y_pred32)
    expected = -(math.log(EPS32) + math.log(float(np.float32(0.8)))) / 2
    assert ours == pytest.approx(expected, rel=1e-14)
    # Same as scikit-learn on the equivalent float32 ndarray ...
    assert ours == pytest.approx(sk_log_loss([1, 0], y_pred32.numpy()), rel=1e-6)
    # ... whereas scikit-learn's default path upcasts a tensor to float64 first (documented
    # difference): its answer is the float64-eps one.
    assert sk_log_loss([1, 0], y_pred32) == pytest.approx(
        log_loss([1, 0], y_pred32.double()), rel=1e-12
    )
    assert abs(ours - sk_log_loss([1, 0], y_pred32)) > 5.0


def test_float64_tensor_matches_sklearn_exactly():
    y_pred = torch.tensor([[1.0, 0.0], [0.8, 0.2]], dtype=torch.float64)
    assert log_loss([1, 0], y_pred) == sk_log_loss([1, 0], y_pred)


def test_bfloat16_tensor():
    y_pred = torch.tensor([[0.0, 1.0], [0.75, 0.25]], dtype=torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    assert eps == 2.0**-7
    expected = -(math.log(eps) + math.log(0.75)) / 2
    assert log_loss([0, 0], y_pred, labels=[0, 1]) == pytest.approx(expected, rel=1e-14)


def test_float16_tensor_equals_float16_ndarray():
    y_pred = torch.tensor([[0.0, 1.0], [0.7, 0.3]], dtype=torch.float16)
    assert log_loss([1, 0], y_pred) == log_loss([1, 0], y_pred.numpy())


# --------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------

NOT_NORMALISED = {
    "rows-2d": ([0, 1], [[0.2, 0.3], [0.5, 0.5]]),
    "row-too-large": ([0, 1, 2], [[0.5, 0.5, 0.5], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]),
    "float32-off-by-1e-3": ([1, 0], np.array([[0.3, 0.701], [0.8, 0.2]], dtype=np.float32)),
    "float64-off-by-1e-6": ([1, 0], np.array([[0.3, 0.7 + 1e-6], [0.8, 0.2]])),
}


@pytest.mark.parametrize("name", list(NOT_NORMALISED))
def test_rows_not_summing_to_one_warn_and_are_not_renormalised(name: str):
    y_true, y_pred = NOT_NORMALISED[name]
    with pytest.warns(UserWarning, match="do not sum to one"):
        ours = log_loss(y_true, y_pred)
    with pytest.warns(UserWarning, match="do not sum to one"):
        ref = sk_log_loss(y_true, y_pred)
    rel = 1e-6 if np.asarray(y_pred).dtype == np.float32 else 1e-12
    assert ours == pytest.approx(ref, rel=rel, abs=0.0)
    p = np.asarray(y_pred, dtype=np.float64)
    unnormalised = -np.mean(np.log(p[np.arange(len(y_true)), y_true]))
    assert ours == pytest.approx(unnormalised, rel=rel)


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [
        ([1, 0], np.array([[0.3, 0.7001], [0.8, 0.2]], dtype=np.float32)),  # within sqrt(eps32)
        ([1, 0], np.array([[0.3, 0.7 + 5e-9], [0.8, 0.2]])),  # within 1e-8 + sqrt(eps64)
        ([1, 0], [0.7, 0.2]),  # a 1-D y_pred always sums to one
    ],
)
def test_rows_within_tolerance_do_not_warn(y_true, y_pred):
    rel = 1e-6 if np.asarray(y_pred).dtype == np.float32 else 1e-12
    _agree(y_true, y_pred, rel=rel)


def test_unsorted_labels_warn_and_columns_follow_sorted_order():
    y_true, y_pred = [0, 1, 2, 2], _P3[:4]
    with pytest.warns(UserWarning, match=r"Labels passed were \[2, 1, 0\]"):
        ours = log_loss(y_true, y_pred, labels=[2, 1, 0])
    with pytest.warns(UserWarning, match="Labels passed were"):
        ref = sk_log_loss(y_true, y_pred, labels=[2, 1, 0])
    assert ours == pytest.approx(ref, rel=1e-12, abs=0.0)
    assert ours == log_loss(y_true, y_pred, labels=[0, 1, 2])


# --------------------------------------------------------------------------------------------
# Errors: xent names the offending value; scikit-learn refuses the same input
# --------------------------------------------------------------------------------------------

ERRORS = {
    "above-one": (([1, 0], [1.1, 0.2]), {}, ValueError, "greater than 1: 1.1"),
    "above-one-2d": (([1, 0], [[0.3, 0.7], [0.0, 1.5]]), {}, ValueError, "greater than 1: 1.5"),
    "above-one-float32": (
        ([1, 0], np.array([1.25, 0.2], dtype=np.float32)),
        {},
        ValueError,
        "greater than 1: 1.25",
    ),
    "below-zero": (([1, 0], [0.5, -0.2]), {}, ValueError, "lower than 0: -0.2"),
    "nan": (([1, 0], [np.nan, 0.2]), {}, ValueError, "NaN"),
    "inf": (([1, 0], [[np.inf, 0.2], [0.1, 0.9]]), {}, ValueError, "infinity"),
    "single-class": (([1, 1, 1], [0.7, 0.2, 0.4]), {}, ValueError, r"only one label \(1\)"),
    "single-class-strings": (
        (["spam", "spam"], [[0.3, 0.7], [0.8, 0.2]]),
        {},
        ValueError,
        r"only one label \(spam\)",
    ),
    "one-label-given": (
        ([1, 1], [0.7, 0.2]),
        {"labels": [1]},
        ValueError,
        r"at least two labels, got \[1\]",
    ),
    "y_true-not-in-labels": (
        ([0, 1, 3], [[0.2, 0.3, 0.5]] * 3),
        {"labels": [0, 1, 2]},
        ValueError,
        r"values \{3\} not belonging to the passed labels \[0, 1, 2\]",
    ),
    "string-y_true-int-labels": (
        (["a", "b"], [0.7, 0.2]),
        {"labels": [0, 1]},
        ValueError,
        r"values \{'[ab]', '[ab]'\} not belonging",
    ),
    "more-classes-than-columns": (
        ([0, 1, 2], [[0.5, 0.5]] * 3),
        {},
        ValueError,
        r"different number of classes: 3 vs 2.*\[0 1 2\]",
    ),
    "one-d-pred-multiclass": (
        ([0, 1, 2], [0.2, 0.3, 0.5]),
        {},
        ValueError,
        "3 vs 2",
    ),
    "labels-vs-columns": (
        ([0, 1, 2], [[0.5, 0.5]] * 3),
        {"labels": [0, 1, 2]},
        ValueError,
        r"different from that in y_prob.*\(3 labels, 2 columns in y_proba\)",
    ),
    "fewer-classes-than-columns": (
        ([0, 1, 1], [[0.2, 0.3, 0.5]] * 3),
        {},
        ValueError,
        "2 vs 3",
    ),
    "length-mismatch": (
        ([1, 0, 1], [0.7, 0.2]),
        {},
        ValueError,
        r"samples: \[2, 3\] \(y_proba has 2, y_true has 3\)",
    ),
    "weight-length": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [1.0, 2.0, 3.0]},
        ValueError,
        r"\[2, 2, 3\] \(.*sample_weight has 3\)",
    ),
    "weight-2d": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [[1.0], [2.0]]},
        ValueError,
        r"shape \(2, 1\)",
    ),
    "weight-scalar": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": 2.0},
        ValueError,
        "array-like or None",
    ),
    "weight-nan": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [np.nan, 1.0]},
        ValueError,
        "sample_weight contains NaN",
    ),
    "weight-inf": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [np.inf, 1.0]},
        ValueError,
        "sample_weight contains infinity",
    ),
    "weight-all-zero": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [0.0, 0.0], "normalize": False},
        ValueError,
        "at least one non-zero",
    ),
    "weight-sums-to-zero": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": [1.0, -1.0]},
        ZeroDivisionError,
        "sums to zero",
    ),
    "weight-strings": (
        ([1, 0], [0.7, 0.2]),
        {"sample_weight": ["a", "b"]},
        TypeError,
        "sample_weight must be numeric",
    ),
    "empty": (([], []), {}, ValueError, r"0 sample\(s\) \(shape=\(0,\)\)"),
    "empty-2d": ((np.array([], dtype=int), np.zeros((0, 2))), {}, ValueError, r"0 sample\(s\)"),
    "no-columns": (([1, 0], np.zeros((2, 0))), {}, ValueError, r"0 feature\(s\)"),
    "three-d": (([1, 0], np.full((2, 2, 1), 0.5)), {}, ValueError, "dim 3"),
    "scalar-pred": (([1], 0.5), {}, ValueError, "must be an array-like. Got 0.5 instead"),
    "continuous-y_true": (([1.5, 0.0], [0.7, 0.2]), {}, ValueError, "non-integer value 1.5"),
    "continuous-labels": (
        ([1, 0], [0.7, 0.2]),
        {"labels": [0.5, 1.0]},
        ValueError,
        "non-integer value 0.5",
    ),
    "nan-y_true": (([np.nan, 1.0], [0.3, 0.8]), {}, ValueError, r"y contains NaN\. \(in y_true\)"),
    "none-in-y_true": (([None, 1], [0.3, 0.8]), {}, ValueError, "NoneType"),
    "mixed-y_true": ((["a", 1], [0.7, 0.2]), {}, ValueError, "Mix of label input types"),
    "mixed-labels": (
        (["a", "b"], [0.7, 0.2]),
        {"labels": ["a", 1]},
        ValueError,
        r"Mix of label input types \(string and number\); Got .*\(in labels\)",
    ),
    "duplicate-labels": (
        ([0, 1, 2], [[0.2, 0.3, 0.5]] * 3),
        {"labels": [0, 1, 2, 2]},
        ValueError,
        r"duplicates: \[0, 1, 2, 2\]",
    ),
    "indicator-with-labels": (
        ([[0, 1, 1], [1, 0, 0]], [[0.3, 0.6, 0.1], [0.8, 0.1, 0.1]]),
        {"labels": [0, 1, 2]},
        ValueError,
        "cannot be combined",
    ),
    "multioutput-y_true": (
        ([[0, 2], [1, 0]], [0.3, 0.8]),
        {},
        ValueError,
        r"0s and 1s, got values \[2\]",
    ),
    "three-d-y_true": ((np.zeros((2, 2, 2), int), [0.7, 0.2]), {}, ValueError, r"\(2, 2, 2\)"),
    "bytes-labels": (([b"a", b"b"], [0.7, 0.2]), {}, TypeError, "bytes"),
    "normalize-not-bool": (([1, 0], [0.7, 0.2]), {"normalize": 0}, TypeError, "Got 0 instead"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name: str):
    args, kwargs, exc, match = ERRORS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. numpy's cast warning inside scikit-learn
        with pytest.raises(exc, match=match):
            log_loss(*args, **kwargs)
        with pytest.raises(exc):
            sk_log_loss(*args, **kwargs)


def test_error_on_range_comes_before_length_check():
    # scikit-learn checks the values of y_pred first; so does xent.
    with pytest.raises(ValueError, match=r"greater than 1: 2\.0"):
        log_loss([0, 1, 1], [2.0, 0.5])


# --------------------------------------------------------------------------------------------
# Documented differences: inputs scikit-learn mishandles
# --------------------------------------------------------------------------------------------


def test_indicator_values_other_than_zero_and_one_are_refused():
    y_true, y_pred = [[0, 2], [2, 0]], [[0.3, 0.7], [0.8, 0.2]]
    # scikit-learn reads the 2s as weights: -(2 log 0.7 + 2 log 0.8) / 2.
    assert sk_log_loss(y_true, y_pred) == pytest.approx(-(math.log(0.7) + math.log(0.8)))
    with pytest.raises(ValueError, match=r"got values \[2\]"):
        log_loss(y_true, y_pred)


def test_column_list_y_true_is_read_as_labels():
    with pytest.raises(TypeError):
        sk_log_loss([[0], [1]], [0.3, 0.8])
    assert log_loss([[0], [1]], [0.3, 0.8]) == sk_log_loss(np.array([[0], [1]]), [0.3, 0.8])
    assert log_loss([[0], [1]], [0.3, 0.8]) == log_loss([0, 1], [0.3, 0.8])


def test_object_array_of_mixed_labels_is_a_value_error():
    y_true = np.array(["a", 1], dtype=object)
    with pytest.raises(TypeError):
        sk_log_loss(y_true, [0.7, 0.2])
    with pytest.raises(ValueError, match="Mix of label input types"):
        log_loss(y_true, [0.7, 0.2])


def test_object_arrays_of_one_kind_work():
    y_pred = _P3[:4]
    strings = np.array(["x", "y", "z", "x"], dtype=object)
    numbers = np.array([0, 1, 2, 0], dtype=object)
    _agree(strings, y_pred)
    assert log_loss(numbers, y_pred) == log_loss([0, 1, 2, 0], y_pred)


# --------------------------------------------------------------------------------------------
# Property: random valid inputs agree with scikit-learn
# --------------------------------------------------------------------------------------------

_prob_value = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_inputs_agree_with_sklearn(data):
    c = data.draw(st.integers(2, 5), label="classes")
    with_labels = data.draw(st.booleans(), label="pass labels")
    if data.draw(st.booleans(), label="string labels"):
        names = [f"class_{k}" for k in range(c)]
    else:
        names = sorted(
            data.draw(st.lists(st.integers(-20, 20), min_size=c, max_size=c, unique=True))
        )
    n = data.draw(st.integers(1 if with_labels else c, 12), label="samples")
    if with_labels:
        codes = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    else:  # every class must appear when they are inferred from y_true
        extra = data.draw(st.lists(st.integers(0, c - 1), min_size=n - c, max_size=n - c))
        codes = data.draw(st.permutations(list(range(c)) + extra))
    rows = data.draw(
        st.lists(
            st.lists(_prob_value, min_size=c, max_size=c).filter(lambda r: sum(r) > 1e-300),
            min_size=n,
            max_size=n,
        )
    )
    probs = np.asarray(rows)
    probs = probs / probs.sum(axis=1, keepdims=True)
    y_pred = probs[:, 1] if c == 2 and data.draw(st.booleans(), label="1-D") else probs
    y_true = [names[k] for k in codes]

    kwargs = {"normalize": data.draw(st.booleans(), label="normalize")}
    if with_labels:
        kwargs["labels"] = names
    if data.draw(st.booleans(), label="weights"):
        weights = data.draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))
        if sum(weights) > 1e-3:
            kwargs["sample_weight"] = weights

    ours = _quiet(log_loss, y_true, y_pred, **kwargs)
    ref = _quiet(sk_log_loss, y_true, y_pred, **kwargs)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-300)
    as_tensor = _quiet(log_loss, y_true, torch.from_numpy(np.ascontiguousarray(y_pred)), **kwargs)
    assert as_tensor == ours


# --------------------------------------------------------------------------------------------
# Words: scikit-learn's own messages, read off scikit-learn for the same input
# --------------------------------------------------------------------------------------------

# Where scikit-learn's message is about its internals (a NumPy broadcast error, an unfitted
# binarizer) or its behaviour differs, xent words its own error (checked in test_errors).
OWN_WORDS = {"weight-strings", "duplicate-labels", "indicator-with-labels", "multioutput-y_true"}


def _sklearn_outcome(*args: Any, **kwargs: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = sk_log_loss(*args, **kwargs)
        except Exception as exc:
            result = exc
    return result, list(caught)


def _builtin_bases(exc: BaseException) -> tuple[type[BaseException], ...]:
    """The built-in exception types ``exc`` is (InvalidParameterError: ValueError, TypeError)."""
    return tuple(t for t in type(exc).__mro__ if t.__module__ == "builtins" and t is not object)


def _opening(message: str) -> str:
    """scikit-learn's sentence: xent's message starts with it (and may add detail after it).
    Only the first line: "Complex data not supported" is followed by the whole array."""
    return "^" + re.escape(message.splitlines()[0])


@pytest.mark.parametrize("name", [name for name in ERRORS if name not in OWN_WORDS])
def test_errors_are_worded_as_sklearn_words_them(name: str):
    args, kwargs, _, _ = ERRORS[name]
    theirs, _ = _sklearn_outcome(*args, **kwargs)
    assert isinstance(theirs, Exception), theirs
    for exc_type in _builtin_bases(theirs)[:-2]:  # leave out Exception and BaseException
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(exc_type, match=_opening(str(theirs))):
                log_loss(*args, **kwargs)


# Inputs on which scikit-learn warns: the warning's category and text are scikit-learn's.
WARNINGS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "not-summing-to-one": (([0, 1], [[0.5, 0.4], [0.2, 0.8]]), {}),
    "not-summing-to-one-float32": (
        ([0, 1, 1], np.array([[0.5, 0.6], [0.2, 0.8], [0.1, 0.8]], np.float32)),
        {},
    ),
    "unsorted-labels-list": (([0, 1, 2], [[0.2, 0.3, 0.5]] * 3), {"labels": [2, 0, 1]}),
    "unsorted-labels-ndarray": (([0, 1], [[0.5, 0.5], [0.2, 0.8]]), {"labels": np.array([1, 0])}),
    "unsorted-string-labels": ((["b", "a"], [0.3, 0.6]), {"labels": ["b", "a"]}),
    "y_pred-keyword": (([0, 1],), {"y_pred": [[0.5, 0.5], [0.2, 0.8]]}),
}


@pytest.mark.parametrize("name", list(WARNINGS))
def test_warnings_are_sklearns(name: str):
    args, kwargs = WARNINGS[name]
    theirs, caught = _sklearn_outcome(*args, **kwargs)
    assert caught, "scikit-learn did not warn"
    with warnings.catch_warnings(record=True) as ours_caught:
        warnings.simplefilter("always")
        ours = log_loss(*args, **kwargs)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert len(ours_caught) == len(caught)
    for mine, their in zip(ours_caught, caught, strict=True):
        assert mine.category is their.category
        assert re.match(_opening(str(their.message)), str(mine.message)), (mine, their)
    first = caught[0]
    with pytest.warns(first.category, match=_opening(str(first.message))):
        log_loss(*args, **kwargs)


def test_y_proba_is_the_parameter_and_y_pred_is_deprecated_as_in_sklearn():
    y_true, y_proba = [0, 1, 1], [[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]
    assert list(inspect.signature(log_loss).parameters) == list(
        inspect.signature(sk_log_loss).parameters
    )
    assert log_loss(y_true, y_proba=y_proba) == sk_log_loss(y_true, y_proba=y_proba)
    both, _ = _sklearn_outcome(y_true, y_proba, y_pred=y_proba)
    with pytest.raises(ValueError, match=_opening(str(both))):
        log_loss(y_true, y_proba, y_pred=y_proba)
