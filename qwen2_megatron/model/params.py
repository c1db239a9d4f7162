"""Parameter counts and per-rank memory, by arithmetic: nothing is allocated.

Lets a user size a run (qwen2-model-info) for a 72B model on a laptop, and lets the tests compare
preset shapes with the Qwen2 report without building the models.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters, grouped by how megatron-core shards them."""

    tensor_parallel: int  # split over TP: attention projections, dense MLP, shared expert
    replicated: int  # whole on every TP rank: norms, router, shared-expert gate
    expert: int  # routed experts: split over EP x expert-TP

    @property
    def total(self) -> int:
        return self.tensor_parallel + self.replicated + self.expert


def layer_params(shape: Qwen2Shape, moe: bool) -> LayerParams:
    h, d = shape.hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    attention = h * q + q + 2 * (h * kv + kv) + q * h  # Q/K/V with bias, O without
    norms = 2 * h
    if not moe:
        return LayerParams(attention + 3 * h * shape.intermediate_size, norms, 0)
    shared = 3 * h * shape.shared_expert_intermediate_size
    router_and_gate = shape.num_experts * h + h
    experts = shape.num_experts * 3 * h * shape.moe_intermediate_size
    return LayerParams(attention + shared, norms + router_and_gate, experts)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # input embedding table (+ output layer when untied)
    active: int  # used per token: all for dense, shared + top-k experts for MoE

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(shape: Qwen2Shape) -> ParamCounts:
    """Total, embedding and per-token-active parameter counts of the full model."""
    table = shape.vocab_size * shape.hidden_size
    embedding = table if shape.tie_word_embeddings else 2 * table
    total = embedding + shape.hidden_size  # final norm
    inactive = 0
    for moe in shape.moe_layer_pattern():
        layer = layer_params(shape, moe)
        total += layer.total
        if moe:
            unused = shape.num_experts - shape.num_experts_per_tok
            inactive += unused * 3 * shape.hidden_size * shape.moe_intermediate_size
    return ParamCounts(total=total, embedding=embedding, active=total - inactive)


@dataclass(frozen=True)
class RankMemory:
    """Parameters and training-state bytes of the most loaded rank of a layout."""

    params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def rank_memory(
    shape: Qwen2Shape,
    layout: ParallelLayout,
    param_bytes: int = 2,
    distributed_optimizer: bool = True,
    fp32_master_weights: bool = True,
) -> RankMemory:
    """Memory of weights, gradients and Adam state (master weights, m and v) per rank.

    param_bytes is 2 for bf16 training and 4 for fp32. With fp32_master_weights (the default),
    gradients are fp32 and a bf16 run's optimizer keeps fp32 master weights and states; without
    (optim.fp32_master_weights=false: pure bf16), gradients and Adam's m and v have the weights'
    dtype and there is no master copy. With the distributed optimizer, optimizer state is split
    over the data parallel ranks (dense) or the expert-data-parallel ranks (experts). Activations
    are excluded: they depend on micro-batch, sequence length and recomputation.
    """
    if layout.dp is None:
        raise ValueError("resolve the layout (layout.resolve(world_size)) before sizing memory")
    tp, ep, etp = layout.tp, layout.ep, layout.expert_tp
    dense_dp = layout.dp * layout.cp
    expert_dp = layout.tp * layout.cp * layout.dp // (ep * etp)
    if fp32_master_weights:
        grad_bytes, state_bytes = 4, 8 + (4 if param_bytes < 4 else 0)  # Adam m, v (+ fp32 master weights)
    else:
        grad_bytes, state_bytes = param_bytes, 2 * param_bytes
    layers_per_stage = shape.num_hidden_layers // layout.pp
    pattern = shape.moe_layer_pattern()
    table = shape.vocab_size * shape.hidden_size // tp
    best: tuple[int, float] = (0, 0.0)
    for stage in range(layout.pp):
        dense, experts = 0, 0
        for moe in pattern[stage * layers_per_stage : (stage + 1) * layers_per_stage]:
            layer = layer_params(shape, moe)
            dense += layer.tensor_parallel // tp + layer.replicated
            experts += layer.expert // (ep * etp)
        if stage == 0:
            dense += table
        if stage == layout.pp - 1:
            dense += shape.hidden_size  # final norm
            if not shape.tie_word_embeddings or layout.pp > 1:
                dense += table  # output layer (a tied copy lives on the last stage)
        shard = dense / dense_dp + experts / expert_dp if distributed_optimizer else dense + experts
        if dense + experts > best[0]:
            best = (dense + experts, shard)
    params, optimizer_params = best
    return RankMemory(
        params=params,
        weight_bytes=params * param_bytes,
        grad_bytes=params * grad_bytes,
        optimizer_bytes=int(optimizer_params * state_bytes),
    )


def training_flops_per_token(shape: Qwen2Shape, seq_length: int) -> float:
    """Model FLOPs per trained token: 6 N + 12 L d s (PaLM / torchtitan convention).

    N counts the active non-embedding parameters plus the output (LM head) matrix; attention is
    counted as non-causal (../shared/reference/performance.md).
    """
    counts = count_parameters(shape)
    table = shape.vocab_size * shape.hidden_size
    n = counts.active - (0 if shape.tie_word_embeddings else table)
    attention = 12 * shape.num_hidden_layers * shape.num_attention_heads * shape.kv_channels * seq_length
    return 6 * n + attention
