"""model/wgrad_accumulation.py: the torch stand-in for apex's fused weight-gradient accumulation
adds grad_output^T @ input into main_grad with fp32 arithmetic, and is installed only where apex's
module is missing (CPU, no processes; the training runs with it are in test_perf_levers.py)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import layers

from qwen2_megatron.model.wgrad_accumulation import TorchWgradGemm, enable_wgrad_accumulation_fusion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_accumulation_adds_the_exact_product(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    total_input, grad_output = torch.randn(40, 24, generator=gen), torch.randn(40, 16, generator=gen)
    main_grad = torch.randn(16, 24, generator=gen)
    expected = main_grad + grad_output.to(dtype).double().t().matmul(total_input.to(dtype).double()).float()
    TorchWgradGemm.wgrad_gemm_accum_fp32(total_input.to(dtype), grad_output.to(dtype), main_grad)
    assert main_grad.dtype == torch.float32
    torch.testing.assert_close(main_grad, expected, rtol=1e-6, atol=1e-5)


def test_half_accumulation_in_the_buffer_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    total_input, grad_output = torch.randn(8, 6, generator=gen).bfloat16(), torch.randn(8, 4, generator=gen).bfloat16()
    main_grad = torch.randn(4, 6, generator=gen).bfloat16()
    expected = main_grad.clone().addmm_(grad_output.t(), total_input)
    TorchWgradGemm.wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)
    assert torch.equal(main_grad, expected)


def test_installed_only_where_apex_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(layers, "fused_weight_gradient_mlp_cuda", raising=False)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    enable_wgrad_accumulation_fusion()
    enable_wgrad_accumulation_fusion()  # idempotent
    assert layers.fused_weight_gradient_mlp_cuda is TorchWgradGemm and layers._grad_accum_fusion_available
    apex_module = object()  # stands for apex's fused_weight_gradient_mlp_cuda
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex_module)
    enable_wgrad_accumulation_fusion()
    assert layers.fused_weight_gradient_mlp_cuda is apex_module
