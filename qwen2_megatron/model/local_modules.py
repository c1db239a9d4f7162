"""Layer modules that replace megatron-core's local (no Transformer Engine) ones in the layer spec.

megatron-core's local spec falls short for Qwen2 in two places:
- its DotProductAttention materialises the s x s score matrix (out of memory at seq 4096 on an
  H200; ../shared/reference/performance.md): SDPAttention calls torch's
  scaled_dot_product_attention, which dispatches to flash / memory-efficient / cuDNN kernels on
  GPU and a fused kernel on CPU;
- its WrappedTorchNorm refuses sequence parallelism: Qwen2RMSNorm marks its weight as a
  sequence-parallel parameter so megatron's DDP all-reduces its gradient over the TP group.
Both keep megatron-core's interfaces, so they are swapped in through the ModuleSpec (spec.py).

With train.liger_kernels, spec.py swaps in the Liger* subclasses below instead: the same
parameters (names, shapes, attributes), a forward that calls a fused Triton kernel (liger.py) where
it computes exactly the plain function, and the plain forward (the base class's) elsewhere.
With compiled layers (train.compile=layers) the attention is TabledRopeSelfAttention, which
computes the same RoPE from cos/sin tables that inductor cannot fuse into the rotation.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from qwen2_megatron.model import liger
from qwen2_megatron.model.rope import rotate_with_tables


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
        # value is a view of megatron's fused QKV projection output: saved for the backward as
        # such, it would keep that whole buffer alive (query and key are saved rotated anyway);
        # the value heads alone are copied
        value = value.contiguous()
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


class LigerRMSNorm(Qwen2RMSNorm):
    """Qwen2RMSNorm by Liger's fused kernel (forward and backward in one pass each)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:  # the kernel multiplies in one dtype
            return super().forward(x)
        return liger.rms_norm(x, self.weight, self.eps)


class LigerSwiGLUMLP(MLP):
    """megatron's MLP with silu(gate) * up by Liger's fused kernel on the [gate | up] fc1 output.

    Only the case Qwen2's dense layers take (SwiGLU, no per-token scale, no clamp or offset, no
    Transformer Engine activation) is fused; any other call runs megatron's MLP.forward.
    """

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs):
        c = self.config
        if (
            per_token_scale is not None
            or not c.gated_linear_unit
            or c.activation_func is not F.silu
            or c.use_te_activation_func
            or c.bias_activation_fusion
            or c.activation_func_clamp_value is not None
            or c.glu_linear_offset != 0.0
        ):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(liger.swiglu(intermediate))


class RopeSelfAttention(SelfAttention):
    """megatron's SelfAttention with RoPE applied to query and key by the subclass's `rotate`.

    The rotary frequencies are taken out of the call to SelfAttention.forward (so megatron does
    not rotate) and applied as soon as get_query_key_value_tensors has split query, key and value
    (the next step in megatron's forward; nothing between them touches q/k outside inference).
    Any case megatron's unfused RoPE treats differently (inference, packed sequences, interleaved
    or MLA RoPE, YaRN scaling, no-RoPE layers, Transformer Engine's fused RoPE) runs unchanged.
    """

    _rope_freqs: Tensor | None = None

    @staticmethod
    def rotate(query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        freqs = kwargs.get("rotary_pos_emb")
        if isinstance(freqs, tuple) and len(freqs) == 2 and freqs[0] is freqs[1]:
            freqs = freqs[0]
        if args or not self._fusable(freqs, kwargs):
            return super().forward(hidden_states, *args, **kwargs)
        self._rope_freqs = freqs
        try:
            return super().forward(hidden_states, **{**kwargs, "rotary_pos_emb": None})
        finally:
            self._rope_freqs = None

    def _fusable(self, freqs: object, kwargs: dict) -> bool:
        c = self.config
        return (
            isinstance(freqs, Tensor)
            and freqs.dim() == 4
            and freqs.shape[1:3] == (1, 1)  # [s, 1, 1, rot]: the same angles for every sample
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and kwargs.get("packed_seq_params") is None
            and not c.apply_rope_fusion
            and not c.rotary_interleaved
            and not c.multi_latent_attention
            and not c.attention_output_gate
            and not c.fused_single_qkv_rope
            and not c.flash_decode
            and not (c.no_rope_freq and c.no_rope_freq[self.layer_number - 1])
            and self._yarn_concentration_factor == 1.0
        )

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope_freqs is None:
            return qkv
        query, key, value = qkv
        query, key = self.rotate(query, key, self._rope_freqs)
        return query, key, value


class LigerRopeSelfAttention(RopeSelfAttention):
    """RoPE of query and key by one Liger kernel (train.liger_kernels=[rope])."""

    @staticmethod
    def rotate(query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        return liger.rope(query, key, freqs)


class TabledRopeSelfAttention(RopeSelfAttention):
    """RoPE of query and key from cos/sin tables computed once per call (rope.rotate_with_tables).

    The attention of compiled layers (train.compile=layers): there inductor would otherwise
    evaluate cos and sin for every element it rotates.
    """

    @staticmethod
    def rotate(query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        return rotate_with_tables(query, key, freqs)


def _param_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
