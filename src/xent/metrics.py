"""Classification metrics with scikit-learn semantics.

``log_loss`` scores predicted class probabilities against true labels the way
``sklearn.metrics.log_loss`` does: same label encoding, same clipping, same warnings and errors.
It is a metric, not a training loss: it takes lists, NumPy arrays or tensors of any dtype and
device, does its arithmetic in NumPy and returns a Python float. scikit-learn is not imported.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from xent._validation import ParameterError, check_real_array

__all__ = ["log_loss"]

ArrayLike: TypeAlias = Sequence[Any] | np.ndarray | torch.Tensor

# y_proba dtypes that keep their own precision (and hence their own clipping eps); anything else
# (ints, bools, longdouble, numeric strings) becomes float64, as in scikit-learn's check_array.
_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# scikit-learn's texts, verbatim, so warning filters and tests written for them still match.
RENAMED_WARNING = (
    "`y_pred` was renamed to `y_proba` in version 1.9 and will be removed in 1.11. "
    "Use `y_proba` instead."
)
BOTH_ERROR = (
    "Cannot use both `y_pred` and `y_proba`. `y_pred` is deprecated, use `y_proba` instead."
)
NOT_NORMALISED_WARNING = "The y_prob values do not sum to one. Make sure to pass probabilities."


def log_loss(
    y_true: ArrayLike,
    y_proba: ArrayLike | None = None,
    *,
    normalize: bool = True,
    sample_weight: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    y_pred: ArrayLike | str = "deprecated",
) -> float:
    r"""Log loss (cross-entropy) of predicted class probabilities, as scikit-learn computes it.

    .. math::

        \mathrm{log\_loss} = -\frac{1}{\sum_i w_i} \sum_i w_i \sum_k y_{ik} \log p_{ik},
        \qquad p_{ik} = \operatorname{clip}(\hat p_{ik}, \varepsilon, 1 - \varepsilon)

    where ``y_ik`` is 1 if sample ``i`` has class ``k`` (the ``k``-th label in sorted order) and
    0 otherwise, ``w_i = 1`` without ``sample_weight``, and ``ε = finfo(dtype of y_proba).eps``
    (float64 for lists and integer or boolean inputs). With ``normalize=False`` the sum is not
    divided by ``Σ w_i``.

    Args:
        y_true: ``(N)`` labels: ints, bools, integral floats or strings, as a list, ndarray or
            tensor. The classes are the sorted unique labels (or ``labels``). A 2-D ``(N, C)``
            label-indicator matrix of 0s and 1s is also accepted; its columns are the classes.
        y_proba: ``(N, C)`` predicted probabilities, column ``k`` for the ``k``-th sorted class;
            or ``(N)`` (or ``(N, 1)``) probabilities of the positive (larger) class of a binary
            problem. Values must lie in ``[0, 1]`` and be finite; rows that do not sum to 1 give a
            ``UserWarning`` and are used as they are, not renormalised. Tensors may live on any
            device and may require grad; they are detached and copied to the CPU.
        normalize: ``True`` for the (weighted) mean over samples, ``False`` for the (weighted)
            sum.
        sample_weight: ``(N)`` real weights (negative allowed; not all zero).
        labels: ``(C)`` every class label, for when ``y_true`` does not show them all (it must
            still name at least two). Columns follow the *sorted* order; unsorted ``labels``
            give a ``UserWarning`` saying so.
        y_pred: the deprecated name of ``y_proba`` (keyword-only, scikit-learn's before 1.9):
            accepted with scikit-learn's ``FutureWarning``; giving both raises ``ValueError``.

    Returns:
        A Python ``float``.

    Warnings and errors are worded as scikit-learn words them (its sentence first, sometimes
    followed by more detail in parentheses), in scikit-learn's categories.

    Raises:
        ValueError: ``y_proba`` outside ``[0, 1]`` (naming the value), NaN or infinite, empty, or
            not 1-D/2-D; a single class without ``labels``; ``y_true`` labels missing from
            ``labels``; a class count that differs from the number of columns; inconsistent
            lengths; non-integral float or mixed string/number labels; bad ``sample_weight``;
            both ``y_proba`` and ``y_pred``, or neither.
        TypeError: a non-numeric ``sample_weight`` or bytes labels.
        ValueError and TypeError (scikit-learn's ``InvalidParameterError`` is both): a non-bool
            ``normalize``, a scalar ``y_proba`` or ``sample_weight``, complex ``y_proba``.
        ZeroDivisionError: ``normalize=True`` and ``sample_weight`` sums to zero.

    Equals ``sklearn.metrics.log_loss(y_true, y_proba, normalize=normalize,
    sample_weight=sample_weight, labels=labels)`` for every input scikit-learn accepts, with
    these deliberate differences:

    * A tensor keeps its dtype: a float32 tensor is clipped at float32's eps, as scikit-learn
      does for ``y_proba.numpy()`` (or with ``array_api_dispatch=True``); scikit-learn's default
      path turns tensors into float64 first. bfloat16 tensors work (eps ``2**-7``).
    * float16 and float32 inputs are clipped at their own eps, then the logs and sums are taken
      in float64; scikit-learn 1.9 does its arithmetic in the input dtype, so the two agree
      to that dtype's rounding rather than bit for bit (float64 inputs agree bit for bit).
    * A 2-D ``y_true`` must hold only 0s and 1s (scikit-learn silently uses other two-valued
      integer matrices as weights), cannot be combined with ``labels``, and a single column is
      read as a 1-D label vector.
    * Duplicate ``labels`` and mixed string/number object arrays raise ``ValueError`` with a
      message; ``labels`` may be a tensor.
    * Leaving out ``y_proba`` (and ``y_pred``) raises ``ValueError`` saying so, where
      scikit-learn reports ``Input contains NaN.``

    Example:
        >>> from xent.metrics import log_loss
        >>> log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]])
        0.2899092476264711
        >>> log_loss([1, 0], [0.7, 0.2])  # P(class 1) only
        0.2899092476264711
        >>> log_loss(["spam", "ham", "ham", "spam"], [[.1, .9], [.9, .1], [.8, .2], [.35, .65]])
        0.21616
        >>> log_loss([0, 2], [[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]], labels=[0, 1, 2],
        ...          sample_weight=[1.0, 3.0], normalize=False)
        1.36258
    """
    if not isinstance(normalize, (bool, np.bool_)):
        raise ParameterError(
            "The 'normalize' parameter of log_loss must be an instance of 'bool' or an instance "
            f"of 'numpy.bool'. Got {normalize!r} instead."
        )
    if not (isinstance(y_pred, str) and y_pred == "deprecated"):
        if y_proba is not None:
            raise ValueError(BOTH_ERROR)
        warnings.warn(RENAMED_WARNING, FutureWarning, stacklevel=2)
        y_proba = y_pred
    if y_proba is None:
        raise ValueError("log_loss() needs y_proba, the predicted probabilities")
    check_real_array("y_proba", y_proba)

    probs, eps = _probabilities(y_proba)
    target = _label_array(y_true, "y_true")
    if target.ndim == 0:
        raise ValueError(f"y_true must be an array of labels, got the scalar {target.item()!r}")
    n = probs.shape[0]
    lengths = {"y_proba": n, "y_true": target.shape[0]}
    if sample_weight is not None and np.ndim(sample_weight) >= 1:
        lengths["sample_weight"] = len(sample_weight)
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name} has {count}" for name, count in lengths.items())
        raise ValueError(
            "Found input variables with inconsistent numbers of samples: "
            f"{list(lengths.values())!r} ({detail})"
        )
    weights = None if sample_weight is None else _sample_weights(sample_weight, n)

    codes, indicator, classes = _encode(target, labels, y_true)

    # A 1-D (or one-column) y_proba is P(positive class); the negative class gets 1 - p.
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.shape[1] == 1:
        probs = np.concatenate([1 - probs, probs], axis=1)

    # Same test as scikit-learn, on the unclipped rows in their own dtype.
    row_sums = probs.sum(axis=1)
    off = ~np.isclose(row_sums, np.asarray(1, dtype=row_sums.dtype), rtol=math.sqrt(eps))
    if off.any():
        warnings.warn(
            f"{NOT_NORMALISED_WARNING} ({int(off.sum())} of {n} rows, e.g. one summing to "
            f"{row_sums[off][0]}; they are used as given, not renormalised)",
            UserWarning,
            stacklevel=2,
        )

    if len(classes) != probs.shape[1]:
        if labels is None:
            raise ValueError(
                f"y_true and y_prob contain different number of classes: {len(classes)} "
                f"vs {probs.shape[1]}. Please provide the true labels explicitly through the "
                f"labels argument. Classes found in y_true: {classes}"
            )
        raise ValueError(
            "The number of classes in labels is different from that in y_prob. Classes found "
            f"in labels: {classes} ({len(classes)} labels, {probs.shape[1]} columns in y_proba)"
        )

    # Clipping in float64 with the input dtype's bounds equals clipping in that dtype: eps and
    # 1 - eps of float16/bfloat16/float32 are exact in float64, and so is every input value.
    lo, hi = eps, 1.0 - eps
    if codes is not None:
        # One-hot rows: Σ_k y_ik log p_ik is the single term log p_i,y_i (adding zeros is exact).
        p_true = probs[np.arange(n), codes].astype(np.float64)
        loss = -np.log(np.clip(p_true, lo, hi))
    else:
        log_p = np.log(np.clip(probs.astype(np.float64), lo, hi))
        loss = -np.where(indicator != 0, indicator * log_p, 0.0).sum(axis=1)

    if weights is None:
        total = loss.mean() if normalize else loss.sum()
    elif normalize:
        scale = weights.sum()
        if scale == 0:
            raise ZeroDivisionError(
                "Weights sum to zero, can't be normalized (sample_weight sums to zero, so the "
                "weighted mean of normalize=True is undefined)"
            )
        total = np.multiply(loss, weights).sum() / scale
    else:
        total = np.dot(loss, weights)
    return float(total)


def _probabilities(y_proba: ArrayLike) -> tuple[np.ndarray, float]:
    """``y_proba`` as a validated 1-D/2-D float ndarray, and the clipping eps of its dtype."""
    if isinstance(y_proba, torch.Tensor):
        t = y_proba.detach().cpu().resolve_conj().resolve_neg()
        if t.is_complex():
            raise TypeError(f"y_proba must be real, got dtype {t.dtype}")
        if t.is_floating_point():
            eps = torch.finfo(t.dtype).eps
            # float32 holds every bfloat16 / float8 value exactly; NumPy has no such dtypes.
            if t.dtype not in (torch.float16, torch.float32, torch.float64):
                t = t.to(torch.float32)
            probs = t.numpy()
        else:
            probs = t.numpy().astype(np.float64)
            eps = float(np.finfo(np.float64).eps)
    else:
        probs = np.asarray(y_proba)
        if probs.dtype.kind == "c":
            raise TypeError(f"y_proba must be real, got dtype {probs.dtype}")
        if probs.dtype not in _NATIVE_FLOATS:
            probs = probs.astype(np.float64)
        eps = float(np.finfo(probs.dtype).eps)

    if probs.ndim > 2:
        raise ValueError(f"Found array with dim {probs.ndim}, while dim <= 2 is required.")
    if probs.ndim == 0:  # scikit-learn's parameter check refuses a scalar
        raise ParameterError(
            f"The 'y_proba' parameter of log_loss must be an array-like. Got {probs.item()!r} "
            "instead."
        )
    shape = tuple(probs.shape)
    if probs.shape[0] == 0:
        raise ValueError(
            f"Found array with 0 sample(s) (shape={shape}) while a minimum of 1 is required."
        )
    if probs.ndim == 2 and probs.shape[1] == 0:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={shape}) while a minimum of 1 is required."
        )
    if not np.isfinite(probs).all():
        if np.isnan(probs).any():
            raise ValueError("Input contains NaN. (in y_proba)")
        raise ValueError(
            f"Input contains infinity or a value too large for {probs.dtype!r}. (in y_proba)"
        )
    high, low = probs.max(), probs.min()
    if high > 1:
        raise ValueError(f"y_prob contains values greater than 1: {high}")
    if low < 0:
        raise ValueError(f"y_prob contains values lower than 0: {low}")
    return probs, eps


def _label_array(values: ArrayLike, name: str) -> np.ndarray:
    """Labels as an ndarray of numbers or of ``str``; mixed or unknown label types raise."""
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float64)
        return t.numpy()
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        raise TypeError(
            "Support for labels represented as bytes is not supported. Convert the labels to a "
            f"string or integer format. (in {name})"
        )
    if arr.dtype.kind == "O" or (arr.dtype.kind == "U" and not isinstance(values, np.ndarray)):
        flat = np.asarray(values, dtype=object).ravel()
        is_str = [isinstance(v, str) for v in flat]
        if any(is_str) and not all(is_str):
            found = np.unique(np.asarray(flat.tolist(), dtype=str))
            raise ValueError(
                f"Mix of label input types (string and number); Got {found}. (in {name})"
            )
        if arr.dtype.kind == "O":
            if all(is_str):
                arr = arr.astype(str)
            elif all(isinstance(v, numbers.Real) for v in flat):
                arr = np.asarray(flat.tolist()).reshape(arr.shape)
            else:
                kinds = sorted({type(v).__name__ for v in flat})
                raise ValueError(
                    f"Unknown label type: {(values,)!r} ({name} holds elements of type {kinds})"
                )
    return arr


def _as_passed(values: ArrayLike) -> Any:
    """An argument as scikit-learn prints it and builds sets of it: a tensor as its list."""
    return values.tolist() if isinstance(values, torch.Tensor) else values


def _check_label_values(arr: np.ndarray, name: str, passed: ArrayLike) -> None:
    """Labels must be integers, bools, integral floats or strings (scikit-learn's target types)."""
    kind = arr.dtype.kind
    if kind in "biuU":
        return
    if kind != "f":
        raise ValueError(
            f"Unknown label type: {(_as_passed(passed),)!r} ({name} has dtype {arr.dtype})"
        )
    if not np.isfinite(arr).all():
        if np.isnan(arr).any():
            raise ValueError(f"Input y contains NaN. (in {name})")
        raise ValueError(
            f"Input y contains infinity or a value too large for {arr.dtype!r}. (in {name})"
        )
    fractional = arr[arr != np.round(arr)]
    if fractional.size:
        raise ValueError(
            f"Unknown label type: {(_as_passed(passed),)!r} ({name} looks continuous: "
            f"non-integer value {fractional[0]}; log_loss needs class labels)"
        )


def _encode(
    target: np.ndarray, labels: ArrayLike | None, y_true: ArrayLike
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """``(codes, indicator, classes)``: class indices into the sorted ``classes`` for 1-D labels,
    or the float64 indicator matrix for a 2-D ``y_true`` (exactly one of the two is ``None``).
    ``y_true`` and ``labels`` as passed are what the messages print, as scikit-learn's do.
    """
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim == 2:
        if labels is not None:
            raise ValueError(
                "labels cannot be combined with a 2-D label-indicator y_true, whose columns "
                "already are the classes"
            )
        if target.dtype.kind not in "biuf":
            raise ValueError(
                f"A 2-D y_true must be a 0/1 label-indicator matrix, got {target.dtype}"
            )
        bad = np.unique(target[(target != 0) & (target != 1)])
        if bad.size:
            raise ValueError(
                "A 2-D y_true must be a label-indicator matrix of 0s and 1s, got values "
                f"{bad[:5].tolist()}"
            )
        return None, target.astype(np.float64), np.arange(target.shape[1])
    if target.ndim != 1:
        raise ValueError(
            f"Unknown label type: {(_as_passed(y_true),)!r} (y_true must be 1-D labels or a 2-D "
            f"label-indicator matrix, got shape {target.shape})"
        )
    _check_label_values(target, "y_true", y_true)

    if labels is None:
        classes, codes = np.unique(target, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"y_true contains only one label ({classes[0]}). Please provide the list of all "
                "expected class labels explicitly through the labels argument."
            )
        return codes.reshape(-1), None, classes

    given = _label_array(labels, "labels")
    if given.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {given.shape}")
    _check_label_values(given, "labels", labels)
    classes = np.unique(given)
    if len(classes) != len(given):
        raise ValueError(f"labels contains duplicates: {given.tolist()}")
    if not np.array_equal(classes, given):
        warnings.warn(
            f"Labels passed were {_as_passed(labels)}. But this function assumes labels are "
            f"ordered lexicographically. Pass the ordered labels={classes.tolist()} and ensure "
            "that the columns of y_prob correspond to this ordering.",
            UserWarning,
            stacklevel=3,
        )
    if (target.dtype.kind == "U") == (classes.dtype.kind == "U"):
        codes = np.clip(np.searchsorted(classes, target), 0, len(classes) - 1)
        missing = np.unique(target[classes[codes] != target])
    else:  # strings against numbers: nothing matches
        codes, missing = None, np.unique(target)
    if missing.size:
        try:  # scikit-learn prints the set difference of the arguments as passed
            undeclared: Any = set(_as_passed(y_true)) - set(_as_passed(labels))
        except TypeError:  # unhashable rows (a one-column y_true)
            undeclared = set(missing.tolist())
        raise ValueError(
            f"y_true contains values {undeclared} not belonging to the passed labels "
            f"{_as_passed(labels)}."
        )
    if len(classes) < 2:
        raise ValueError(f"The labels array needs to contain at least two labels, got {classes}.")
    return codes, None, classes


def _sample_weights(sample_weight: ArrayLike, n: int) -> np.ndarray:
    """``sample_weight`` as a finite float64 ``(n)`` array that is not all zero."""
    if isinstance(sample_weight, torch.Tensor):
        weights = sample_weight.detach().cpu().to(torch.float64).numpy()
    else:
        weights = np.asarray(sample_weight)
        if weights.dtype.kind not in "biuf":
            raise TypeError(f"sample_weight must be numeric, got dtype {weights.dtype}")
        weights = weights.astype(np.float64)
    if weights.ndim == 0:  # scikit-learn's parameter check refuses a scalar
        raise ParameterError(
            "The 'sample_weight' parameter of log_loss must be an array-like or None. Got "
            f"{sample_weight!r} instead."
        )
    if weights.ndim != 1:
        raise ValueError(
            f"Sample weights must be 1D array or scalar, got {weights.ndim}D array. Expected "
            f"either a scalar value or a 1D array of length {n}. (sample_weight has shape "
            f"{weights.shape})"
        )
    if weights.shape[0] != n:
        raise ValueError(
            "Found input variables with inconsistent numbers of samples: "
            f"{[n, weights.shape[0]]!r} (y_proba has {n}, sample_weight has {weights.shape[0]})"
        )
    if not np.isfinite(weights).all():
        if np.isnan(weights).any():
            raise ValueError("Input sample_weight contains NaN.")
        raise ValueError(
            "Input sample_weight contains infinity or a value too large for dtype('float64')."
        )
    if not weights.any():
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return weights
