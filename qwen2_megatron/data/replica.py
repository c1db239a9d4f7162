"""Feeding the ranks of one model replica from a single loader.

The TP (and CP) peers of a replica consume the same micro-batch. Tokenising it on every peer
would multiply the data work by the TP size, so one peer (the source rank of the tensor-parallel
group, megatron's convention) runs the MixtureDataLoader and broadcasts each micro-batch; the
others build no loader. Pipeline stages keep only the fields they use (batch.batch_for_stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from qwen2_megatron.data.batch import batch_for_stage

_INT_FIELDS = ("tokens", "labels", "position_ids")


def _template(micro_batch_size: int, seq_length: int, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    if name == "attention_mask":
        return (micro_batch_size, 1, seq_length, seq_length), torch.uint8  # bool travels as bytes
    return (micro_batch_size, seq_length), torch.int64 if name in _INT_FIELDS else torch.float32


def broadcast_batch(
    batch: dict[str, Tensor] | None, fields: list[str], micro_batch_size: int, seq_length: int,
    group: dist.ProcessGroup, src: int, device: torch.device,
) -> dict[str, Tensor]:
    """`batch` from global rank `src` (None elsewhere) on every rank of `group`, as `fields`."""
    received: dict[str, Tensor] = {}
    for name in fields:
        shape, dtype = _template(micro_batch_size, seq_length, name)
        if batch is not None:
            tensor = batch[name].to(device=device, dtype=dtype).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=src, group=group)
        received[name] = tensor.bool() if name == "attention_mask" else tensor
    return received


def replica_fields(reset_position_ids: bool, reset_attention_mask: bool, first_stage: bool, last_stage: bool) -> list[str]:
    """The fields a pipeline stage of a replica needs, for the configured resets."""
    every = ["tokens", "labels", "loss_mask"]
    every += ["position_ids"] if reset_position_ids else []
    every += ["attention_mask"] if reset_attention_mask else []
    return list(batch_for_stage(dict.fromkeys(every), first_stage, last_stage))  # type: ignore[arg-type]
