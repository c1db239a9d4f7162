"""What one decoder layer keeps for its backward, per token: eager and compiled layers, at
train.activation_memory_budget values (bf16, on CPU or the GPU).

    python tools/saved_activations.py --preset qwen2_7b --tokens 256 --budgets 1,0.9

One layer of the preset's shape runs forward under torch.autograd's saved-tensor hooks, which see
every tensor autograd keeps (a compiled graph's saved activations included), then backward; the
second call of each variant is measured (the first compiles). Printed per variant: the bytes of
the distinct storages kept (parameters, the layer input and the rotary angles excluded) per token,
and the largest of them with the shape of a tensor saved over each. tests/test_saved_activations.py
runs the same measurement at a small shape.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor


def saved_storages(layer: torch.nn.Module, x: Tensor, freqs: Tensor) -> tuple[dict[int, tuple], Tensor]:
    """One forward of `layer`: storage address -> (its bytes, the shape of a saved tensor over it)."""
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


def measure(shape: Any, variants: dict[str, tuple[str, float]], tokens: int) -> dict[str, Any]:
    """Rank function (one rank): variants name -> (train.compile, activation memory budget).
    Per variant the saved storages (bytes, shape; largest first), the output and the gradients,
    all variants from the same weights and inputs."""
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.fast_paths import FastPaths
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    shape = replace(shape, num_hidden_layers=1, max_position_embeddings=max(shape.max_position_embeddings, tokens))
    runtime = init_runtime(ParallelLayout())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, 1, shape.hidden_size, generator=gen).bfloat16().to(runtime.device)
    grad_out = torch.randn(tokens, 1, shape.hidden_size, generator=gen).bfloat16().to(runtime.device)
    weights = None
    results: dict[str, Any] = {}
    for name, (mode, budget) in variants.items():
        torch._dynamo.reset()
        chunk = build_model(shape, runtime.layout, "bf16", fast=FastPaths((), mode, budget))[0]
        if weights is None:
            weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in chunk.state_dict().items()}
        chunk.load_state_dict(weights, strict=True)
        layer, freqs = chunk.decoder.layers[0], chunk.rotary_pos_emb(tokens)
        for _ in range(2):  # the second call runs the compiled graph as training does
            x = x0.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            saved, out = saved_storages(layer, x, freqs)
            out.backward(grad_out)
        results[name] = {
            "saved": sorted(saved.values(), reverse=True), "out": out.detach().float().cpu(),
            "grads": {"input": x.grad.float().cpu(), **{n: p.grad.float().cpu() for n, p in layer.named_parameters()}},
        }
    shutdown_runtime()
    return results


def main(argv: list[str] | None = None) -> int:
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.local_launch import spawn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2_7b")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--budgets", default="1,0.9", help="train.activation_memory_budget values of the compiled layers")
    args = p.parse_args(argv)
    variants = {"eager": ("none", 1.0)}
    variants |= {f"compiled, budget {b}": ("layers", float(b)) for b in args.budgets.split(",")}
    results = spawn(measure, 1, get_preset(args.preset), variants, args.tokens)[0]
    print(f"{args.preset}, one layer, bf16, {args.tokens} tokens: bytes kept for backward per token")
    for name, result in results.items():
        saved = result["saved"]
        largest = ", ".join(f"{nbytes / args.tokens:,.0f} {list(shape)}" for nbytes, shape in saved[:6])
        print(f"{name:24s} {sum(n for n, _ in saved) / args.tokens:>10,.0f}   largest: {largest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
