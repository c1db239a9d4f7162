"""The table that maps Hugging Face Qwen2 / Qwen2-MoE tensors onto megatron-core parameters.

One declarative table serves both directions (import and export). Each row names a megatron
parameter (relative to its module), the Hugging Face tensors it is made of, and how it is fused
and split over tensor-parallel ranks:

- replicated: the same tensor on every TP rank (norms, router, shared-expert gate);
- column / row: split along dim 0 / dim 1 (the vocabulary of embeddings and output layer is a
  column split);
- qkv: Q, K and V interleaved per query group (each group's Q heads, then its K head, then its V
  head), then split by groups;
- gate_up: gate and up projections each split over TP, and each rank holds [gate_r; up_r].

Routed experts are either one parameter per expert (megatron's SequentialMLP:
mlp.experts.local_experts.N.linear_fc1.weight) or one stacked parameter per projection
(grouped_experts.GroupedExperts: mlp.experts.linear_fc1.weight [local experts, ...]); a stacked
parameter yields one mapping per expert, whose `index` selects the expert's slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from megatron.core import parallel_state
from torch import Tensor

from qwen2_megatron.model.shape import Qwen2Shape

Kind = Literal["replicated", "column", "row", "qkv", "gate_up"]


@dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter of this rank and where its values live in the HF checkpoint."""

    name: str  # megatron name within the model chunk
    param: Tensor
    hf_names: tuple[str, ...]
    kind: Kind
    tp_rank: int
    tp_size: int
    expert: bool  # split over the expert-TP group (routed experts) instead of the TP group
    index: int | None = None  # stacked (grouped) expert weights: this expert's slice of param

    def local(self, tensor: Tensor) -> Tensor:
        """This mapping's part of `tensor` (the parameter, or its gradient)."""
        return tensor if self.index is None else tensor[self.index]


_ATTENTION: tuple[tuple[str, tuple[str, ...], Kind], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
)
_DENSE_MLP: tuple[tuple[str, tuple[str, ...], Kind], ...] = (
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row"),
)
_MOE_SHARED: tuple[tuple[str, tuple[str, ...], Kind], ...] = (
    ("mlp.router.weight", ("mlp.gate.weight",), "replicated"),
    ("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), "gate_up"),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",), "row"),
    ("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",), "replicated"),
)
_EXPERT: tuple[tuple[str, tuple[str, ...], Kind], ...] = (
    ("linear_fc1.weight", ("gate_proj.weight", "up_proj.weight"), "gate_up"),
    ("linear_fc2.weight", ("down_proj.weight",), "row"),
)


