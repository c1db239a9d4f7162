"""Asynchronous saves whose copy of the state to host memory overlaps the next training step.

megatron-core's asynchronous save copies every shard to host memory when the save is scheduled
and waits for the copy (torch.cuda.synchronize) before it forks its writer: on an H200 that wait
was 0.15 s of a 0.28 s step (tools/GPU_RESULTS.md). A staged save instead starts the copies on a
side CUDA stream into pinned host buffers and returns: the next step's forward and backward, which
only read the weights and the optimizer's state, run beside the copy; the step's update waits for
the copy on the device (`hold_update`: a stream wait, the host does not block); the writer is
forked after that step from the host copies (`request`). The device tensors being copied are kept
referenced until the copy is done, so the caching allocator cannot hand their memory to the step.
Where the state is on the CPU there are no streams: the copy is a plain one at save time (the
writer then reads that copy rather than the trainer's live memory).

The write buckets are found where megatron-core's own schedulers look for them: the second
argument of the request's write function, which its preload function replaces with host copies.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest


def has_device_tensors(request: AsyncRequest) -> bool:
    """Whether any shard of the request lives on a GPU."""
    return any(tensor.is_cuda for _, _, (_, tensors) in request.async_fn_args[1] for _, tensor in tensors)


class StagedSave:
    """The host copy of an asynchronous save's shards, started when built."""

    def __init__(self, request: AsyncRequest, on_gpu: bool) -> None:
        """on_gpu: has_device_tensors(request), which the caller has asked already."""
        buckets = request.async_fn_args[1]
        stream = torch.cuda.Stream() if on_gpu else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # the step that saves has written the state
        staged = []
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for file_name, key, (bytes_data, tensors) in buckets:
                copies = []
                for item, tensor in tensors:
                    host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
                    host.copy_(tensor, non_blocking=tensor.is_cuda)
                    copies.append((item, host))
                staged.append((file_name, key, (bytes_data, copies)))
        self._done = stream.record_event() if stream is not None else None
        self._sources: list[Any] | None = buckets if stream is not None else None
        self._staged = staged
        self._request = request
        self.held_an_update = False  # a step has run beside the copy: the writer may start

    def hold_update(self) -> None:
        """Make the work queued next on the current stream (an optimizer step) wait for the copy."""
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
        self.held_an_update = True

    def request(self) -> AsyncRequest:
        """The request to schedule, its write function reading the host copies (waits for them)."""
        if self._done is not None:
            self._done.synchronize()
        self._sources = None
        staged = self._staged
        return self._request._replace(preload_fn=lambda: staged)
