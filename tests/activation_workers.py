"""Rank function for tests/test_saved_activations.py: what one decoder layer saves for its backward.

One bf16 layer of a small Qwen2 shape, eager and compiled at activation-memory budgets; each
forward runs under torch.autograd's saved-tensor hooks, which see every tensor autograd keeps
(a compiled graph's saved activations included). Reported per variant: the distinct storages
kept (parameters and the layer input excluded) with their bytes, the output and the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HIDDEN, FFN, HEADS, GROUPS, TOKENS = 64, 176, 4, 1, 64  # fused QKV: 96 columns, a size nothing else has


def _saved_storages(layer: torch.nn.Module, x: Tensor, freqs: Tensor) -> tuple[dict[int, tuple], Tensor]:
    """storage address -> (its bytes, the shape of a saved tensor over it)"""
    saved: dict[int, tuple] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, attention_mask=None, rotary_pos_emb=freqs)[0]
    for t in (*layer.parameters(), x, freqs):
        saved.pop(t.untyped_storage().data_ptr(), None)
    return saved, out


def activations_rank(variants: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """variants: name -> (compile mode, activation memory budget)."""
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.fast_paths import FastPaths
    from qwen2_megatron.model.shape import Qwen2Shape
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    shape = Qwen2Shape(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                       num_key_value_heads=GROUPS, vocab_size=96, max_position_embeddings=TOKENS)
    runtime = init_runtime(ParallelLayout())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(TOKENS, 1, HIDDEN, generator=gen).bfloat16()
    grad_out = torch.randn(TOKENS, 1, HIDDEN, generator=gen).bfloat16()
    weights = None
    results: dict[str, Any] = {}
    for name, (mode, budget) in variants.items():
        torch._dynamo.reset()
        chunk = build_model(shape, runtime.layout, "bf16", fast=FastPaths((), mode, budget))[0]
        if weights is None:
            weights = {k: v.clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
        chunk.load_state_dict(weights, strict=False)
        layer, freqs = chunk.decoder.layers[0], chunk.rotary_pos_emb(TOKENS)
        for _ in range(2):  # the second call runs the compiled graph as training does
            x = x0.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            saved, out = _saved_storages(layer, x, freqs)
            out.backward(grad_out)
        results[name] = {
            "saved": sorted(saved.values(), reverse=True), "out": out.detach().float(),
            "grads": {"input": x.grad.float(), **{n: p.grad.float() for n, p in layer.named_parameters()}},
        }
    shutdown_runtime()
    return results
