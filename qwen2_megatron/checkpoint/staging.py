"""Asynchronous saves whose host-side work and copy to host memory overlap the next training step.

megatron-core's asynchronous save copies every shard to host memory when the save is scheduled
and waits for the copy (torch.cuda.synchronize) before it forks its writer: on an H200 that wait
was 0.15 s of a 0.28 s step (tools/GPU_RESULTS.md). What was left then was host work: building
the sharded state dict and megatron's translation and planning of the files (0.04 s). A staged
save takes none of that at the step that saves. There, the manager only captures the step
(train_checkpoint.capture_training: the sharded state dict, the small state, the RNG) and marks the
point in the device's stream (`saved_at`). The next step's forward and backward only read the
weights and the optimizer's state. While the device computes them, at that step's
`before_update`, the host builds the StagedSave: on a side CUDA stream ordered after the marked
point, it hands the captured state to megatron (its planning) and starts the copies into the
run's staging buffers, and returns. The step's update then waits for the copy on the
device (`hold_update`: a stream wait; the host does not block). The writer gets the request after
that step (`request`). The device tensors being copied are kept referenced until
the copy is done, so the caching allocator cannot hand their memory to the step. Where the state
is on the CPU there are no streams: the copy is a plain one when the StagedSave is built (the
writer then reads that copy rather than the trainer's live memory).

The staging buffers (`StagingBuffers`) are one per file a rank writes, every shard at its own
offset, and are kept from one save to the next: a run's saves have the same files. For a writer
process started once (writer_process.py) they are shared memory, which it maps when a request
hands it their file descriptors (one per file, not one per shard: a rank may hold thousands).

The write buckets are found where megatron-core's own schedulers look for them: the second
argument of the request's write function, which its preload function would replace with host
copies. Here it is replaced with `StagedFile`s, and the write function with `write_staged`, which
gives megatron's back its buckets made of the staged shards.
"""

from __future__ import annotations

import os
import shutil
import weakref
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from qwen2_megatron.checkpoint.save_strategy import exact_storage

_ALIGN = 64  # bytes: every shard's offset in its file's buffer (any dtype can view it; whole cache lines)


class StagingSpaceError(RuntimeError):
    """The node's shared memory cannot hold the staging buffers of its ranks."""


class StagedFile(NamedTuple):
    """One file of a rank's save: megatron's bucket with its shards as (item, offset, shape, dtype)
    in `buffer`, a flat byte tensor."""

    file_name: str
    key: str
    bytes_data: list[Any]
    buffer: torch.Tensor
    shards: list[tuple[Any, int, tuple[int, ...], torch.dtype]]


