"""The optimizer phase of a training step, torch's fused AdamW against FlatAdamW (optim.flat_adam).

    python tools/bench_adam.py                                      # GPU: the 7B shape with 8 layers
    python tools/bench_adam.py --preset qwen2_1.5b --layers 0       # all layers
    python tools/bench_adam.py --device cpu --preset tiny --steps 2 --warmup 1

Why: run J's 7B-8L profile (tools/GPU_RESULTS.md) has torch's fused AdamW at 20.9 ms of a 244 ms
step, 2.95 B bf16 parameters and about 47 GB moved at 2.3 TB/s; inductor's element-wise kernels
reached 4.4 TB/s on that card. FlatAdamW makes one compiled pass per contiguous run of megatron's
gradient buffers instead.

Each way builds our model (megatron-core, one rank) with megatron's optimizer as the trainer does,
for each precision (pure bf16: bf16 weights and Adam states; master: fp32 master copies, megatron's
bf16 optimizer; both without the distributed optimizer), gives every parameter the same seeded
random gradient and times the trainer's optimizer phase (guarded_step: gradient norm, clipping
factor and skip decision on the device, AdamW, megatron's copies) over --steps steps after
--warmup. Printed per precision and way: milliseconds per step (median), the bytes an ideal AdamW
pass moves (read weight, gradient and both moments, write weight and moments) divided by that
time, and the largest difference of the weights from the fused way's after the same steps,
relative to the largest weight. One JSON line per precision with --json-out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = ("fused", "flat")
PRECISIONS = {"pure": False, "master": True}  # name -> fp32 master weights
AGREE = 1e-2  # after 10 steps of bf16 weights: a few roundings apart, far from a wrong update


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2_7b")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (0: the preset's)")
    parser.add_argument("--precisions", default="pure,master", help=f"comma-separated, of {list(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (FlatAdamW compiles in the first)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--summarize", type=Path, metavar="JSONL", help="print one line per record of a --json-out file")
    parser.add_argument("--pays", type=Path, metavar="JSONL",
                        help=f"exit 0 if the file's last record has FlatAdamW faster than torch's fused AdamW and its "
                             f"weights within {AGREE} of them (relative to the largest weight), else 1")
    return parser.parse_args(argv)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_way(shape: Any, runtime: Any, master: bool, flat: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Times guarded_step on one freshly built model; returns the timings and its final weights."""
    import torch

    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import build_optimizer, guarded_step

    torch.manual_seed(0)
    chunks = build_model(shape, runtime.layout, "bf16")
    model = wrap_ddp(chunks, fp32_grads=master)
    optim = OptimConfig(distributed_optimizer=False, fp32_master_weights=master, flat_adam=flat)
    optimizer = build_optimizer(optim, "bf16", model)
    params = [p for chunk in model for p in chunk.module.parameters()]
    gen = torch.Generator(device=runtime.device).manual_seed(1)
    for param in params:
        param.main_grad.copy_(torch.randn(param.shape, generator=gen, device=runtime.device))
    times = []
    for step in range(args.warmup + args.steps):
        _sync(runtime.device)
        start = time.perf_counter()
        stepped, _ = guarded_step(optimizer, clip_in_fused_adam=True)
        _sync(runtime.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        assert stepped, "the step was skipped"
    weights = torch.cat([p.detach().reshape(-1) for p in params])  # on the device, compared there
    numel = sum(p.numel() for p in params)
    del optimizer, model, chunks, params
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ms": 1e3 * statistics.median(times), "numel": numel, "weights": weights}


def summary_line(record: dict[str, Any]) -> str:
    fused, flat = record["fused"], record["flat"]
    return (f"adam {record['preset']} {record['layers']}L {record['precision']}: torch's fused AdamW {fused['ms']:.2f} ms "
            f"({fused['GB_per_s']:.0f} GB/s), FlatAdamW {flat['ms']:.2f} ms ({flat['GB_per_s']:.0f} GB/s), "
            f"x{fused['ms'] / flat['ms']:.2f}; weights vs fused {flat['max_rel_diff']:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        for line in args.summarize.read_text().splitlines():
            print(summary_line(json.loads(line)))
        return 0
    if args.pays is not None:
        lines = args.pays.read_text().splitlines() if args.pays.exists() else []
        last = json.loads(lines[-1]) if lines else None
        return 0 if last and last["flat"]["ms"] < last["fused"]["ms"] and last["flat"]["max_rel_diff"] < AGREE else 1
    import torch

    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    shape = get_preset(args.preset)
    if args.layers:
        shape = replace(shape, num_hidden_layers=args.layers)
    runtime = init_runtime(ParallelLayout())
    try:
        for name in args.precisions.split(","):
            master = PRECISIONS[name]
            results = {way: run_way(shape, runtime, master, way == "flat", args) for way in WAYS}
            # read weight, gradient and two moments, write weight and two moments: 7 tensors of the
            # stepped dtype (fp32 masters and gradients, or bf16 throughout)
            ideal = results["fused"]["numel"] * 7 * (4 if master else 2)
            reference = results["fused"]["weights"].float()
            largest = reference.abs().max().item()
            record = {"bench": "adam", "preset": args.preset, "layers": shape.num_hidden_layers, "precision": name,
                      "params": results["fused"]["numel"], "device": str(runtime.device)}
            for way, result in results.items():
                diff = (result["weights"].float() - reference).abs().max().item() / largest
                record[way] = {"ms": result["ms"], "GB_per_s": ideal / result["ms"] / 1e6, "max_rel_diff": diff}
            print(summary_line(record), flush=True)
            print(json.dumps(record), flush=True)
            if args.json_out is not None:
                with open(args.json_out, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
    finally:
        shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
