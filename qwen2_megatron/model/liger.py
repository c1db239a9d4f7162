"""Liger kernels (the optional `liger-kernel` package, extra `fast`): fused Triton RMSNorm,
SwiGLU and RoPE for the local layer spec (train.liger_kernels; local_modules.py holds the modules
that call them, spec.py swaps those modules in).

Nothing here imports liger_kernel at module import: `available()` says whether it can be imported
and `runnable()` whether its kernels can run in this process (a CUDA device, or Triton's
interpreter, TRITON_INTERPRET=1, which the CPU tests use). Each wrapper takes and returns
megatron's layouts and computes the same function as the plain path it replaces.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache

import torch
from torch import Tensor

KERNELS = ("rms_norm", "swiglu", "rope")
# the kernels that also run inside compiled layers (train.compile=layers), as operators of their own;
# for the others inductor fuses the same arithmetic itself
WITH_COMPILED_LAYERS = ("swiglu",)
INSTALL_HINT = "pip install 'qwen2-megatron[fast]' (or liger-kernel)"


@cache
def available() -> bool:
    """liger-kernel is installed (checked without importing it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def interpreted() -> bool:
    """Triton runs kernels through its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runnable() -> bool:
    """Liger's Triton kernels can run here: a CUDA device, or the Triton interpreter."""
    return available() and (torch.cuda.is_available() or interpreted())


_notices: set[str] = set()


def notice(text: str) -> None:
    """Print a one-line notice once per process (on global rank 0 when distributed)."""
    if text in _notices:
        return
    _notices.add(text)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"qwen2-megatron: {text}", file=sys.stderr, flush=True)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / rms(x)) with the statistics in fp32 and the product in x's dtype.

    Liger's "llama" casting mode is Hugging Face's Qwen2RMSNorm (and our plain Qwen2RMSNorm);
    in_place=False leaves the incoming gradient untouched (megatron may hold it).
    """
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False, None)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for megatron's fused fc1 output [..., 2 * ffn] = [gate | up].

    Liger's fused gate-up kernels (one Triton program per row reads gate, up and the incoming
    gradient once and writes both halves of the gradient) run as an operator of their own
    (qwen2_megatron::swiglu, with its backward): torch.compile keeps it whole inside a compiled
    layer instead of tracing Liger's Python, so compiled layers can use it (train.compile=layers
    with train.liger_kernels=[swiglu]). There inductor would write that gradient as one masked
    concatenation kernel, twice the time of this one on an H200 (tools/GPU_RESULTS.md).
    """
    return torch.ops.qwen2_megatron.swiglu(gate_up)


@torch.library.custom_op("qwen2_megatron::swiglu", mutates_args=())
def _swiglu(gate_up: Tensor) -> Tensor:
    from liger_kernel.ops.swiglu import swiglu_fused_gate_up_forward

    return swiglu_fused_gate_up_forward(gate_up.contiguous())[1]


@_swiglu.register_fake
def _swiglu_shape(gate_up: Tensor) -> Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("qwen2_megatron::swiglu_backward", mutates_args=())
def _swiglu_backward(gate_up: Tensor, grad: Tensor) -> Tensor:
    from liger_kernel.ops.swiglu import swiglu_fused_gate_up_backward

    return swiglu_fused_gate_up_backward(gate_up.contiguous(), grad.contiguous()).view(gate_up.shape)


@_swiglu_backward.register_fake
def _swiglu_backward_shape(gate_up: Tensor, grad: Tensor) -> Tensor:
    return torch.empty_like(gate_up)


def _swiglu_save(ctx: object, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]


def _swiglu_grad(ctx: object, grad: Tensor) -> Tensor:
    (gate_up,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return _swiglu_backward(gate_up, grad)


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_save)


def rope(query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """megatron's non-interleaved RoPE of query [s, b, hq, d] and key [s, b, hk, d] in one kernel.

    freqs: megatron's RotaryEmbedding output [s, 1, 1, rot] (rot <= d; the first rot/2 entries
    repeat in the second half). cos/sin are taken in the activations' dtype, as megatron's
    unfused path does. Returns [s, b, h, d] views whose memory is [b, s, h, d] (what SDPA reads
    as [b, h, s, d] without a copy).
    """
    from liger_kernel.ops.rope import LigerRopeFunction

    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    cos, sin = torch.cos(angles).to(query.dtype), torch.sin(angles).to(query.dtype)
    # Liger takes [b, h, s, d] and rotates a [b, s, h, d] contiguous copy in place: make sure it
    # is a copy, never the caller's memory.
    q, k = (_bhsd_for_liger(t) for t in (query, key))
    q, k = LigerRopeFunction.apply(q, k, cos, sin)
    return q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3)


def _bhsd_for_liger(t: Tensor) -> Tensor:
    bhsd = t.permute(1, 2, 0, 3)
    return bhsd.clone() if bhsd.transpose(1, 2).is_contiguous() else bhsd
