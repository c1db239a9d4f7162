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
is kept. Selected by train.grad_accum_fusion.
"""

from __future__ import annotations

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
