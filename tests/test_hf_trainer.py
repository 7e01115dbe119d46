"""xent.hf under transformers' Trainer: accumulation and evaluation as with the stock model."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import build, fp64_causal_lm_loss  # noqa: E402

import xent.hf  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    """Sequences whose target counts differ, so that only the token count of the whole
    accumulated step (num_items_in_batch) gives the step's mean."""

    def __init__(self, n: int, length: int = 10):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, 990, (n, length), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : (3 * i) % (length - 2)] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train(model, accumulation: int, tmp_path, steps: int = 3, eval_data=None):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        average_tokens_across_devices=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(2 * accumulation * steps),
        eval_dataset=eval_data,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_trainer_with_accumulation_leaves_the_stock_parameters(accumulation, tmp_path):
    stock = build("LlamaForCausalLM", torch.float64)
    stock.loss_function = fp64_causal_lm_loss  # the stock loss without its float32 rounding
    patched = xent.hf.patch(copy.deepcopy(stock))
    calls = []
    head = patched.lm_head
    head.register_forward_pre_hook(lambda *a: calls.append(1))  # the stock forward calls it
    start = {n: p.detach().clone() for n, p in stock.named_parameters()}
    trainer = _train(stock, accumulation, tmp_path / "stock")
    assert trainer.model_accepts_loss_kwargs
    _train(patched, accumulation, tmp_path / "patched")
    assert calls == []  # every step took xent's path
    moved = 0.0
    for (n, p), q in zip(stock.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=n)
        moved = max(moved, (p - start[n]).abs().max().item())
    assert moved > 1e-3  # the steps did change the parameters


def test_trainer_evaluation(tmp_path):
    stock = build("Gemma2ForCausalLM", torch.float64)
    stock.loss_function = fp64_causal_lm_loss
    patched = xent.hf.patch(copy.deepcopy(stock))
    data = _Tokens(5)
    ref = _train(stock, 1, tmp_path / "stock", steps=1, eval_data=data).evaluate()
    trainer = _train(patched, 1, tmp_path / "patched", steps=1, eval_data=data)
    out = trainer.evaluate()  # the stock forward: evaluation sees the logits
    assert out["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-12)
    xent.hf.patch(patched, when="always")  # xent's loss in evaluation too, no logits
    out = trainer.evaluate()
    assert out["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-12)
