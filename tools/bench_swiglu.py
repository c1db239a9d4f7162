"""SwiGLU forward + backward on megatron's fused fc1 output [tokens, 2 x ffn] = [gate | up], one way
per line: which implementation a compiled layer should use.

    python tools/bench_swiglu.py                                  # GPU: the 0.5B, 1.5B and 7B shapes
    python tools/bench_swiglu.py --device cpu --tokens 256 --shapes tiny

Why: in the H200 profile of the compiled 1.5B layer (tools/GPU_RESULTS.md) the backward of
megatron's SwiGLU took 0.72 ms per layer against 0.34 ms for transformers' kernel doing the same
arithmetic on separate gate and up tensors. inductor writes the gradient [d gate | d up] as one
pointwise concatenation kernel, each output element computing its own half behind masked loads.

Ways (each forward + backward of silu(gate) * up, from the same input and output gradient):
- megatron: torch.compile of megatron's glu (torch.chunk of the fused tensor), as compiled layers
  run it without Liger;
- separate: torch.compile of the same on separate, contiguous gate and up tensors (transformers'
  layout; not a drop-in, it needs two fc1 outputs): the kernel to match;
- liger: Liger's fused gate-up kernels through liger.swiglu (one Triton program per row reads gate,
  up and the gradient once and writes both halves; what compiled layers run with
  train.liger_kernels=[swiglu]), if liger-kernel is installed and runs;
- concat: the megatron way with inductor's pointwise cats off (each half written into its slice:
  ConcatKernel), where this torch has the option (max_complex_pointwise_cat_inputs, torch >= 2.12);
- interleaved: the megatron way on a [tokens, ffn, 2] layout (gate and up of a column side by side;
  would need fc1's rows interleaved).
Printed per way: milliseconds per forward + backward (median of --iters after --warmup), the
bytes an ideal pair of kernels moves divided by that time, and the largest difference of its
output and input gradient from the megatron way's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _megatron(x: Any) -> Any:
    import torch.nn.functional as F

    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * (up + 0.0)  # megatron's glu adds config.glu_linear_offset (0.0)


def _separate(gate: Any, up: Any) -> Any:
    import torch.nn.functional as F

    return F.silu(gate) * up


def _interleaved(x: Any) -> Any:
    import torch.nn.functional as F

    pairs = x.unflatten(-1, (-1, 2))
    return F.silu(pairs[..., 0]) * pairs[..., 1]


class Way:
    """One implementation: prepare() lays out the input (untimed), run() is the timed forward +
    backward, fused_grad() puts the input gradient back in the [gate | up] layout (untimed)."""

    def __init__(self, fn: Callable[..., Any], split: bool = False, interleave: bool = False) -> None:
        self.fn, self.split, self.interleave = fn, split, interleave

    def prepare(self, x: Any) -> list[Any]:
        import torch

        if self.split:
            return [t.contiguous() for t in x.chunk(2, dim=-1)]
        if self.interleave:
            return [torch.stack(x.chunk(2, dim=-1), dim=-1).flatten(-2)]
        return [x.clone()]

    def run(self, inputs: list[Any], g: Any) -> tuple[Any, list[Any]]:
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = self.fn(*leaves)
        y.backward(g)
        return y, [t.grad for t in leaves]

    def fused_grad(self, grads: list[Any]) -> Any:
        import torch

        if self.split:
            return torch.cat(grads, dim=-1)
        if self.interleave:
            pairs = grads[0].unflatten(-1, (-1, 2))
            return torch.cat([pairs[..., 0], pairs[..., 1]], dim=-1)
        return grads[0]


def ways(device: Any) -> dict[str, Way | str]:
    """name -> Way, or the reason it does not run here."""
    import torch
    from torch._inductor import config as inductor_config

    from qwen2_megatron.model import liger

    found: dict[str, Way | str] = {
        "megatron": Way(torch.compile(_megatron)),
        "separate": Way(torch.compile(_separate), split=True),
    }
    if liger.available() and (device.type == "cuda" or liger.interpreted()):
        found["liger"] = Way(liger.swiglu)
    else:
        found["liger"] = "liger-kernel is not installed or cannot run on this device"
    if hasattr(inductor_config, "max_complex_pointwise_cat_inputs"):
        options = {"max_pointwise_cat_inputs": 1, "max_complex_pointwise_cat_inputs": 1}
        found["concat"] = Way(torch.compile(_megatron, options=options))
    else:
        found["concat"] = f"torch {torch.__version__} has no inductor option to turn a 2-input pointwise cat off"
    found["interleaved"] = Way(torch.compile(_interleaved), interleave=True)
    return found


def measure(way: Way, x: Any, g: Any, warmup: int, iters: int, device: Any) -> tuple[float, Any, Any]:
    """Median milliseconds of way.run, and its output and [gate | up] input gradient."""
    import torch

    inputs = way.prepare(x)
    for _ in range(warmup):
        y, grads = way.run(inputs, g)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y, grads = way.run(inputs, g)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            y, grads = way.run(inputs, g)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), y, way.fused_grad(grads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen2_0.5b,qwen2_1.5b,qwen2_7b", help="presets (their ffn size)")
    p.add_argument("--tokens", type=int, default=16384, help="rows (micro-batch x sequence)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from qwen2_megatron.model.presets import get_preset

    device = torch.device(args.device)
    dtype = torch.bfloat16
    found = ways(device)
    records = []
    for name in args.shapes.split(","):
        ffn = get_preset(name).intermediate_size
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.tokens, 2 * ffn, device=device, dtype=dtype, generator=gen)
        g = torch.randn(args.tokens, ffn, device=device, dtype=dtype, generator=gen)
        # what an ideal forward + backward moves: forward reads gate and up and writes the output;
        # backward reads gate, up and the output gradient and writes both input gradients
        ideal = args.tokens * ffn * x.element_size() * (3 + 5)
        print(f"{name}: [{args.tokens}, 2 x {ffn}] bf16, ideal traffic {ideal / 1e9:.2f} GB", flush=True)
        reference = None
        for way_name, way in found.items():
            if isinstance(way, str):
                print(f"  {way_name:12s} n/a: {way}")
                records.append({"shape": name, "way": way_name, "skipped": way})
                continue
            ms, y, grad = measure(way, x, g, args.warmup, args.iters, device)
            if reference is None:
                reference = (y.float(), grad.float())
            diff = max((y.float() - reference[0]).abs().max().item(), (grad.float() - reference[1]).abs().max().item())
            rate = ideal / (ms * 1e-3) / 1e12
            print(f"  {way_name:12s} {ms:8.3f} ms   {rate:6.2f} TB/s   max |diff| {diff:.3g}", flush=True)
            records.append({"shape": name, "way": way_name, "ms": ms, "tb_per_s": rate, "max_diff": diff})
            del y, grad
    line = json.dumps({"bench": "swiglu", "tokens": args.tokens, "torch": torch.__version__, "records": records})
    print(line)
    if args.json_out:
        with args.json_out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
