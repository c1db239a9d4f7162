"""Build megatron-core GPTModel chunks for a Qwen2 shape in a parallel layout.

The mapping from Qwen2 (Hugging Face semantics) to megatron-core's TransformerConfig lives here
and only here (../shared/reference/qwen2.md, "Mapping onto megatron-core"). megatron-core 0.19
marks GPTModel deprecated in favour of HybridModel; GPTModel is kept deliberately: HybridModel
splits every decoder layer into separate attention and MLP layers, which changes checkpoint names
and pipeline splitting, while GPTModel still receives fixes in the 0.19 line.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen2_megatron.model.fast_paths import FastPaths, compile_decoder_layers
from qwen2_megatron.model.grouped_experts import use_grouped_experts
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.model.spec import decoder_block_spec, use_transformer_engine
from qwen2_megatron.parallel.layout import ParallelLayout

Precision = Literal["fp32", "bf16"]
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(
    shape: Qwen2Shape,
    layout: ParallelLayout,
    precision: Precision = "fp32",
    local_spec: bool = False,
    **overrides: Any,
) -> TransformerConfig:
    """megatron-core's config for this shape and layout; `overrides` set further config fields.

    local_spec=True keeps megatron-core's local layers even where Transformer Engine is usable
    (checkpoint conversion does, so its parameter names never depend on the machine).
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(_DTYPES)}")
    dtype = _DTYPES[precision]
    on_gpu = torch.cuda.is_available()
    fields: dict[str, Any] = dict(
        num_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if (layout.vpp or 1) > 1 else None,
        # Interleaved schedule: batched p2p swaps activations between stages (Megatron-LM
        # issues 750/1450); Megatron-LM itself overlaps unbatched p2p instead.
        batch_p2p_comm=(layout.vpp or 1) <= 1,
        overlap_p2p_comm=(layout.vpp or 1) > 1,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        use_cpu_initialization=not on_gpu,
    )
    if shape.is_moe:
        fields.update(
            num_moe_experts=shape.num_experts,
            moe_router_topk=shape.num_experts_per_tok,
            moe_ffn_hidden_size=shape.moe_intermediate_size,
            moe_shared_expert_intermediate_size=shape.shared_expert_intermediate_size,
            moe_shared_expert_gate=True,
            # Qwen2-MoE: softmax over all experts, then top-k; renormalise only if norm_topk_prob
            # (top-k then softmax, megatron's default, equals renormalised top-k probabilities).
            moe_router_pre_softmax=not shape.norm_topk_prob,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=shape.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
            moe_layer_freq=[int(moe) for moe in shape.moe_layer_pattern()],
            moe_grouped_gemm=use_transformer_engine() and not local_spec,
        )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(
    shape: Qwen2Shape,
    layout: ParallelLayout,
    precision: Precision = "fp32",
    parallel_output: bool = True,
    local_spec: bool = False,
    moe_grouped_gemm: bool = False,
    fast: FastPaths | None = None,
    **overrides: Any,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage) on its device.

    Needs an initialised runtime (parallel.runtime.init_runtime) with the same layout.
    parallel_output=False gathers the vocabulary-parallel logits (for inference and parity checks).
    moe_grouped_gemm=True runs the routed experts of the local (no Transformer Engine) spec as
    grouped GEMMs (grouped_experts.py) instead of megatron's per-expert loop; with Transformer
    Engine they are always TE's grouped GEMMs. Checkpoints are interchangeable between the two.
    fast: optional fast paths of the local layers (Liger kernels, compiled layers; fast_paths.py).
    """
    config = transformer_config(shape, layout, precision, local_spec, **overrides)
    te = use_transformer_engine() and not local_spec
    grouped = moe_grouped_gemm and shape.is_moe and not te
    fast = (fast or FastPaths()).resolve(te)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for chunk in range(vpp or 1):
        vp_stage = chunk if vpp else None
        block = decoder_block_spec(config, vp_stage, te, fast.liger, compiled=fast.compile != "none")
        if grouped:
            use_grouped_experts(block)
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=shape.vocab_size,
            max_sequence_length=shape.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=shape.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=shape.rope_theta,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        _mark_routed_experts(model)
        if fast.compile == "layers":
            compile_decoder_layers(model, fast.activation_memory_budget)
        chunks.append(model)
    return chunks


def _mark_routed_experts(model: GPTModel) -> None:
    """Routed-expert weights count as expert-parallel in every layout, EP=1 included.

    megatron-core does so only when EP > 1 (or expert-TP differs from TP); then its optimizer
    chains a separate expert optimizer, so an optimizer checkpoint's structure would depend on
    EP and an EP2 checkpoint could not resume at EP1. At EP=1 the expert data-parallel group is
    the data-parallel group, so gradients are reduced exactly as before.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