def param_mappings(chunk: torch.nn.Module, shape: Qwen2Shape) -> Iterator[ParamMapping]:
    """Every parameter of one model chunk (a megatron GPTModel) with its HF source tensors.

    Yields in the module's parameter order, which is the same on all ranks of a TP group, so
    collective gathers can iterate it in lockstep.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    local_experts = shape.num_experts // parallel_state.get_expert_model_parallel_world_size()
    first_expert = parallel_state.get_expert_model_parallel_rank() * local_experts
    by_suffix = {row[0]: row for row in _ATTENTION + _DENSE_MLP + _MOE_SHARED}
    params = dict(chunk.named_parameters())
    for name, param in params.items():
        if name == "embedding.word_embeddings.weight":
            yield ParamMapping(name, param, ("model.embed_tokens.weight",), "column", tp_rank, tp_size, False)
        elif name == "output_layer.weight":
            source = "model.embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"
            yield ParamMapping(name, param, (source,), "column", tp_rank, tp_size, False)
        elif name == "decoder.final_layernorm.weight":
            yield ParamMapping(name, param, ("model.norm.weight",), "replicated", tp_rank, tp_size, False)
        elif name.startswith("decoder.layers."):
            _, _, local_layer, suffix = name.split(".", 3)
            layer = chunk.decoder.layers[int(local_layer)].layer_number - 1  # global, 0-based
            prefix = f"model.layers.{layer}."
            if suffix.startswith("mlp.experts.local_experts."):
                local_expert, expert_suffix = suffix[len("mlp.experts.local_experts.") :].split(".", 1)
                expert = first_expert + int(local_expert)
                _, hf, kind = next(row for row in _EXPERT if row[0] == expert_suffix)
                hf_names = tuple(f"{prefix}mlp.experts.{expert}.{n}" for n in hf)
                yield ParamMapping(name, param, hf_names, kind, etp_rank, etp_size, True)
            elif suffix.startswith("mlp.experts.linear_fc"):  # grouped: [local experts, ...]
                _, hf, kind = next(row for row in _EXPERT if row[0] == suffix[len("mlp.experts.") :])
                for local_expert in range(param.shape[0]):
                    expert = first_expert + local_expert
                    hf_names = tuple(f"{prefix}mlp.experts.{expert}.{n}" for n in hf)
                    yield ParamMapping(name, param, hf_names, kind, etp_rank, etp_size, True, local_expert)
            elif suffix in by_suffix:
                _, hf, kind = by_suffix[suffix]
                yield ParamMapping(name, param, tuple(prefix + n for n in hf), kind, tp_rank, tp_size, False)
            else:
                raise KeyError(f"no Hugging Face mapping for megatron parameter {name}")
        else:
            raise KeyError(f"no Hugging Face mapping for megatron parameter {name}")


def hf_tensor_shapes(shape: Qwen2Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this shape holds, with its shape."""
    h, d = shape.hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    ffn, expert_ffn, shared_ffn = (
        shape.intermediate_size, shape.moe_intermediate_size, shape.shared_expert_intermediate_size
    )
    layer_dims = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
        "mlp.gate.weight": (shape.num_experts, h), "mlp.shared_expert_gate.weight": (1, h),
        "mlp.shared_expert.gate_proj.weight": (shared_ffn, h),
        "mlp.shared_expert.up_proj.weight": (shared_ffn, h),
        "mlp.shared_expert.down_proj.weight": (h, shared_ffn),
    }
    expert_dims = {
        "gate_proj.weight": (expert_ffn, h), "up_proj.weight": (expert_ffn, h), "down_proj.weight": (h, expert_ffn),
    }
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    for layer, moe in enumerate(shape.moe_layer_pattern()):
        prefix = f"model.layers.{layer}."
        rows = _ATTENTION + (_MOE_SHARED if moe else _DENSE_MLP)
        shapes.update({prefix + n: layer_dims[n] for _, hf, _ in rows for n in hf})
        if moe:
            for expert in range(shape.num_experts):
                shapes.update({f"{prefix}mlp.experts.{expert}.{n}": dims for n, dims in expert_dims.items()})
    return shapes


def to_megatron(m: ParamMapping, hf: list[Tensor], shape: Qwen2Shape) -> Tensor:
    """This rank's shard of a megatron parameter from its (full) Hugging Face tensors."""
    r, n = m.tp_rank, m.tp_size
    if m.kind == "replicated":
        return hf[0]
    if m.kind == "column":
        return hf[0].chunk(n, dim=0)[r]
    if m.kind == "row":
        return hf[0].chunk(n, dim=1)[r]
    if m.kind == "qkv":
        return fuse_qkv(*hf, groups=shape.num_key_value_heads).chunk(n, dim=0)[r]
    gate, up = hf
    return torch.cat([gate.chunk(n, dim=0)[r], up.chunk(n, dim=0)[r]], dim=0)


def to_hf(m: ParamMapping, shards: list[Tensor], shape: Qwen2Shape) -> list[Tensor]:
    """The Hugging Face tensors of a megatron parameter from its shards on all TP ranks."""
    if m.kind == "replicated":
        return [shards[0]]
    if m.kind == "row":
        return [torch.cat(shards, dim=1)]
    if m.kind == "column":
        return [torch.cat(shards, dim=0)]
    if m.kind == "qkv":
        return list(
            split_qkv(torch.cat(shards, dim=0), shape.num_key_value_heads, shape.num_attention_heads)
        )
    halves = [s.chunk(2, dim=0) for s in shards]
    return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int) -> Tensor:
    """[q; k; v] (HF, head-major) -> megatron's per-group interleave [q_g..., k_g, v_g] x groups."""
    rest = q.shape[1:]
    head_dim = k.shape[0] // groups
    parts = [t.reshape(groups, -1, head_dim, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused: Tensor, groups: int, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    rest = fused.shape[1:]
    per_group = heads // groups
    grouped = fused.reshape(groups, per_group + 2, -1, *rest)
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return q, k, v
