"""Tiny, randomly initialised transformers models for the xent.hf tests (nothing downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as tf

VOCAB, HIDDEN = 1000, 64
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _gemma3_multimodal(**extra) -> tf.PretrainedConfig:
    text = tf.Gemma3TextConfig(**_COMMON, head_dim=16, final_logit_softcapping=30.0, **extra)
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return tf.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_id=999,
        boi_token_index=997,
        eoi_token_index=998,
    )


# Each class with a config that exercises its output transform (a soft-cap, a logit scale
# that is not 1, a head bias, experts).
CONFIGS = {
    "LlamaForCausalLM": lambda **kw: tf.LlamaConfig(**_COMMON, **kw),
    "MistralForCausalLM": lambda **kw: tf.MistralConfig(**_COMMON, **kw),
    "MixtralForCausalLM": lambda **kw: tf.MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1, **kw
    ),
    "Qwen2ForCausalLM": lambda **kw: tf.Qwen2Config(**_COMMON, **kw),
    "Qwen3ForCausalLM": lambda **kw: tf.Qwen3Config(**_COMMON, head_dim=16, **kw),
    "Qwen3MoeForCausalLM": lambda **kw: tf.Qwen3MoeConfig(
        **_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=16,
        router_aux_loss_coef=0.1,
        **kw,
    ),
    "GemmaForCausalLM": lambda **kw: tf.GemmaConfig(**_COMMON, head_dim=16, **kw),
    "Gemma2ForCausalLM": lambda **kw: tf.Gemma2Config(
        **_COMMON, head_dim=16, final_logit_softcapping=3.0, **kw
    ),
    "Gemma3ForCausalLM": lambda **kw: tf.Gemma3TextConfig(
        **_COMMON, head_dim=16, final_logit_softcapping=3.0, **kw
    ),
    "Gemma3ForConditionalGeneration": _gemma3_multimodal,
    "Phi3ForCausalLM": lambda **kw: tf.Phi3Config(**_COMMON, **kw),
    "PhiForCausalLM": lambda **kw: tf.PhiConfig(**_COMMON, **kw),
    "CohereForCausalLM": lambda **kw: tf.CohereConfig(**_COMMON, logit_scale=0.5, **kw),
    "GraniteForCausalLM": lambda **kw: tf.GraniteConfig(**_COMMON, logits_scaling=4.0, **kw),
    "Olmo2ForCausalLM": lambda **kw: tf.Olmo2Config(**_COMMON, **kw),
}


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **config_kw):
    """``name`` built from its tiny config with a fixed seed, in ``dtype``, in training mode."""
    torch.manual_seed(seed)
    config = CONFIGS[name](**config_kw)
    # The experts' loop in plain PyTorch: the grouped product has no float64 kernel.
    config._experts_implementation = "eager"
    model = getattr(tf, name)(config)
    if name == "PhiForCausalLM":  # its head bias starts at 0: make it matter
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model.to(dtype).train()


def batch(seed: int = 1, rows: int = 2, length: int = 11) -> dict[str, torch.Tensor]:
    """Token ids, an attention mask with a padded tail and labels ignoring it (and a prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 990, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fp64_causal_lm_loss(
    logits,
    labels,
    vocab_size,
    num_items_in_batch=None,
    ignore_index=-100,
    shift_labels=None,
    **kwargs,
):
    """transformers' ForCausalLMLoss in the logits' own dtype (it rounds them to float32)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(
        logits, shift_labels, ignore_index=ignore_index, reduction=reduction
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch
