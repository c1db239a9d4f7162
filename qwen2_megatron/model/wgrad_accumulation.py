"""Weight gradients accumulated straight into megatron's fp32 main_grad buffers, without apex.

megatron-core's local linear layers compute each weight gradient as a separate bf16 tensor that
DDP's backward hook then adds to the fp32 main_grad buffer (one extra read and write of every
weight gradient, and the gradient rounded to bf16 first). With config.gradient_accumulation_fusion
the layer instead calls apex's fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32, a GEMM
that accumulates in place into main_grad. Without apex that module is missing and megatron
refuses the flag; this module gives megatron the same two functions written with torch's own
GEMMs (on CUDA an fp32-output addmm of the bf16 operands, cuBLAS accumulating in fp32;
elsewhere the operands are widened to fp32 first, the same arithmetic), installed where megatron
looks for apex's module (megatron.core.tensor_parallel.layers). apex's module, where installed,
is kept. Selected by train.grad_accum_fusion; for compiled layers see below.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import layers


class TorchWgradGemm:
    """apex's fused_weight_gradient_mlp_cuda interface: main_grad += grad_output^T @ total_input
    for 2-D total_input [tokens, in] and grad_output [tokens, out], main_grad [out, in]."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if main_grad.is_cuda and total_input.dtype != torch.float32:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
        else:
            main_grad.addmm_(grad_output.t().float(), total_input.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        main_grad.addmm_(grad_output.t(), total_input)


def enable_wgrad_accumulation_fusion() -> None:
    """Let megatron's local linear layers accept gradient_accumulation_fusion=True (idempotent)."""
    if getattr(layers, "fused_weight_gradient_mlp_cuda", TorchWgradGemm) is TorchWgradGemm:
        layers.fused_weight_gradient_mlp_cuda = TorchWgradGemm
        layers._grad_accum_fusion_available = True


# ----- compiled layers ----------------------------------------------------------------------------
# megatron's linear autograd function reads weight.main_grad inside its backward, which dynamo
# cannot trace (a side effect on a tensor attribute): with train.compile=layers each compiled
# layer was split at its linear layers. The linears of compiled layers (spec.py) instead pass
# main_grad into their autograd function as an input and add into it with an operator that
# declares the mutation, which AOTAutograd keeps in the compiled backward. Their weights keep
# grad_added_to_main_grad set (keep_wgrad_flags, after each zero_grad_buffer), as megatron does
# for its CUDA graphs: the compiled backward cannot set it, and DDP's hook must not add the dummy
# gradient the function returns for the weight.


@torch.library.custom_op("qwen2_megatron::wgrad_accumulate", mutates_args=("main_grad",))
def wgrad_accumulate(main_grad: torch.Tensor, total_input: torch.Tensor, grad_output: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input ([tokens, out] and [tokens, in] -> [out, in])."""
    if main_grad.dtype == total_input.dtype:
        TorchWgradGemm.wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)
    else:
        TorchWgradGemm.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)


@wgrad_accumulate.register_fake
def _wgrad_accumulate_shape(main_grad: torch.Tensor, total_input: torch.Tensor, grad_output: torch.Tensor) -> None:
    return None


class LinearIntoMainGrad(torch.autograd.Function):
    """y = x @ weight^T (+ bias) whose weight gradient is added into main_grad in backward; the
    weight's own gradient is an uninitialised dummy (megatron's convention with
    gradient_accumulation_fusion: DDP's hook sees grad_added_to_main_grad and drops it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                main_grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # not saved (a view of DDP's whole buffer: other weights' accumulation bumps its version)
        ctx.main_grad = main_grad
        ctx.with_bias = bias is not None
        y = torch.matmul(x, weight.t())
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        main_grad = ctx.main_grad
        grad_input = torch.matmul(grad_output, weight)
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        wgrad_accumulate(main_grad, x.reshape(-1, x.shape[-1]), rows)
        grad_bias = rows.sum(dim=0) if ctx.with_bias else None
        return grad_input, torch.empty_like(weight), grad_bias, None


class _IntoMainGrad:
    """The linear's _forward_impl: LinearIntoMainGrad where it applies (gradient accumulation
    fusion, a weight with a main_grad, no tensor-parallel communication), megatron's otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight.wgrad_into_main_grad = self.gradient_accumulation_fusion

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (kwargs.get("gradient_accumulation_fusion") and not kwargs.get("allreduce_dgrad")
                and not kwargs.get("sequence_parallel") and weight.requires_grad and hasattr(weight, "main_grad")):
            return LinearIntoMainGrad.apply(input, weight, kwargs.get("bias"), weight.main_grad)
        return super()._forward_impl(input, weight, *args, **kwargs)


class CompiledColumnParallelLinear(_IntoMainGrad, layers.ColumnParallelLinear):
    """megatron's ColumnParallelLinear whose weight-gradient accumulation stays inside a compiled graph."""


class CompiledRowParallelLinear(_IntoMainGrad, layers.RowParallelLinear):
    """megatron's RowParallelLinear whose weight-gradient accumulation stays inside a compiled graph."""


def keep_wgrad_flags(ddp: Any) -> None:
    """After each zero_grad_buffer of this megatron DDP wrapper (which clears every weight's
    grad_added_to_main_grad), set it again on the weights of the compiled linears above."""
    weights = [p for p in ddp.module.parameters() if getattr(p, "wgrad_into_main_grad", False)]
    if not weights:
        return
    zero_grad_buffer = ddp.zero_grad_buffer

    def zero_and_flag() -> None:
        zero_grad_buffer()
        for weight in weights:
            weight.grad_added_to_main_grad = True

    ddp.zero_grad_buffer = zero_and_flag
    zero_and_flag()
