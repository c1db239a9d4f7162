"""Optional fast paths of the local layer spec, chosen by train.liger_kernels and train.compile.

- Liger kernels (liger.py, the optional `liger-kernel` package): fused RMSNorm, SwiGLU and RoPE
  modules swapped into the layer spec (spec.py), each computing the plain path's function.
- torch.compile of the decoder layers ("layers"): each dense TransformerLayer is compiled
  (nn.Module.compile, so parameter and checkpoint names do not change); inductor fuses the norms,
  SwiGLU, RoPE and residual adds around the matmuls and attention. An MoE layer is compiled in
  parts (compile_moe_layer): its token dispatch is data-dependent and megatron's router breaks
  graphs, so those stay eager. The embedding, output layer and loss are not compiled.

Both are for megatron-core's local layers: with Transformer Engine's layers (TE installed and a
GPU) they are skipped with a notice. Without a GPU (and outside Triton's interpreter) the Liger
kernels cannot run and are skipped with a notice; torch.compile runs on CPU too (inductor's C++
backend), which is how the tests check it. The two are alternatives except for Liger's SwiGLU,
which runs inside a compiled layer as an operator of its own (inductor's own SwiGLU backward on
megatron's fused [gate | up] layout is the slow part there: liger.swiglu); compiled layers need
tensor parallel size 1 and recompute none or full (compile_decoder_layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from qwen2_megatron.model import liger
from qwen2_megatron.model.grouped_experts import GroupedExperts

COMPILE_MODES = ("none", "layers")


@dataclass(frozen=True)
class FastPaths:
    liger: tuple[str, ...] = ()  # subset of liger.KERNELS
    compile: str = "none"  # one of COMPILE_MODES
    activation_memory_budget: float = 1.0  # compiled layers: compile_decoder_layers

    def __post_init__(self) -> None:
        unknown = sorted(set(self.liger) - set(liger.KERNELS))
        if unknown:
            raise ValueError(f"liger kernels {unknown}: choose from {list(liger.KERNELS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r}: choose one of {list(COMPILE_MODES)}")
        if not 0 < self.activation_memory_budget <= 1:
            raise ValueError(f"activation_memory_budget={self.activation_memory_budget}: a fraction in (0, 1]")
        if self.compile != "none" and (apart := sorted(set(self.liger) - set(liger.WITH_COMPILED_LAYERS))):
            # inductor generates its own fused kernels for these; Liger's SwiGLU runs inside the
            # compiled graph as an operator of its own (liger.swiglu)
            raise ValueError(f"Liger kernels {apart} and compiled layers are alternatives: choose one")

    def resolve(self, te: bool) -> FastPaths:
        """The fast paths that apply to a model built with (te) or without Transformer Engine layers.

        Explicitly requested Liger kernels without the package are an error; the rest falls back
        to the plain path with a one-line notice.
        """
        kernels = self.liger
        if kernels and not liger.available():
            raise RuntimeError(f"Liger kernels {list(kernels)} were requested but liger-kernel is not installed: "
                               f"{liger.INSTALL_HINT}")
        if te and (kernels or self.compile != "none"):
            liger.notice("Transformer Engine layers are in use; train.liger_kernels / train.compile "
                         "(fast paths of the local layer spec) are ignored")
            return FastPaths()
        if kernels and not liger.runnable():
            liger.notice(f"Liger kernels {list(kernels)} need a CUDA device; using the plain PyTorch path")
            kernels = ()
        return FastPaths(tuple(kernels), self.compile, self.activation_memory_budget)


def compile_decoder_layers(model: torch.nn.Module, activation_memory_budget: float = 1.0) -> int:
    """torch.compile every decoder layer of a GPTModel in place (MoE layers in parts); returns how many.

    activation_memory_budget: torch's partitioner knob (torch._functorch.config, process-wide, read
    when a graph compiles): the share of the activations a compiled graph keeps for its backward,
    relative to its default choice (1) and to recomputing everything (0). With torch's FLOP-based
    estimate an element-wise op costs nothing to recompute, so any budget from about 0.7 to 0.99
    recomputes exactly the layers' element-wise results in backward (the normalised inputs of the
    QKV and fc1 projections and the SwiGLU output: a third of a dense Qwen2 layer's saved bytes,
    measured on CPU); lower budgets also recompute matrix products and attention.

    Supported where the compiled graph of a layer is whole: tensor parallel size 1 (the
    asynchronous collectives in the backward of megatron's tensor-parallel linears break it) and
    no selective recompute (megatron's attention checkpoint breaks it); full recompute compiles
    a no-grad and a grad graph. Both unsupported cases compute correctly but gain little, and are
    refused.
    """
    config = model.config
    if config.tensor_model_parallel_size > 1:
        raise ValueError(f"compiled layers need tensor parallel size 1, not {config.tensor_model_parallel_size}")
    if config.recompute_granularity == "selective":
        raise ValueError("compiled layers do not combine with selective recompute")
    _trace_friendly_megatron()
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    for layer in model.decoder.layers:
        if getattr(layer, "is_moe_layer", False):
            compile_moe_layer(layer)
        else:
            layer.compile()
    return len(model.decoder.layers)


def compile_moe_layer(layer: torch.nn.Module) -> None:
    """torch.compile the dense parts of an MoE TransformerLayer in place, each its own graph.

    Compiled: the attention block (input norm, attention, residual add), the pre-MLP norm, the
    shared expert (its SwiGLU and sigmoid gate) and, with GroupedExperts (train.moe_grouped_gemm),
    the routed experts' activation: together the elementwise passes over the layer's largest
    activations. Eager: the router (its aux-loss scaler and device lookups break graphs), the
    token permutation (data-dependent sizes) and the expert GEMMs. Under expert parallelism the
    number of routed tokens changes with every micro-batch: dynamo compiles the activation once
    more, with that size dynamic.
    """
    layer._forward_attention = torch.compile(layer._forward_attention)
    layer._forward_pre_mlp_layernorm = torch.compile(layer._forward_pre_mlp_layernorm)
    shared = getattr(layer.mlp, "shared_experts", None)
    if shared is not None:
        shared.compile()
    if isinstance(layer.mlp.experts, GroupedExperts):
        layer.mlp.experts.compile_activation()


_patched = False


def _trace_friendly_megatron() -> None:
    """Remove the one graph break megatron-core 0.19 puts into every layer.

    RowParallelLinear passes tp_group=None to linear_with_grad_accumulation_and_async_allreduce,
    whose get_tensor_model_parallel_group_if_none then issues a DeprecationWarning (and resolves
    the default TP group). warnings.warn cannot be traced: dynamo breaks the graph inside an
    activation-offloading context manager and runs the rest of the attention block eagerly.
    While compiling, resolve the group without the warning; eager calls are unchanged.
    """
    global _patched
    if _patched:
        return
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none

    def group_if_none(tp_group=None, is_expert=False, check_initialized=True):
        if tp_group is None and torch.compiler.is_compiling():
            if is_expert:
                return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
            return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = group_if_none
    _patched = True
