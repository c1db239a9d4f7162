"""Layer modules that replace megatron-core's local (no Transformer Engine) ones in the layer spec.

megatron-core's local spec falls short for Qwen2 in two places:
- its DotProductAttention materialises the s x s score matrix (out of memory at seq 4096 on an
  H200; ../shared/reference/performance.md): SDPAttention calls torch's
  scaled_dot_product_attention, which dispatches to flash / memory-efficient / cuDNN kernels on
  GPU and a fused kernel on CPU;
- its WrappedTorchNorm refuses sequence parallelism: Qwen2RMSNorm marks its weight as a
  sequence-parallel parameter so megatron's DDP all-reduces its gradient over the TP group.
Both keep megatron-core's interfaces, so they are swapped in through the ModuleSpec (spec.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class Qwen2RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as Hugging Face's Qwen2RMSNorm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        # megatron's finalize_model_grads all-reduces grads of parameters marked this way over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class SDPAttention(DotProductAttention):
    """megatron-core core attention computed by torch.nn.functional.scaled_dot_product_attention.

    Takes and returns megatron's layouts: query [sq, b, heads, d], key/value [sk, b, groups, d],
    output [sq, b, heads * d]. Grouped-query attention is passed to SDPA as is (enable_gqa), so
    keys and values are never repeated in memory. A given attention_mask follows megatron's
    convention (True = masked out); without one the causal mask is implicit.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "packed sequences and attention bias need Transformer Engine's attention"
            )
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        keep = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def _param_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
