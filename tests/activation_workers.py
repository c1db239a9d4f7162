"""Rank function for tests/test_saved_activations.py: tools/saved_activations.py's measurement of
what one decoder layer saves for its backward, at a small Qwen2 shape whose fused QKV output (96
columns) has a size no other saved tensor has."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from saved_activations import measure  # noqa: E402

HIDDEN, FFN, HEADS, GROUPS, TOKENS = 64, 176, 4, 1, 64


def activations_rank(variants: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """variants: name -> (compile mode, activation memory budget)."""
    from qwen2_megatron.model.shape import Qwen2Shape

    shape = Qwen2Shape(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                       num_key_value_heads=GROUPS, vocab_size=96, max_position_embeddings=TOKENS)
    return measure(shape, variants, TOKENS)
