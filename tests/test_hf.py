"""xent.hf: the patched forward against the stock transformers models, class by class."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import CONFIGS, HIDDEN, VOCAB, batch, build, fp64_causal_lm_loss  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

import xent  # noqa: E402
import xent.hf  # noqa: E402

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


@pytest.mark.parametrize("name", NAMES)
def test_float32_loss_and_gradients_equal_stock(name):
    stock, patched = _pair(name, torch.float32)
    inputs = {**batch(), **_extra(name)}
    ref, ref_grads = _step(stock, **inputs)
    out, grads = _step(patched, **inputs)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-6, atol=2e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=2e-6, msg=n)


def test_float64_oracle_is_forcausallmloss():
    """The float64 stock loss used above is transformers' own, but for its float32 rounding."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[1, 3] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(17)}, {"shift_labels": labels}):
        ours = fp64_causal_lm_loss(logits, labels, 11, **kw)
        ref = ForCausalLMLoss(logits, labels, 11, **kw)
        assert ref.dtype == torch.float32 and ours.dtype == torch.float64
        torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# causal_lm_loss
# --------------------------------------------------------------------------------------------


def _loss_inputs(seed=0, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 9, 8, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(8, 13, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(13, 8, generator=g))
        if bias:
            head.bias.copy_(torch.randn(13, generator=g))
    labels = torch.randint(0, 13, (3, 9), generator=g)
    labels[0, 4:] = -100
    labels[2, 0] = -100
    return h, head, labels


def _stock(h, head, labels, scale=1.0, cap=None, **kw):
    z = head(h) * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return fp64_causal_lm_loss(z, labels, z.shape[-1], **kw)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_items_in_batch": torch.tensor(40)},
        {"num_items_in_batch": 7},
        {"logit_scale": 0.25, "softcap": 2.0},
    ],
)
def test_causal_lm_loss_equals_forcausallmloss(kw, bias):
    h, head, labels = _loss_inputs(bias=bias)
    loss_kw = {k: v for k, v in kw.items() if k == "num_items_in_batch"}
    ref = _stock(h, head, labels, kw.get("logit_scale", 1.0), kw.get("softcap"), **loss_kw)
    ref_grads = torch.autograd.grad(ref, [h, *head.parameters()])
    out = xent.hf.causal_lm_loss(h, head, labels, chunk_size=5, **kw)
    grads = torch.autograd.grad(out, [h, *head.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_lm_loss_shift_labels_taken_as_given():
    h, head, labels = _loss_inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    torch.testing.assert_close(
        xent.hf.causal_lm_loss(h, head, shift_labels=shifted),
        xent.hf.causal_lm_loss(h, head, labels),
        rtol=0,
        atol=0,
    )
    # shift_labels win over labels, as in ForCausalLMLoss.
    torch.testing.assert_close(
        xent.hf.causal_lm_loss(h, head, labels, shift_labels=labels),
        _stock(h, head, labels, shift_labels=labels),
        rtol=1e-12,
        atol=1e-12,
    )


def test_causal_lm_loss_xent_options():
    """Smoothing, z-loss and token weights: xent.linear_cross_entropy on the shifted targets."""
    h, head, labels = _loss_inputs()
    w = torch.rand(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = xent.hf.causal_lm_loss(
        h, head, labels, label_smoothing=0.1, z_loss=1e-3, token_weight=w, softcap=3.0
    )
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    tw = torch.nn.functional.pad(w, (0, 1), value=0.0)[..., 1:]
    ref = xent.linear_cross_entropy_reference(
        h, head.weight, target, label_smoothing=0.1, z_loss=1e-3, token_weight=tw, softcap=3.0
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # The same through num_items_in_batch: the weighted sum over the given count.
    out_sum = xent.hf.causal_lm_loss(h, head, labels, token_weight=w, num_items_in_batch=10)
    z = torch.nn.functional.log_softmax(head(h), -1)
    nll = -z.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = (nll * tw * (target != -100)).sum() / 10
    torch.testing.assert_close(out_sum, expected, rtol=1e-12, atol=1e-12)


def test_causal_lm_loss_zero_items_is_nan_as_in_transformers():
    h, head, labels = _loss_inputs()
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(xent.hf.causal_lm_loss(h, head, ignored))
    assert torch.isnan(ForCausalLMLoss(head(h), ignored, 13))
    out = xent.hf.causal_lm_loss(h, head, ignored, num_items_in_batch=0)
    ref = ForCausalLMLoss(head(h), ignored, 13, num_items_in_batch=0)
    assert torch.isnan(out) and torch.isnan(ref)


def test_causal_lm_loss_errors():
    h, head, labels = _loss_inputs()
    with pytest.raises(ValueError, match="labels or shift_labels"):
        xent.hf.causal_lm_loss(h, head)
    with pytest.raises(ValueError, match=r"\(3, 9\), got \(3, 8\)"):
        xent.hf.causal_lm_loss(h, head, labels[:, :8])
    with pytest.raises(TypeError, match="Identity"):
        xent.hf.causal_lm_loss(h, torch.nn.Identity(), labels)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_causal_lm_loss_half_is_float32(half):
    h64, head64, labels = _loss_inputs(dtype=torch.float64)
    exact = _stock(h64, head64, labels)
    h = h64.detach().to(half).requires_grad_()
    head = copy.deepcopy(head64).to(half)
    out = xent.hf.causal_lm_loss(h, head, labels)
    ref = ForCausalLMLoss(head(h), labels, 13)
    assert out.dtype == torch.float32 == ref.dtype
    # Both see the same rounded inputs; ours never rounds the logits.
    assert abs(out.double() - exact) <= abs(ref.double() - exact) + 1e-6
    out.backward()
    assert h.grad.dtype == half and head.weight.grad.dtype == half


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------


def test_bf16_model_gets_float32_loss():
    stock, patched = _pair("LlamaForCausalLM", torch.float64)
    exact = stock(**batch()).loss
    stock, patched = stock.to(torch.bfloat16), patched.to(torch.bfloat16)
    stock.loss_function = ForCausalLMLoss
    ref, out = stock(**batch()).loss, patched(**batch()).loss
    assert out.dtype == torch.float32 == ref.dtype
    assert abs(out.double() - exact) <= abs(ref.double() - exact) + 1e-3
    out.backward()
    assert patched.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16


def test_under_autocast_the_loss_runs_in_the_head_dtype():
    stock, patched = _pair("PhiForCausalLM", torch.float32)
    exact = stock(**batch()).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patched(**batch())
        hidden = patched.model(input_ids=batch()["input_ids"]).last_hidden_state.to(torch.bfloat16)
        mixed = xent.hf.causal_lm_loss(hidden, patched.lm_head, batch()["labels"])
    assert out.loss.dtype == torch.float32 == mixed.dtype
    torch.testing.assert_close(out.loss, exact, rtol=2e-2, atol=0)  # the backbone ran in bf16
    torch.testing.assert_close(mixed, exact, rtol=2e-2, atol=0)
    # The other way round: float32 hidden states, a bfloat16 head.
    head = copy.deepcopy(patched.lm_head).to(torch.bfloat16)
    wide = xent.hf.causal_lm_loss(hidden.float(), head, batch()["labels"])
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide, exact, rtol=2e-2, atol=0)


def test_unsupported_class_is_refused_with_the_supported_list():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Olmo2ForCausalLM"):
        xent.hf.patch(transformers.GPT2LMHeadModel(config))

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(TypeError, match="Custom overrides the forward of LlamaForCausalLM"):
        xent.hf.patch(Custom(CONFIGS["LlamaForCausalLM"]()))

    class Kept(transformers.LlamaForCausalLM):
        pass

    assert xent.hf.is_patched(xent.hf.patch(Kept(CONFIGS["LlamaForCausalLM"]())))


def test_patch_option_errors():
    model = build("LlamaForCausalLM")
    with pytest.raises(ValueError, match="'sometimes'"):
        xent.hf.patch(model, when="sometimes")
    with pytest.raises(ValueError, match="'cuda'"):
        xent.hf.patch(model, impl="cuda")
    with pytest.raises(ValueError, match=r"1\.5"):
        xent.hf.patch(model, label_smoothing=1.5)
    assert not xent.hf.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        xent.hf.unpatch(model)


def test_unpatch_restores_the_stock_forward():
    stock, patched = _pair("Qwen2ForCausalLM", torch.float64)
    xent.hf.patch(patched, z_loss=0.1)  # patching again replaces the options
    assert patched(**batch()).loss > stock(**batch()).loss + 0.1
    xent.hf.unpatch(patched)
    assert "forward" not in patched.__dict__ and not xent.hf.is_patched(patched)
    out, ref = patched(**batch()), stock(**batch())
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


def test_eval_runs_the_stock_forward_unless_always():
    stock, patched = _pair("Gemma2ForCausalLM", torch.float64)
    stock.eval(), patched.eval()
    out, ref = patched(**batch()), stock(**batch())
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    xent.hf.patch(patched, when="always")
    out = patched(**batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    # Without labels the stock forward runs even in training.
    patched.train()
    ids = batch()["input_ids"]
    torch.testing.assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_signature_and_generate_are_the_stock_ones():
    import inspect

    stock, patched = _pair("Olmo2ForCausalLM", torch.float64)
    assert inspect.signature(patched.forward) == inspect.signature(stock.forward)
    ids = batch()["input_ids"][:, :5]
    for model in (stock, patched):
        model.eval()
        model.generation_config.pad_token_id = 0
    expected = stock.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(patched.generate(ids, max_new_tokens=4, do_sample=False), expected)


def test_return_dict_false_gives_a_tuple_without_logits():
    stock, patched = _pair("Mistral" + "ForCausalLM", torch.float64)
    out = patched(**batch(), return_dict=False)
    ref = stock(**batch(), return_dict=False)
    assert isinstance(out, tuple) and isinstance(ref, tuple)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
    assert len(out) == len(ref) - 1  # the logits are left out (to_tuple drops None)


def test_tied_embeddings_receive_both_gradients():
    stock, patched = _pair("LlamaForCausalLM", torch.float64, tie_word_embeddings=True)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    _, ref = _step(stock, **batch())
    _, grads = _step(patched, **batch())
    assert set(grads) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12, msg=n)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _record(model, **inputs) -> list[tuple[str, tuple[int, ...]]]:
    with _Shapes() as rec:
        out = model(**inputs)
        out.loss.backward()
    return rec.shapes


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM"])
def test_no_tokens_by_vocabulary_tensor_is_created(name):
    """With chunks of c tokens, no operator returns a tensor of more than max(c, H)·V
    elements, while the batch has N > max(c, H) tokens: the N × V logits never exist."""
    chunk = 16
    inputs = batch(rows=4, length=31)
    n = inputs["input_ids"].numel()
    assert n > max(chunk, HIDDEN)
    stock = build(name, torch.float32)
    patched = xent.hf.patch(copy.deepcopy(stock), chunk_size=chunk)
    # The same recorder sees the stock model's N × V logits: it can fail.
    assert any(
        len(s) > 0 and s[-1] == VOCAB and torch.Size(s).numel() >= n * VOCAB
        for _, s in _record(stock, **inputs)
    )
    biggest = max(torch.Size(s).numel() for _, s in _record(patched, **inputs))
    assert biggest <= max(chunk, HIDDEN) * VOCAB < n * VOCAB


def test_frozen_head_forms_no_weight_gradient():
    """LoRA-style: only some backbone weights train; the head's (V, H) gradient is never formed."""
    stock, patched = _pair("LlamaForCausalLM", torch.float64)
    for model in (stock, patched):
        for n, p in model.named_parameters():
            p.requires_grad_("q_proj" in n)
    shapes = _record(patched, **batch())
    assert (VOCAB, HIDDEN) not in [s for _, s in shapes]
    assert patched.lm_head.weight.grad is None
    _, ref = _step(stock, **batch())
    _, grads = _step(patched, **batch())
    assert set(grads) == set(ref) and len(ref) == 2
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12, msg=n)


def test_gradient_checkpointing():
    stock, patched = _pair("Qwen3ForCausalLM", torch.float64)
    for model in (stock, patched):
        model.gradient_checkpointing_enable()
    calls = []
    mlp = patched.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    _, ref = _step(stock, **batch())
    _, grads = _step(patched, **batch())
    assert len(calls) == 2  # the layer ran again in backward: checkpointing was on
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12, msg=n)


def test_position_ids_logits_to_keep_and_cache_pass_through():
    stock, patched = _pair("LlamaForCausalLM", torch.float64)
    inputs = batch()
    positions = torch.tensor([0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14]).repeat(2, 1)
    torch.testing.assert_close(
        patched(**inputs, position_ids=positions).loss,
        stock(**inputs, position_ids=positions).loss,
        rtol=1e-12,
        atol=1e-12,
    )
    assert (patched(**inputs, position_ids=positions).loss - patched(**inputs).loss).abs() > 1e-6
    keep = torch.arange(4, 11)
    kept = {**inputs, "labels": inputs["labels"][:, 4:]}
    torch.testing.assert_close(
        patched(**kept, logits_to_keep=keep).loss,
        stock(**kept, logits_to_keep=keep).loss,
        rtol=1e-12,
        atol=1e-12,
    )
    # A prefix in the cache, the loss over the continuation.
    ids = inputs["input_ids"]

    def prefix():
        with torch.no_grad():
            return stock(input_ids=ids[:, :6], use_cache=True).past_key_values

    rest = {"input_ids": ids[:, 6:], "labels": ids[:, 6:], "use_cache": True}
    out = patched(**rest, past_key_values=prefix())
    ref = stock(**rest, past_key_values=prefix())
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    assert out.past_key_values.get_seq_length() == 11


def test_token_weight_keyword():
    stock, patched = _pair("LlamaForCausalLM", torch.float64)
    inputs = batch()
    w = torch.rand(2, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = patched(**inputs, token_weight=w).loss
    logits = stock(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    target = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:]
    tw = torch.nn.functional.pad(w, (0, 1), value=0.0)[..., 1:] * (target != -100)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), reduction="none"
    )
    torch.testing.assert_close(out, (nll * tw.flatten()).sum() / tw.sum(), rtol=1e-12, atol=1e-12)
    patched.eval()
    with pytest.raises(ValueError, match="token_weight"):
        patched(**inputs, token_weight=w)


def test_moe_without_router_logits_adds_no_aux_loss():
    stock, patched = _pair("MixtralForCausalLM", torch.float64)
    out, ref = patched(**batch()), stock(**batch())
    assert out.aux_loss is None and ref.aux_loss is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    with_aux = patched(**batch(), output_router_logits=True)
    assert (with_aux.loss - out.loss).item() == pytest.approx(
        0.1 * with_aux.aux_loss.item(), rel=1e-9
    )
