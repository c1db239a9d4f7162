"""The one place that starts torch.distributed and megatron-core's parallel state from a layout.

Processes find each other through the variables torchrun (and our local launcher) set: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. A plain `python` start is a world of one.
On GPU machines the backend is NCCL with one device per local rank; without a GPU it is gloo with
megatron-core's CUDA assumptions covered by parallel.cpu_compat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from qwen2_megatron.parallel import cpu_compat
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import free_port


@dataclass(frozen=True)
class Runtime:
    layout: ParallelLayout  # resolved: dp filled in
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process from the launcher's environment."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def init_runtime(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 30) -> Runtime:
    """Validate the layout against the world size, then start the process groups and RNGs."""
    rank, world, local_rank = process_env()
    resolved = layout.resolve(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.enable()
        backend, device = "gloo", torch.device("cpu")
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes)
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=resolved.tp,
        pipeline_model_parallel_size=resolved.pp,
        virtual_pipeline_model_parallel_size=resolved.vpp if (resolved.vpp or 1) > 1 else None,
        context_parallel_size=resolved.cp,
        expert_model_parallel_size=resolved.ep,
        expert_tensor_parallel_size=resolved.expert_tp,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed on all ranks: weights are initialised identically (TP-invariant with CPU
    # initialisation); megatron's tracker derives the per-TP-rank streams from it.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Runtime(layout=resolved, rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_runtime(keep_process_group: bool = False) -> None:
    """Tear down megatron-core's groups and (unless kept for another layout) the default group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if keep_process_group:
        _destroy_subgroups()
    else:
        dist.destroy_process_group()


def _destroy_subgroups() -> None:
    """Destroy every group but the default one.

    megatron-core's destroy_model_parallel only forgets most of its groups, and torch keeps them
    registered. A process that keeps its default group to start another layout would keep some
    20 groups per layout (67 gloo threads per rank): hundreds of threads per process after a
    few layouts, which keep waking up and slow everything else on the machine. Megatron-core reads
    torch's registry of groups (`_world.pg_map`) in the same way.
    """
    default = dist.distributed_c10d._get_default_group()
    for group in [group for group in dist.distributed_c10d._world.pg_map if group is not default]:
        dist.destroy_process_group(group)
