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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
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


def save_strategy(threads: int) -> FullyParallelSaveStrategyWrapper:
    """torch_dist, each rank writing `threads` files in parallel, with the writing of what
    data-parallel ranks hold alike spread over them."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return _ExactStorageSaveStrategy(TorchDistSaveShardedStrategy(thread_count=threads), group)