def _shard(buffer: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def _offsets(tensors: list[tuple[Any, torch.Tensor]]) -> tuple[int, list[int]]:
    """(the buffer's size, each shard's offset in it)."""
    offsets, end = [], 0
    for _, tensor in tensors:
        offsets.append(end)
        end += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return end, offsets


def write_staged(write: Callable[..., None], rank: int, files: list[StagedFile], results_queue: Any) -> None:
    """megatron's write function (`write`), in the writer's process, given its buckets back: each
    shard a tensor whose storage is exactly its bytes of the buffer, as torch.save writes a
    tensor's whole storage."""
    buckets = [
        (f.file_name, f.key, (f.bytes_data, [(item, exact_storage(_shard(f.buffer, *place))) for item, *place in f.shards]))
        for f in files
    ]
    write(rank, buckets, results_queue)


class StagingBuffers:
    """Host memory the shards of a run's asynchronous saves are copied into, one buffer per file,
    allocated at the first save and again only when the files' sizes change.

    shared: in shared memory (/dev/shm), for a writer process that did not fork from the trainer;
    a CPU tensor handed to another process would otherwise be moved into shared memory at every
    save (a copy of the whole state). Page-locked where the shards come from a GPU, so that the
    copies run asynchronously (shared memory is registered with CUDA: cudaHostRegister)."""

    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self._sizes: list[int] = []
        self._pinned = False
        self._buffers: list[torch.Tensor] = []

    def get(self, sizes: list[int], pinned: bool) -> list[torch.Tensor]:
        if sizes != self._sizes or pinned != self._pinned:
            self._buffers = []  # the old ones go before the new ones are allocated
            if self.shared:
                _check_shared_memory(sum(sizes))
            self._buffers = [self._allocate(size, pinned) for size in sizes]
            self._sizes, self._pinned = sizes, pinned
        return self._buffers

    def _allocate(self, size: int, pinned: bool) -> torch.Tensor:
        if not self.shared:
            return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
        if pinned and size:
            from torch.cuda._pin_memory_utils import pin_memory, unpin_memory  # torch's own (cudaHostRegister)

            pin_memory(buffer.data_ptr(), size)
            weakref.finalize(buffer, unpin_memory, buffer.data_ptr())
        return buffer


def _check_shared_memory(nbytes: int, directory: str = "/dev/shm") -> None:
    """Refuse, before touching it, shared memory the node lacks (a write into it would kill the
    rank with SIGBUS). Every local rank stages about as much as this one."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = shutil.disk_usage(directory).free
    if nbytes * ranks > free:
        raise StagingSpaceError(
            f"checkpoint.async_writer=persistent stages each rank's shards in shared memory: "
            f"{nbytes / 2**30:.2f} GiB here, about {nbytes * ranks / 2**30:.2f} GiB for the node's {ranks} "
            f"rank(s), but {directory} has {free / 2**30:.2f} GiB free. Give the node more shared memory "
            "(a container: --ipc=host or --shm-size) or set checkpoint.async_writer=fork"
        )


class StagedSave:
    """The host copy of an asynchronous save's shards, started when built."""

    def __init__(
        self, write: Callable[[], AsyncRequest], saved_at: torch.cuda.Event | None, buffers: StagingBuffers
    ) -> None:
        """write: hands the captured state to megatron and returns its request. saved_at: the event
        recorded on the current stream after the step that saved and its capture (None where the
        state is on the CPU); nothing queued since has changed the state. `write` runs on the side
        stream, so that device work megatron may queue (building pieces of a parameter, say) is
        ordered after that point, and before the copies, as the copies are."""
        stream = torch.cuda.Stream() if saved_at is not None else None
        if stream is not None:
            stream.wait_event(saved_at)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            request = write()
            buckets = request.async_fn_args[1] if request.async_fn is not None else []  # None: nothing to write here
            places = [_offsets(tensors) for _, _, (_, tensors) in buckets]
            hosts = buffers.get([size for size, _ in places], pinned=saved_at is not None)
            files = []
            for (file_name, key, (bytes_data, tensors)), host, (_, offsets) in zip(buckets, hosts, places):
                shards = []
                for (item, tensor), offset in zip(tensors, offsets):
                    place = (offset, tuple(tensor.shape), tensor.dtype)
                    _shard(host, *place).copy_(tensor, non_blocking=tensor.is_cuda)
                    shards.append((item, *place))
                files.append(StagedFile(file_name, key, bytes_data, host, shards))
        self._done = stream.record_event() if stream is not None else None
        self._sources: list[Any] | None = buckets if stream is not None else None
        self._files = files
        self._request = request
        self.held_an_update = False  # a step has run beside the copy: the writer may start

    def hold_update(self) -> None:
        """Make the work queued next on the current stream (an optimizer step) wait for the copy."""
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
        self.held_an_update = True

    def request(self) -> AsyncRequest:
        """The request to schedule, its write function reading the staged files (waits for the copy)."""
        if self._done is not None:
            self._done.synchronize()
        self._sources = None
        if self._request.async_fn is None:
            return self._request
        rank, _, results_queue = self._request.async_fn_args
        return self._request._replace(
            async_fn=partial(write_staged, self._request.async_fn),
            async_fn_args=(rank, self._files, results_queue),
            preload_fn=None,
        )
