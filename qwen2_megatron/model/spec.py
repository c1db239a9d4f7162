"""Which layer implementation a Qwen2 decoder block uses: Transformer Engine's or the local one.

This is the single place where megatron-core's layer specs are extended. With Transformer Engine
importable and a GPU present, megatron-core's TE spec is used unchanged. Otherwise megatron-core's
local spec is taken and two submodules are swapped (local_modules.py): the attention core for a
fused SDPA one and the norms for an RMSNorm that supports sequence parallelism. `liger` names the
Liger fast paths to swap in on top (train.liger_kernels: "rms_norm", "swiglu", "rope"; dense MLPs
only for "swiglu"), each a subclass with the same parameters; `compiled` layers take their RoPE
from cos/sin tables (TabledRopeSelfAttention) unless Liger's RoPE is chosen, and linears whose
weight-gradient accumulation into main_grad (train.grad_accum_fusion) stays inside the graph.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen2_megatron.model.wgrad_accumulation import CompiledColumnParallelLinear, CompiledRowParallelLinear
from qwen2_megatron.model.local_modules import (
    LigerRMSNorm,
    LigerRopeSelfAttention,
    LigerSwiGLUMLP,
    Qwen2RMSNorm,
    SDPAttention,
    TabledRopeSelfAttention,
)


def use_transformer_engine() -> bool:
    """Transformer Engine layers need both the package and a GPU."""
    return HAVE_TE and torch.cuda.is_available()


def decoder_block_spec(
    config: TransformerConfig, vp_stage: int | None, te: bool, liger: tuple[str, ...] = (),
    compiled: bool = False,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline (virtual) stage, dense or MoE per config.moe_layer_freq.

    liger: Liger kernels to use in the local spec; compiled: the layers will be compiled (both
    ignored with Transformer Engine's layers).
    """
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if not te:
        norm = LigerRMSNorm if "rms_norm" in liger else Qwen2RMSNorm
        for layer in {id(spec): spec for spec in block.layer_specs}.values():
            _swap_local_modules(layer, norm, liger, compiled)
        block.layer_norm = norm
    return block


def _swap_local_modules(layer: ModuleSpec, norm: type, liger: tuple[str, ...], compiled: bool) -> None:
    sub = layer.submodules
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    attention = sub.self_attention.submodules
    attention.core_attention = SDPAttention
    if sub.self_attention.module is SelfAttention:
        if "rope" in liger:
            sub.self_attention.module = LigerRopeSelfAttention
        elif compiled:
            sub.self_attention.module = TabledRopeSelfAttention
    if compiled:
        attention.linear_qkv = _COMPILED_LINEARS.get(attention.linear_qkv, attention.linear_qkv)
        attention.linear_proj = _COMPILED_LINEARS.get(attention.linear_proj, attention.linear_proj)
        sub.mlp = _with_compiled_linears(sub.mlp)
    mlp = sub.mlp
    if "swiglu" in liger and isinstance(mlp, partial) and getattr(mlp.func, "__self__", None) is MLP:
        sub.mlp = partial(LigerSwiGLUMLP.as_mlp_submodule, *mlp.args, **mlp.keywords)


# Compiled layers' linears keep their weight-gradient accumulation inside the graph (wgrad_accumulation.py).
_COMPILED_LINEARS = {ColumnParallelLinear: CompiledColumnParallelLinear, RowParallelLinear: CompiledRowParallelLinear}


def _with_compiled_linears(mlp: object) -> object:
    """The dense MLP's spec, or an MoE layer's with its shared expert's, with the compiled linears
    (routed experts are not compiled layers' linears)."""
    if not isinstance(mlp, partial) or "submodules" not in mlp.keywords:
        return mlp
    submodules = mlp.keywords["submodules"]
    if isinstance(submodules, MLPSubmodules):
        submodules = replace(submodules, linear_fc1=_COMPILED_LINEARS.get(submodules.linear_fc1, submodules.linear_fc1),
                             linear_fc2=_COMPILED_LINEARS.get(submodules.linear_fc2, submodules.linear_fc2))
    elif isinstance(submodules, MoESubmodules) and submodules.shared_experts is not None:
        submodules = replace(submodules, shared_experts=_with_compiled_linears(submodules.shared_experts))
    return partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
