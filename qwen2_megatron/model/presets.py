"""Named model shapes: the released Qwen2 sizes (../shared/reference/qwen2.md) and tiny CPU models."""

from __future__ import annotations

from dataclasses import replace

from qwen2_megatron.model.shape import Qwen2Shape

_QWEN2_7B_LIKE = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)

PRESETS: dict[str, Qwen2Shape] = {
    "qwen2_0.5b": Qwen2Shape(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen2_1.5b": Qwen2Shape(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen2_7b": Qwen2Shape(**_QWEN2_7B_LIKE, intermediate_size=18944, vocab_size=152064),
    "qwen2_72b": Qwen2Shape(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-5,
    ),
    "qwen2_57b_a14b": Qwen2Shape(
        **_QWEN2_7B_LIKE, intermediate_size=18944, vocab_size=151936,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480,
    ),
    # Tiny models for CPU runs and tests: the real Qwen2 vocabulary (so the real tokenizer
    # works), a few narrow layers, GQA with 2 query groups so TP=2 is a valid layout.
    "tiny": Qwen2Shape(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "tiny_moe": Qwen2Shape(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=128,
    ),
}


def get_preset(name: str) -> Qwen2Shape:
    """A fresh copy of a preset (callers may modify it)."""
    try:
        return replace(PRESETS[name])
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
