"""Model weights as a megatron-core distributed checkpoint (torch_dist), plus a description file.

The shards are written by megatron-core's dist_checkpointing, so a checkpoint saved in one
parallel layout loads into any other. Beside them, qwen2_megatron.json records the model shape,
the layout and precision it was written with and the package versions, so that a loader can
refuse a checkpoint of another shape with a clear message instead of a tensor-shape assertion.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.checkpoint.location import Location, location
from qwen2_megatron.checkpoint.save_strategy import save_strategy
from qwen2_megatron.checkpoint.validate import verify_checksums_collectively
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.lifetime import end_with_parent

INFO_FILE = "qwen2_megatron.json"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another model than the one being loaded, or is not a checkpoint."""


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """megatron sharded state of the model chunks (GPTModels, not their DDP wrappers)."""
    keys = sharded_model_state_keys(len(chunks))
    return {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks)}


def start_write_results_server() -> None:
    """Start, by fork, the process through which megatron-core's shard writers report (once per
    process). Every save, synchronous too, needs it, and megatron-core starts it at the first save
    with 'spawn': a new interpreter that imports the training program again (9 s on a 2-core
    machine, at every start of a run; on an H200 node the first save took 14 s longer than the
    second) and keeps torch loaded beside every rank. A fork takes 0.04 s; the helper process shares
    the memory of the moment copy-on-write, so the trainer starts it before building the model.

    The server is megatron's (a multiprocessing manager holding its queue, which megatron keeps in
    `filesystem_async._results_queue`), started here so that it ends with its rank: forked, it
    would inherit the trainer's SIGTERM handler (which defers the signal to the end of a step) and
    outlive a rank killed outright, holding the rank's stdout open."""
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(_results_server_init)
        filesystem_async._results_queue = manager.Queue()


def _results_server_init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent(signal.SIGKILL)


def save_model(
    chunks: list[torch.nn.Module],
    path: str | Path | Location,
    shape: Qwen2Shape,
    layout: ParallelLayout,
    precision: str,
) -> None:
    """Collective: every rank writes its shards; rank 0 writes the description file last."""
    path = location(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    start_write_results_server()
    strategy = save_strategy(CheckpointConfig.write_threads)
    dist_checkpointing.save(sharded_model_state(chunks), str(path), sharded_strategy=strategy)
    if dist.get_rank() == 0:
        write_info(path, shape, layout, precision)
    dist.barrier()


def write_info(path: Location, shape: Qwen2Shape, layout: ParallelLayout, precision: str) -> None:
    info = {
        "format_version": FORMAT_VERSION,
        "model": shape.to_dict(),
        "layout": asdict(layout),
        "precision": precision,
        "versions": package_versions(),
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def package_versions(names: tuple[str, ...] = ("qwen2-megatron", "megatron-core", "torch")) -> dict[str, str]:
    """Versions of the packages writing a checkpoint. A package imported from a source tree on
    PYTHONPATH (not pip-installed, common on clusters) has no metadata: recorded as such, since
    failing there would lose every step trained since the last checkpoint."""
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown (not installed: imported from a source tree)"
    return versions


def read_info(path: str | Path | Location) -> dict[str, Any]:
    """The description of a checkpoint; errors name the directory and what is missing."""
    info_file = location(path) / INFO_FILE
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


def checkpoint_shape(path: str | Path | Location) -> Qwen2Shape:
    return Qwen2Shape(**read_info(path)["model"])


def check_shape(path: str | Path | Location, shape: Qwen2Shape) -> None:
    """Refuse a checkpoint of another model shape (or vocabulary), naming the differences."""
    saved = checkpoint_shape(path)
    if saved != shape:
        diff = {
            k: (v, getattr(shape, k)) for k, v in saved.to_dict().items() if getattr(shape, k) != v
        }
        raise CheckpointMismatchError(
            f"{location(path) / INFO_FILE}: the checkpoint holds a different model: "
            f"(checkpoint, requested) = {diff}"
        )


def restore_model_state(chunks: list[torch.nn.Module], state: dict[str, Any]) -> None:
    for key, chunk in zip(sharded_model_state_keys(len(chunks)), chunks):
        chunk.load_state_dict(state[key])


def sharded_model_state_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def load_model(chunks: list[torch.nn.Module], path: str | Path | Location, shape: Qwen2Shape) -> None:
    """Collective: load weights saved in any layout into this rank's chunks (also the weights
    of a training checkpoint: its optimizer state is left unread). The weights' checksums are
    verified first, each rank reading its share of the shards."""
    check_shape(path, shape)
    problem = verify_checksums_collectively(location(path), weights_only=True)
    if problem is not None:
        raise problem
    restore_model_state(chunks, dist_checkpointing.load(sharded_model_state(chunks), str(path)))
