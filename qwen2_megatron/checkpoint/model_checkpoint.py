"""Model weights as a megatron-core distributed checkpoint (torch_dist), plus a description file.

The shards are written by megatron-core's dist_checkpointing, so a checkpoint saved in one
parallel layout loads into any other. Beside them, qwen2_megatron.json records the model shape,
the layout and precision it was written with and the package versions, so that a loader can
refuse a checkpoint of another shape with a clear message instead of a tensor-shape assertion.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout

INFO_FILE = "qwen2_megatron.json"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another model than the one being loaded, or is not a checkpoint."""


def _sharded(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_model(
    chunks: list[torch.nn.Module],
    path: str | Path,
    shape: Qwen2Shape,
    layout: ParallelLayout,
    precision: str,
) -> None:
    """Collective: every rank writes its shards; rank 0 writes the description file last."""
    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(chunks), str(path))
    if dist.get_rank() == 0:
        info = {
            "format_version": FORMAT_VERSION,
            "model": shape.to_dict(),
            "layout": asdict(layout),
            "precision": precision,
            "versions": {p: version(p) for p in ("qwen2-megatron", "megatron-core", "torch")},
        }
        (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    dist.barrier()


def read_info(path: str | Path) -> dict[str, Any]:
    """The description of a checkpoint; errors name the directory and what is missing."""
    info_file = Path(path) / INFO_FILE
    if not info_file.is_file():
        raise CheckpointMismatchError(
            f"{info_file} not found: {path} is not a complete qwen2-megatron checkpoint "
            "(the description is written last, so a missing one means the save did not finish)"
        )
    info = json.loads(info_file.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{info_file}: format_version {info.get('format_version')} is not {FORMAT_VERSION}"
        )
    return info


def checkpoint_shape(path: str | Path) -> Qwen2Shape:
    return Qwen2Shape(**read_info(path)["model"])


def load_model(chunks: list[torch.nn.Module], path: str | Path, shape: Qwen2Shape) -> None:
    """Collective: load weights saved in any layout into this rank's chunks."""
    saved = checkpoint_shape(path)
    if saved != shape:
        diff = {
            k: (v, getattr(shape, k)) for k, v in saved.to_dict().items() if getattr(shape, k) != v
        }
        raise CheckpointMismatchError(
            f"{path} holds a different model: (checkpoint, requested) = {diff}"
        )
    state = dist_checkpointing.load(_sharded(chunks), str(path))
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])
