"""Routed experts as grouped GEMMs without Transformer Engine (train.moe_grouped_gemm).

megatron-core 0.19.2 runs the routed experts of an MoE layer as grouped GEMMs only through
Transformer Engine (TEGroupedMLP; the legacy GroupedMLP on the `grouped_gemm` package is gone).
Its local spec ignores config.moe_grouped_gemm and always builds SequentialMLP: a Python loop
with one MLP (two matmuls) per local expert. GroupedExperts replaces SequentialMLP in the MoE
layer spec (use_grouped_experts) and computes the same function with one
torch.nn.functional.grouped_mm per projection over all local experts, as transformers 5 does:
the CUTLASS grouped GEMM for bf16 on Hopper/Blackwell GPUs, a loop of matmuls elsewhere (CPU,
fp32). Shapes that grouped_mm cannot take (rows not 16-byte aligned) use a per-expert loop of
the same matmuls.

Parameters: linear_fc1.weight [local experts, 2 x ffn / expert-TP, hidden] (each expert's gate
rows then up rows, as SequentialMLP's linear_fc1 per expert) and linear_fc2.weight
[local experts, hidden, ffn / expert-TP]. sharded_state_dict() writes them under SequentialMLP's
checkpoint keys and global shapes (`...mlp.experts.experts.linear_fc1.weight`, [layers, experts,
2 x ffn, hidden] with all gate rows before all up rows), so model checkpoints and the distributed
optimizer's fully-reshardable state move freely between the two implementations and any
EP / expert-TP layout, as megatron's TEGroupedMLP checkpoints do.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class GroupedExperts(MegatronModule):
    """The local routed experts of one MoE layer; interface of megatron-core's SequentialMLP."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "gated_linear_unit=False": not config.gated_linear_unit,
            "add_bias_linear": config.add_bias_linear,
            "moe_latent_size": config.moe_latent_size is not None,
            "fp8/fp4": bool(config.fp8 or config.fp4),
            "use_te_activation_func": config.use_te_activation_func,
        }
        if any(unsupported.values()):
            raise ValueError(
                "train.moe_grouped_gemm supports gated experts without biases in bf16/fp32 "
                f"(Qwen2-MoE); this config sets {[k for k, v in unsupported.items() if v]}"
            )
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % tp_size:
            raise ValueError(f"moe_ffn_hidden_size={ffn} is not divisible by expert-TP={tp_size}")
        self.ffn_per_rank = ffn // tp_size
        h = config.hidden_size
        device = torch.device("cpu") if config.use_cpu_initialization else torch.device(
            "cuda", torch.cuda.current_device()
        )
        self.linear_fc1 = _ExpertWeights(num_local_experts, 2 * self.ffn_per_rank, h, config.params_dtype, device)
        self.linear_fc2 = _ExpertWeights(num_local_experts, h, self.ffn_per_rank, config.params_dtype, device)
        fc1, fc2 = self.linear_fc1.weight, self.linear_fc2.weight
        set_tensor_model_parallel_attributes(fc1, is_parallel=True, dim=1, stride=2)
        set_tensor_model_parallel_attributes(fc2, is_parallel=True, dim=2, stride=1)
        # As megatron's expert linears: reduced over the expert data-parallel group when the
        # experts are laid out differently from the dense layers (the builder marks all routed
        # experts so, EP=1 included).
        expert_groups = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        )
        for weight in (fc1, fc2):
            setattr(weight, "allreduce", not expert_groups)
        # SequentialMLP's checkpoints hold an (empty) _extra_state object per expert linear;
        # sharded_state_dict() writes them too, and loading drops them again.
        self._register_load_state_dict_pre_hook(_drop_extra_state)
        if config.perform_initialization:
            # Expert by expert in SequentialMLP's order (fc1, then fc2 of each expert), so a
            # model built with the same seed holds the same weights as with SequentialMLP.
            for e in range(num_local_experts):
                # (full shape, this rank's rows or columns, split dim, stride: gate and up halves)
                self._init(fc1.data[e], (2 * ffn, h), 2 * self.ffn_per_rank, 0, 2, config.init_method)
                self._init(fc2.data[e], (h, ffn), self.ffn_per_rank, 1, 1, config.output_layer_init_method)

    def _init(self, weight: Tensor, full: tuple[int, int], per_rank: int, dim: int, stride: int, init: Any) -> None:
        """As ColumnParallelLinear / RowParallelLinear initialise one expert's weight."""
        if self.config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                weight, *full, per_rank, dim, init, stride=stride, params_dtype=self.config.params_dtype,
                rank=self.tp_group.rank(), world_size=self.tp_group.size(), skip_set_tensor_parallel_attributes=True,
            )
        else:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init(weight)

    def forward(
        self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor
    ) -> tuple[Tensor, None]:
        """Tokens sorted by local expert ([tokens, hidden]) -> expert outputs, scaled by the
        router probabilities; the same operations as SequentialMLP's MLP per expert."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "moe_apply_probs_on_input needs moe_router_topk=1"
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = tokens_per_expert
        grouped = _grouped_mm_fits(x, self.ffn_per_rank)
        offsets = torch.cumsum(counts.to(device=x.device), 0, dtype=torch.int32) if grouped else None
        splits = None if grouped else counts.tolist()
        # Called, not read: their forward pre-hooks are where megatron's DDP waits for an
        # overlapped parameter all-gather (ddp.overlap_param_gather).
        fc1_weight, fc2_weight = self.linear_fc1(), self.linear_fc2()
        fc1 = _expert_linear(x, fc1_weight, offsets, splits)
        return _expert_linear(self.activation(fc1, probs), fc2_weight, offsets, splits), None

    def activation(self, fc1: Tensor, probs: Tensor) -> Tensor:
        """The gated activation of every routed token, scaled by its router probability."""
        if self.config.bias_activation_fusion and self.config.activation_func is F.silu:  # as MLP does
            return weighted_bias_swiglu_impl(fc1, None, probs.unsqueeze(-1), self.config.activation_func_fp8_input_store)
        gate, up = torch.chunk(fc1, 2, dim=-1)
        if (clamp := self.config.activation_func_clamp_value) is not None:
            gate = gate.clamp(min=None, max=clamp)
            up = up.clamp(min=-clamp, max=clamp)
        act = self.config.activation_func(gate) * (up + self.config.glu_linear_offset)
        return (act * probs.unsqueeze(-1)).to(act.dtype)

    def compile_activation(self) -> None:
        """Run activation() through torch.compile (train.compile=layers): inductor fuses its
        elementwise passes over the [routed tokens, 2 x ffn] projections into one."""
        self.activation = torch.compile(self.activation)

    def backward_dw(self) -> None:
        """Weight gradients are computed in backward (no delayed wgrad)."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """SequentialMLP's checkpoint keys and global shapes (see the module docstring)."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("train.moe_grouped_gemm checkpoints do not support singleton_local_shards")
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        replica_id = (0, 0, self.dp_group.rank())  # replicated over expert data parallel only
        axis = len(sharded_offsets)  # first axis after the prepended (layer) axes: experts
        experts = (axis, ep_rank, ep_size)

        def build_fc1(key: str, t: Tensor, replica: Any, flattened_range: slice | None) -> list[ShardedTensor]:
            if flattened_range is not None:
                raise NotImplementedError("flattened (fully_sharded_model_space) expert shards")
            gate, up = torch.chunk(t, 2, dim=1)
            return [
                ShardedTensor.from_rank_offsets(key, part, *sharded_offsets, experts, (axis + 1, rank, 2 * tp_size),
                                                replica_id=replica, prepend_axis_num=axis)
                for part, rank in ((gate, tp_rank), (up, tp_rank + tp_size))
            ]

        state: ShardedStateDict = {
            f"{prefix}linear_fc1.weight": ShardedTensorFactory(
                f"{prefix}experts.linear_fc1.weight", self.linear_fc1.weight, build_fc1,
                partial(torch.cat, dim=1), replica_id,
            ),
            f"{prefix}linear_fc2.weight": ShardedTensor.from_rank_offsets(
                f"{prefix}experts.linear_fc2.weight", self.linear_fc2.weight, *sharded_offsets, experts,
                (axis + 2, tp_rank, tp_size), replica_id=replica_id, prepend_axis_num=axis,
            ),
        }
        n = self.num_local_experts
        for e in range(n):
            expert = (*sharded_offsets, (axis, ep_rank * n + e, ep_size * n))
            for fc in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}{fc}._extra_state{e}"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{fc}._extra_state", expert, replica_id=(0, tp_rank, self.dp_group.rank())
                )
        return state


