"""xent.hf: the patched forward against the stock transformers models, class by class."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import xent.hf  # noqa: E402
from hf_models import CONFIGS, HIDDEN, VOCAB, batch, build, fp64_causal_lm_loss  # noqa: E402

NAMES = list(CONFIGS)


def _pair(name: str, dtype: torch.dtype, **config_kw):
    """The stock model and a patched deep copy of it (same weights)."""
    stock = build(name, dtype, **config_kw)
    if dtype == torch.float64:
        stock.loss_function = fp64_causal_lm_loss
    return stock, xent.hf.patch(copy.deepcopy(stock))


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _extra(name: str) -> dict:
    return {"output_router_logits": True} if "Moe" in name or "Mixtral" in name else {}


def test_every_supported_class_is_tested():
    assert set(NAMES) == set(xent.hf.SUPPORTED)


@pytest.mark.parametrize("name", NAMES)
def test_float64_loss_and_gradients_equal_stock(name):
    stock, patched = _pair(name, torch.float64)
    inputs = {**batch(), **_extra(name)}
    ref, ref_grads = _step(stock, **inputs)
    out, grads = _step(patched, **inputs)
    assert out.logits is None and ref.logits is not None
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    if "aux_loss" in ref:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12, msg=n)
