"""xent.nn modules against their torch.nn namesakes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xent


def _pair(name, **kwargs):
    return getattr(xent.nn, name)(**kwargs), getattr(nn, name)(**kwargs)


def test_cross_entropy_module_matches_and_keeps_weight_as_buffer():
    weight = torch.rand(5) + 0.1
    ours, theirs = _pair("CrossEntropyLoss", weight=weight, ignore_index=1, label_smoothing=0.1)
    x = torch.randn(7, 5, 3)
    t = torch.randint(0, 5, (7, 3))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight"}
    assert ours.to(torch.float64).weight.dtype == torch.float64
    assert "reduction='mean'" in repr(ours)


@pytest.mark.parametrize(
    ("name", "kwargs", "make"),
    [
        (
            "NLLLoss",
            dict(reduction="sum"),
            lambda g: (
                torch.randn(6, 4, generator=g).log_softmax(1),
                torch.randint(0, 4, (6,), generator=g),
            ),
        ),
        (
            "BCELoss",
            dict(weight=torch.rand(4)),
            lambda g: (torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g)),
        ),
        (
            "BCEWithLogitsLoss",
            dict(pos_weight=torch.rand(4) + 0.5),
            lambda g: (torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g)),
        ),
        (
            "KLDivLoss",
            dict(reduction="batchmean", log_target=True),
            lambda g: (
                torch.randn(6, 4, generator=g).log_softmax(1),
                torch.randn(6, 4, generator=g).log_softmax(1),
            ),
        ),
        (
            "HuberLoss",
            dict(delta=0.5),
            lambda g: (torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)),
        ),
    ],
)
def test_modules_match_torch(name, kwargs, make):
    ours, theirs = _pair(name, **kwargs)
    x, t = make(torch.Generator().manual_seed(0))
    x = x.requires_grad_()
    a, b = ours(x, t), theirs(x, t)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    assert set(ours.state_dict()) == set(theirs.state_dict())
