"""Wrap model chunks in megatron-core's DistributedDataParallel, wired for its schedules.

megatron's DDP keeps gradients in contiguous buffers (param.main_grad) and reduces them over the
data-parallel group; finalize_model_grads, called by the pipeline schedules at the end of a
step, also all-reduces the sequence-parallel norm gradients over TP and the tied embedding /
output-layer gradients between the first and last pipeline stages.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads


def wrap_ddp(
    chunks: list[torch.nn.Module],
    use_distributed_optimizer: bool = False,
) -> list[DistributedDataParallel]:
    """One DDP wrapper per chunk; gradients are kept and reduced in fp32."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's gradients may be bucketed lazily (megatron-LM's rule).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    return wrapped
