"""Checkpoint save throughput versus the raw write speed of the same disk.

    python tools/bench_checkpoint.py [--dir /path/on/the/storage] [--layers 8] [--nproc 2]

Builds a Qwen2-0.5B-shaped model (fewer layers to fit a laptop) with megatron DDP and the
distributed optimizer on `nproc` local ranks, takes one optimizer step so Adam's state exists,
then times full training checkpoints (model + optimizer, torch_dist, fsync'd, published
atomically) and a plain sequential write of the same number of bytes with fsync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds for one sequential write of nbytes (8 MiB blocks) followed by fsync."""
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def save_rank(directory: str, layers: int, repeats: int) -> list[float]:
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.manager import CheckpointConfig, CheckpointManager
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import build_optimizer

    shape = replace(get_preset("qwen2_0.5b"), num_hidden_layers=layers)
    runtime = init_runtime(ParallelLayout())
    try:
        chunks = wrap_ddp(build_model(shape, runtime.layout), use_distributed_optimizer=True)
        optimizer = build_optimizer(OptimConfig(), "fp32", chunks)
        for chunk in chunks:
            for param in chunk.parameters():
                param.main_grad.fill_(1e-3)
        optimizer.step()
        manager = CheckpointManager(
            CheckpointConfig(dir=directory, keep_last=1), shape, runtime.layout, "fp32"
        )
        times = []
        for step in range(1, repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            manager.save(step, [c.module for c in chunks], optimizer, {"step": step})
            times.append(time.perf_counter() - start)
        return times
    finally:
        shutdown_runtime()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from qwen2_megatron.parallel.local_launch import spawn

    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        times = spawn(save_rank, args.nproc, str(work / "ckpt"), args.layers, args.repeats)[0]
        checkpoint = next((work / "ckpt").glob("step_*"))
        nbytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        save_s = min(times)
        raw_s = min(raw_write(work / "raw.bin", nbytes) for _ in range(args.repeats))
        print(f"checkpoint size       {nbytes / 2**30:.2f} GiB ({args.layers}-layer Qwen2-0.5B shape, "
              f"model + Adam, {args.nproc} ranks)")
        print(f"checkpoint save       {save_s:.2f} s  -> {nbytes / save_s / 1e9:.2f} GB/s (best of {args.repeats})")
        print(f"raw write + fsync     {raw_s:.2f} s  -> {nbytes / raw_s / 1e9:.2f} GB/s (best of {args.repeats})")
        print(f"ratio                 {raw_s / save_s:.2f}x of the raw write speed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
