"""qwen2-model-info: parameter counts and per-rank memory of a model in a layout, without a GPU."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen2_megatron.cli.common import add_layout_args, fail, layout_from_args
from qwen2_megatron.model.params import count_parameters, rank_memory
from qwen2_megatron.model.presets import PRESETS, get_preset
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import LayoutError

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen2-model-info",
        description=(
            "Print a Qwen2 model's parameter counts and, for a parallel layout, the parameters "
            "and the memory for weights, gradients and optimizer states on the most loaded "
            "rank (activations excluded). Nothing is allocated."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="qwen2_7b", choices=sorted(PRESETS), help="preset")
    source.add_argument("--hf-config", type=Path, help="a Hugging Face config.json instead")
    parser.add_argument(
        "--world-size", type=int, help="number of GPUs (default: the fewest the layout needs)"
    )
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--no-distributed-optimizer", action="store_true",
        help="optimizer state replicated on every data-parallel rank",
    )
    parser.add_argument(
        "--no-fp32-master-weights", action="store_true",
        help="pure bf16 (optim.fp32_master_weights=false): bf16 gradients and Adam states, no master copy",
    )
    add_layout_args(parser, "the layout to size")
    args = parser.parse_args(argv)
    try:
        if args.hf_config:
            shape = Qwen2Shape.from_hf_config(json.loads(args.hf_config.read_text()))
        else:
            shape = get_preset(args.model)
        layout = layout_from_args(args)
        world = args.world_size or layout.min_world_size()
        layout = layout.resolve(world)
        layout.check_model(shape)
        pure = args.no_fp32_master_weights
        if pure and (args.precision != "bf16" or not args.no_distributed_optimizer):
            raise ValueError("--no-fp32-master-weights needs --precision bf16 and --no-distributed-optimizer "
                             "(as optim.fp32_master_weights=false needs train.precision=bf16 and "
                             "optim.distributed_optimizer=false)")
    except (ValueError, LayoutError, OSError) as err:
        return fail(err)
    counts = count_parameters(shape)
    mem = rank_memory(
        shape, layout, 2 if args.precision == "bf16" else 4, not args.no_distributed_optimizer, not pure
    )
    grads = "bf16" if pure else "fp32"
    master = ", fp32 master weights" if args.precision == "bf16" and not pure else ""
    states = "bf16 " if pure else ""
    name = args.hf_config or args.model
    print(f"model {name}: {counts.total / 1e9:.2f}B parameters "
          f"({counts.non_embedding / 1e9:.2f}B non-embedding, {counts.active / 1e9:.2f}B active per token)")
    print(f"layout tp={layout.tp} pp={layout.pp} ep={layout.ep} etp={layout.expert_tp} "
          f"dp={layout.dp} on {world} GPUs, {args.precision}{' without master weights' if pure else ''}")
    print(f"most loaded rank: {mem.params / 1e9:.3f}B parameters")
    print(f"  weights    {mem.weight_bytes / GIB:8.2f} GiB")
    print(f"  gradients  {mem.grad_bytes / GIB:8.2f} GiB ({grads})")
    print(f"  optimizer  {mem.optimizer_bytes / GIB:8.2f} GiB ({states}Adam m, v{master})")
    print(f"  total      {mem.total_bytes / GIB:8.2f} GiB + activations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
