"""Under ``torch.autocast`` every xent function behaves as its PyTorch namesake.

PyTorch runs its losses in fp32 under autocast (fp32 losses from half-precision logits) and
keeps the softmax family in the input's dtype on the CPU; xent must return the same dtype, the
same value, and gradients of the same dtype and value. The device rule lives in one table
(``xent._engine.policy.AUTOCAST_FP32``); the CUDA half of it is checked where a GPU is present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import xent
from xent._engine import policy

_gen = torch.Generator().manual_seed(0)
X = 3 * torch.randn(6, 5, generator=_gen)
T = torch.tensor([0, 4, 2, 1, -100, 3])
P = torch.rand(6, 5, generator=_gen)
W = torch.rand(5, generator=_gen) + 0.5


def _calls(device: str) -> dict[str, tuple[Callable, Callable, Callable[[torch.Tensor], tuple]]]:
    """``name -> (xent callable, torch callable, logits -> arguments)``."""
    t, p, w = T.to(device), P.to(device), W.to(device)

    def module(name: str, **options: Any) -> tuple[Callable, Callable]:
        return getattr(xent.nn, name)(**options), getattr(torch.nn, name)(**options)

    return {
        "cross_entropy": (xent.cross_entropy, F.cross_entropy, lambda x: (x, t, w)),
        "cross_entropy-probs": (xent.cross_entropy, F.cross_entropy, lambda x: (x, p.to(x.dtype))),
        "nll_loss": (xent.nll_loss, F.nll_loss, lambda x: (x.log_softmax(1), t)),
        "binary_cross_entropy": (
            xent.binary_cross_entropy,
            F.binary_cross_entropy,
            lambda x: (x.sigmoid(), p),
        ),
        "binary_cross_entropy_with_logits": (
            xent.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            lambda x: (x, p.to(x.dtype)),
        ),
        "kl_div": (
            lambda a, b: xent.kl_div(a, b, reduction="batchmean"),
            lambda a, b: F.kl_div(a, b, reduction="batchmean"),
            lambda x: (x.log_softmax(1), p.softmax(1)),
        ),
        "huber_loss": (xent.huber_loss, F.huber_loss, lambda x: (x, p)),
        "softmax": (xent.softmax, F.softmax, lambda x: (x, 1)),
        "log_softmax": (xent.log_softmax, F.log_softmax, lambda x: (x, 1)),
        "softmax-dtype": (
            lambda a: xent.softmax(a, 1, dtype=torch.float64),
            lambda a: F.softmax(a, 1, dtype=torch.float64),
            lambda x: (x,),
        ),
        "logsumexp": (xent.logsumexp, torch.logsumexp, lambda x: (x, 1)),
        "nn.CrossEntropyLoss": (*module("CrossEntropyLoss", label_smoothing=0.1), lambda x: (x, t)),
        "nn.NLLLoss": (*module("NLLLoss"), lambda x: (x.log_softmax(1), t)),
        "nn.BCEWithLogitsLoss": (*module("BCEWithLogitsLoss"), lambda x: (x, p)),
        "nn.KLDivLoss": (
            *module("KLDivLoss", reduction="batchmean"),
            lambda x: (x.log_softmax(1), p.softmax(1)),
        ),
        "nn.HuberLoss": (*module("HuberLoss"), lambda x: (x, p)),
    }


def _run(fn: Callable, make: Callable, x: torch.Tensor, device: str, dtype: torch.dtype):
    leaf = x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out = fn(*make(leaf))
    (grad,) = torch.autograd.grad(out.float().sum(), leaf)
    return out, grad


def _compare(device: str, autocast_dtype: torch.dtype, input_dtype: torch.dtype) -> int:
    checked = 0
    for name, (ours_fn, theirs_fn, make) in _calls(device).items():
        x = X.to(device=device, dtype=input_dtype)
        try:
            theirs, their_grad = _run(theirs_fn, make, x, device, autocast_dtype)
        except RuntimeError as error:  # refused under autocast (binary_cross_entropy on CUDA)
            with pytest.raises(RuntimeError, match="autocast"):
                _run(ours_fn, make, x, device, autocast_dtype)
            assert "autocast" in str(error)
            checked += 1
            continue
        ours, our_grad = _run(ours_fn, make, x, device, autocast_dtype)
        where = f"{name} ({input_dtype} under {device} autocast to {autocast_dtype})"
        assert ours.dtype == theirs.dtype, f"{where}: {ours.dtype} vs torch's {theirs.dtype}"
        assert our_grad.dtype == their_grad.dtype, where
        tol = 1e-5 if ours.dtype in (torch.float32, torch.float64) else 1e-2
        gtol = 1e-5 if input_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol, msg=where)
        torch.testing.assert_close(our_grad, their_grad, atol=gtol, rtol=gtol, msg=where)
        checked += 1
    return checked


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_autocast_matches_torch(autocast_dtype, input_dtype):
    assert _compare("cpu", autocast_dtype, input_dtype) == len(_calls("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_autocast_matches_torch(autocast_dtype, input_dtype):
    assert _compare("cuda", autocast_dtype, input_dtype) == len(_calls("cuda"))


def test_the_example_of_the_issue_is_fp32_as_in_torch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 50, generator=gen).bfloat16()
    t = torch.randint(0, 50, (8,), generator=gen)
    with torch.autocast("cpu", torch.bfloat16):
        ours, theirs = xent.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    assert xent.cross_entropy(x, t).dtype == torch.bfloat16  # outside autocast: unchanged


def test_matrix_products_inside_run_in_fp32_under_autocast():
    """Weighted label smoothing takes a product over the classes: under autocast it must not
    drop to bf16 (the loss equals the fp32 loss to fp32 precision)."""
    gen = torch.Generator().manual_seed(2)
    x = 4 * torch.randn(33, 301, generator=gen)
    t = torch.randint(0, 301, (33,), generator=gen)
    w = torch.rand(301, generator=gen)
    expected = xent.cross_entropy(x, t, w, label_smoothing=0.2)
    with torch.autocast("cpu", torch.bfloat16):
        got = xent.cross_entropy(x, t, w, label_smoothing=0.2)
    assert torch.equal(got, expected)


def test_one_table_names_every_wrapped_function():
    wrapped = {
        name
        for name in xent.__all__
        if hasattr(getattr(xent, name), "__wrapped__") and name != "linear_cross_entropy"
    }
    listed = set().union(*policy.AUTOCAST_FP32.values(), *policy.AUTOCAST_REFUSED.values())
    assert wrapped == listed
