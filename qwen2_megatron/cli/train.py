"""qwen2-train: the main job. Until the Hydra trainer lands (issue 4) it runs the embedded smoke
training: the tiny Qwen2 on local processes (gloo on CPU), megatron-core DDP and Adam, a fixed
batch of random token ids memorised for a few steps, so the loss must fall.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qwen2_megatron.cli.common import add_layout_args, fail, layout_from_args
from qwen2_megatron.model.presets import PRESETS, get_preset
from qwen2_megatron.parallel.layout import LayoutError, ParallelLayout


def smoke_rank(model: str, layout: ParallelLayout, steps: int, seq: int, lr: float) -> list[float]:
    """Train `steps` steps on one fixed batch; returns the losses (last pipeline stage only)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    shape = get_preset(model)
    runtime = init_runtime(layout)
    try:
        chunks = wrap_ddp(build_model(shape, runtime.layout))
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0), chunks
        )
        dp_rank = parallel_state.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(1000 + dp_rank)
        tokens = torch.randint(0, 151643, (2, seq + 1), generator=gen).to(runtime.device)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones_like(tokens[:, 1:])}
        losses = []
        for step in range(steps):
            start = time.perf_counter()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            out = forward_backward(chunks, [batch])
            _, grad_norm, _ = optimizer.step()
            if out:  # last pipeline stage
                losses.append(out[0]["lm loss"].item())
                if parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
                    print(f"step {step + 1:3d}/{steps}  loss {losses[-1]:.4f}  grad norm "
                          f"{grad_norm:.3f}  {time.perf_counter() - start:.2f} s", flush=True)
        return losses
    finally:
        shutdown_runtime()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen2-train",
        description=(
            "Train a Qwen2 model with megatron-core. Without arguments: the embedded CPU smoke "
            "job (tiny Qwen2, 2 processes over gloo, data parallel). The full Hydra-configured "
            "trainer replaces this entry point."
        ),
    )
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    add_layout_args(parser, "how the processes split the model (data parallel fills the rest)")
    args = parser.parse_args(argv)
    from qwen2_megatron.parallel.local_launch import spawn

    layout = layout_from_args(args)
    try:
        layout.resolve(args.nproc).check_model(get_preset(args.model), seq_length=args.seq_length)
    except LayoutError as err:
        return fail(err)
    results = spawn(smoke_rank, args.nproc, args.model, layout, args.steps, args.seq_length, args.lr)
    losses = next(r for r in results if r)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
