"""RoPE helpers: changing the base of built model chunks, and RoPE from cos/sin tables.

- set_rope_base: Qwen2's long-context phase (base 10k -> 1M) on built chunks.
- rotate_with_tables: megatron-core's unfused RoPE with cos and sin computed by an operator of
  their own. Inside a compiled layer inductor fuses megatron's `cos(freqs)` and `sin(freqs)` into
  the kernel that rotates query and key, which then evaluates both for every element of every
  head and sample (the [s, 1, 1, d] angles are broadcast). An operator is opaque to inductor, so
  the tables are computed once per call and the rotation reads them.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor


def set_rope_base(chunks: list[torch.nn.Module], base: float) -> None:
    """Recompute the rotary inverse frequencies of every chunk for a new base, in place."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, RotaryEmbedding):
                dim = module.inv_freq.numel() * 2
                exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=module.inv_freq.device) / dim
                module.inv_freq = 1.0 / (base**exponent)
    RotaryEmbedding.forward.cache_clear()  # megatron memoises the (max_seq_len -> freqs) tables


def rotate_with_tables(query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """megatron's non-interleaved RoPE (_apply_rotary_pos_emb_bshd, mscale 1) of query and key.

    query [s, b, hq, d], key [s, b, hk, d], freqs: megatron's RotaryEmbedding output [s, 1, 1, rot]
    (rot <= d; the dimensions past rot pass unrotated). cos and sin are cast to the activations'
    dtype before the products, as megatron does.
    """
    cos, sin = torch.ops.qwen2_megatron.rope_tables(freqs, query.dtype)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rot = cos.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    return torch.cat((t * cos + _rotate_half(t, False) * sin, t_pass), dim=-1)


@torch.library.custom_op("qwen2_megatron::rope_tables", mutates_args=())
def _rope_tables(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


@_rope_tables.register_fake
def _rope_tables_shape(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return freqs.new_empty(freqs.shape, dtype=dtype), freqs.new_empty(freqs.shape, dtype=dtype)
