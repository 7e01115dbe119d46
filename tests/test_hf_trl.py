"""xent.hf under TRL's SFTTrainer: patched after the trainer is built, xent answers its head."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from hf_models import VOCAB, build  # noqa: E402

import xent.hf  # noqa: E402


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def _dataset(n: int = 12):
    """Tokenized prompt-completion examples of uneven lengths (padding and prompt are ignored)."""
    g = torch.Generator().manual_seed(11)
    ids, masks = [], []
    for i in range(n):
        length = 6 + (5 * i) % 7
        ids.append(torch.randint(4, VOCAB, (length,), generator=g).tolist())
        masks.append([0] * (1 + i % 3) + [1] * (length - 1 - i % 3))
    return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def _sft(model, tmp_path, patch: bool):
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        # Plain SGD: Adam's first steps move every weight by ±lr whatever its gradient's size,
        # so float32 rounding (TRL's head against xent's) in a near-zero gradient would decide
        # a whole step.
        optim="sgd",
        learning_rate=1.0,
        # TRL defaults to bf16 autocast, under which its head computes in bf16 and xent's in
        # the weights' float32: compare both in float32.
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataset_num_proc=None,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer()
    )
    if patch:  # after the trainer has installed its own fused head, which xent replaces
        xent.hf.patch(trainer.model)
    trainer.train()
    return trainer


def test_sft_trainer_patched_after_construction(tmp_path, monkeypatch):
    stock = build("Qwen3ForCausalLM", torch.float32)
    patched = copy.deepcopy(stock)
    ref = _sft(stock, tmp_path / "stock", patch=False)

    calls = []
    lce, llp = xent.hf.linear_cross_entropy, xent.hf.linear_log_probs

    def counted(*args, **kwargs):
        calls.append(kwargs.get("reduction"))
        return lce(*args, **kwargs)

    def counted_log_probs(*args, **kwargs):
        calls.append("log_probs")
        return llp(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's own fused head ran")

    monkeypatch.setattr(xent.hf, "linear_cross_entropy", counted)
    monkeypatch.setattr(xent.hf, "linear_log_probs", counted_log_probs)
    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", refuse)
    out = _sft(patched, tmp_path / "patched", patch=True)
    # patch's check of its options, then 3 steps × 2 micro-batches, all through xent
    assert calls == [None] + ["log_probs"] * 6
    for (n, p), q in zip(stock.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    assert (
        stock.lm_head.weight - build("Qwen3ForCausalLM", torch.float32).lm_head.weight
    ).abs().max() > 1e-3
    # The metrics TRL logs from the fused head's entropy and top-1 fields, and the loss.
    logged, expected = out.state.log_history[-1], ref.state.log_history[-1]
    for key in ("entropy", "mean_token_accuracy", "train_loss"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
    assert logged["entropy"] > 1.0


def test_sft_options_that_trl_would_drop_are_refused(tmp_path):
    model = build("LlamaForCausalLM", torch.float32)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1),
        train_dataset=_dataset(4),
        processing_class=_tokenizer(),
    )
    xent.hf.patch(trainer.model, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing and z_loss"):
        trainer.train()


@pytest.mark.parametrize("name", ["Qwen3ForCausalLM", "CohereForCausalLM", "Gemma2ForCausalLM"])
def test_fused_head_protocol_with_temperature(name):
    """GRPO/DPO-style calls: TRL's head at temperature T against xent's answer to it."""
    from hf_models import batch
    from trl.trainer.utils import add_fused_lm_head

    stock = build(name, torch.float32)
    patched = copy.deepcopy(stock)
    temperature = 0.7  # after the model's own transform (Gemma 2: the soft-cap)
    for model in (stock, patched):
        add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    xent.hf.patch(patched)
    inputs = batch()
    ref = stock(**inputs, fused_lm_head=True)
    out = patched(**inputs, fused_lm_head=True)
    assert out.is_top1 is None and out.log_probs.shape == ref.log_probs.shape == (2, 10)
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    (ref.log_probs * torch.linspace(0, 1, 10)).sum().backward()
    (out.log_probs * torch.linspace(0, 1, 10)).sum().backward()
    for (n, p), q in zip(stock.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