def _drop_extra_state(state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    extra = (f"{prefix}linear_fc1._extra_state", f"{prefix}linear_fc2._extra_state")
    for key in [k for k in state_dict if k.startswith(extra)]:
        del state_dict[key]


class _ExpertWeights(torch.nn.Module):
    """One projection of all local experts: weight [experts, out, in] (nn.Linear layout per expert)."""

    def __init__(self, experts: int, out: int, inp: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(experts, out, inp, dtype=dtype, device=device))

    def forward(self) -> Tensor:
        return self.weight


def _grouped_mm_fits(x: Tensor, ffn_per_rank: int) -> bool:
    """grouped_mm needs every operand's rows 16-byte aligned (forward and backward)."""
    align = 16 // x.element_size()
    return _GROUPED_MM is not None and x.shape[-1] % align == 0 and ffn_per_rank % align == 0


def _expert_linear(x: Tensor, weight: Tensor, offsets: Tensor | None, splits: list[int] | None) -> Tensor:
    """x [tokens sorted by expert, in] @ weight[e].T per expert -> [tokens, out]."""
    if offsets is not None:
        return _GroupedLinear.apply(x, weight, offsets)
    outputs = [F.linear(part, weight[e]) for e, part in enumerate(torch.split(x, splits))]
    return torch.cat(outputs) if outputs else x.new_zeros(0, weight.shape[1])


class _GroupedLinear(torch.autograd.Function):
    """grouped_mm with its backward spelled out: contiguous incoming gradients (grouped_mm
    rejects the expanded ones autograd may pass) and zero weight gradients without tokens."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offsets)
        if x.shape[0] == 0:
            return x.new_zeros(0, weight.shape[1])
        return _GROUPED_MM(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, offsets = ctx.saved_tensors
        if x.shape[0] == 0:
            return torch.zeros_like(x), torch.zeros_like(weight), None
        grad = grad.contiguous()
        grad_x = _GROUPED_MM(grad, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = _GROUPED_MM(grad.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def use_grouped_experts(block: TransformerBlockSubmodules) -> None:
    """Build the routed experts of every MoE layer of a (local-spec) block as GroupedExperts."""
    for layer in {id(spec): spec for spec in block.layer_specs}.values():
        mlp = layer.submodules.mlp
        subs = getattr(mlp, "keywords", {}).get("submodules")
        experts = getattr(subs, "experts", None)
        if experts is None:
            continue  # a dense layer
        if getattr(experts, "func", experts) is not SequentialMLP:
            raise ValueError(f"train.moe_grouped_gemm replaces SequentialMLP experts, found {experts}")
        layer.submodules.mlp = partial(
            mlp.func, *mlp.args, **{**mlp.keywords, "submodules": dataclasses.replace(subs, experts=GroupedExperts)}
        )
