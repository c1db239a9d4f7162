"""How checkpoint shards are written: megatron-core's torch_dist, in parallel over the ranks and
over `threads` files per rank, without copying host memory first.

torch.save writes a tensor's whole storage, so megatron-core's writer clones every host tensor
that is a view of a larger one before writing it. Every shard of a training state is such a view
(the weights of DDP's contiguous buffer, the boxes of the distributed optimizer's state), so a save
on a CPU first copied all of it into freshly allocated memory: 56% of a synchronous save's time
(py-spy of tools/bench_checkpoint.py) and, for an asynchronous one, most of the time it blocks
training. A model-only save (qwen2-convert import) has views too: the gate and up halves of each
fused fc1 weight, about half the bytes of a large Qwen2 (53% of 72B's). Here each such tensor is
handed over instead as a tensor over a slice of its storage: the same memory, holding exactly its
bytes, which torch.save writes as they are. GPU tensors are not touched: megatron-core's copy to
host memory (or checkpoint.async_copy's) makes new ones.

A run's saves share one strategy (`RunSaveStrategy`), so that megatron-core does its collective
planning once rather than at every save (the part of an asynchronous save that blocks training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedBase,
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or, for a contiguous host tensor that is a view of a larger storage, a
    tensor sharing its memory whose storage is exactly its bytes."""
    nbytes = tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or storage.nbytes() == nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    return torch.empty(0, dtype=tensor.dtype).set_(storage[start : start + nbytes], 0, tensor.shape)


class _ExactStorageSaveStrategy(FullyParallelSaveStrategyWrapper):
    """megatron-core's fully parallel torch_dist save, given each shard as `exact_storage` of it
    (after megatron has built the factories' pieces, which are views too)."""

    def apply_saving_parallelization(self, sharded_state_dict: ShardedStateDict) -> None:
        """megatron's, unless the group has one rank: then there is nothing to distribute, and
        megatron's wrapper, whose cache of the distribution stays empty, would gather every rank's
        shard metadata and validate the sharding at every save (dist_checkpointing.save validates
        it already when asked: validate_access_integrity)."""
        if dist.get_world_size(self.parallelization_group) > 1:
            super().apply_saving_parallelization(sharded_state_dict)

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> None:
        super().save(_with_exact_storage(sharded_state_dict), checkpoint_dir)

    def async_save(
        self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path, async_strategy: str = "nvrx"
    ) -> Any:
        return super().async_save(_with_exact_storage(sharded_state_dict), checkpoint_dir, async_strategy)


def _with_exact_storage(sharded_state_dict: ShardedStateDict) -> ShardedStateDict:
    def alias(value: Any) -> Any:
        if isinstance(value, ShardedTensor) and value.data is not None:
            value.data = exact_storage(value.data.detach())
        return value

    dict_list_map_inplace(alias, sharded_state_dict)
    return sharded_state_dict


def save_strategy(threads: int, reuse_plans: bool = False) -> FullyParallelSaveStrategyWrapper:
    """torch_dist, each rank writing `threads` files in parallel, with the writing of what
    data-parallel ranks hold alike spread over them. reuse_plans: keep, for the next saves of a
    state of the same structure, which rank writes which replicated shard and the save plans."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    base = TorchDistSaveShardedStrategy(thread_count=threads, cached_metadata=reuse_plans)
    return _ExactStorageSaveStrategy(base, group, do_cache_distribution=reuse_plans)


class RunSaveStrategy:
    """The save strategy of one run's checkpoints, kept from one save to the next.

    A fresh strategy makes every save collective three times over: megatron-core validates the
    sharding (all ranks' metadata of every shard gathered), the fully parallel wrapper decides who
    writes each replicated shard (gathered again), and torch_dist plans the files (the plans
    gathered and merged). A run's state keeps its structure, so megatron can keep all three
    (Megatron-LM's --ckpt-assume-constant-structure). But megatron then writes with the first
    save's plan without checking it, so here every save compares the structure of its state with
    the cached one's, and all ranks agree (one small all-reduce) before the plans are reused; a
    new structure gets a new strategy and is validated. That all-reduce goes over a gloo group of
    its own (built with the strategy, on every rank), so that it never waits for the GPU: an
    asynchronous save runs it while the device still computes the next step.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._strategy: FullyParallelSaveStrategyWrapper | None = None
        self._structure: tuple[Any, ...] | None = None
        self._host_group = dist.new_group(backend="gloo")

    def get(self, sharded_state_dict: ShardedStateDict) -> tuple[FullyParallelSaveStrategyWrapper, bool]:
        """Collective: (the strategy for this state, whether megatron must validate its sharding)."""
        structure = state_structure(sharded_state_dict)
        same = torch.tensor([int(self._strategy is not None and structure == self._structure)])
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=self._host_group)
        if same.item() and self._strategy is not None:
            return self._strategy, False
        self._strategy, self._structure = save_strategy(self.threads, reuse_plans=True), structure
        return self._strategy, True


def state_structure(sharded_state_dict: ShardedStateDict) -> tuple[Any, ...]:
    """What megatron's save plans depend on: every shard's key, type, dtype, shapes, place in its
    global tensor and replica id, in order (not the values; not the common state, which rank 0
    writes whole)."""
    def describe(value: Any) -> tuple[Any, ...]:
        if isinstance(value, ShardedTensor):
            return (value.key, value.dtype, value.local_shape, value.global_shape, value.global_offset,
                    value.replica_id, value.prepend_axis_num, value.flattened_range)
        if isinstance(value, ShardedTensorFactory):
            return (value.key, value.data.dtype, tuple(value.data.shape), value.replica_id, value.flattened_range)
        if isinstance(value, ShardedObject):
            return (value.key, value.global_shape, value.global_offset, value.replica_id)
        return (type(value).__name__, value.key, value.replica_id)

    return tuple(describe(v) for v in nested_values(sharded_state_dict) if isinstance(v, ShardedBase))
