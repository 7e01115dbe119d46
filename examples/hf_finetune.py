"""Fine-tune a Hugging Face causal LM with xent's loss: the Trainer never sees the logits.

    python examples/hf_finetune.py

A tiny Llama-shaped model is built from a config (random weights, nothing downloaded) and
trained for a few steps with transformers' `Trainer` and gradient accumulation on a synthetic
task: each sequence counts upwards modulo the vocabulary, so the next token is predictable and
the loss must fall. `xent.hf.patch(model)` is the only change to a stock fine-tuning script: in
training, the model's forward computes the loss from the last hidden states and the head's
weight with `xent.linear_cross_entropy`, and returns `logits=None`. At the end the script checks
the patched loss against the stock forward's on the same batch and compares a few generated
tokens with the counting rule.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import xent.hf


class Counting(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, …`` (mod V) from random starts; the labels are the inputs."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--output-dir", help="the Trainer's directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xent-hf-") as tmp:
        finetune(args, args.output_dir or tmp)


def finetune(args: argparse.Namespace, output_dir: str) -> None:

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    xent.hf.patch(model)  # before the Trainer: it wraps the forward it finds

    training = transformers.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # the Trainer passes num_items_in_batch: exact means
        max_steps=args.steps,
        learning_rate=1e-2,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    data = Counting(2 * 8 * args.steps, length=24, vocab=args.vocab)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data)
    first = None
    result = trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            first = entry["loss"] if first is None else first
    print(f"loss: {first:.3f} at the first log, {result.training_loss:.3f} averaged over the run")

    # The same batch through xent (training mode) and the stock forward (evaluation mode).
    probe = Counting(4, length=24, vocab=args.vocab, seed=1)[:]
    with torch.no_grad():
        model.train()
        ours = model(**probe)
        model.eval()
        stock = model(**probe)
    print(f"xent loss {ours.loss.item():.6f}, stock loss {stock.loss.item():.6f}")
    assert ours.logits is None and stock.logits is not None
    assert torch.allclose(ours.loss, stock.loss, rtol=1e-5)

    prompt = torch.tensor([[5, 6, 7, 8]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    print("generate([5, 6, 7, 8]) →", generated[0].tolist())
    assert result.training_loss < first


if __name__ == "__main__":
    main()
