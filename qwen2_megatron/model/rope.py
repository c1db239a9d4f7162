"""Changing the RoPE base of built model chunks (Qwen2's long-context phase: base 10k -> 1M)."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def set_rope_base(chunks: list[torch.nn.Module], base: float) -> None:
    """Recompute the rotary inverse frequencies of every chunk for a new base, in place."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, RotaryEmbedding):
                dim = module.inv_freq.numel() * 2
                exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=module.inv_freq.device) / dim
                module.inv_freq = 1.0 / (base**exponent)
    RotaryEmbedding.forward.cache_clear()  # megatron memoises the (max_seq_len -> freqs) tables
