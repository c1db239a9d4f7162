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
point, it hands the captured state to megatron (its planning) and starts the copies into pinned
host buffers, and returns. The step's update then waits for the copy on the
device (`hold_update`: a stream wait; the host does not block). The writer is forked after that
step from the host copies (`request`). The device tensors being copied are kept referenced until
the copy is done, so the caching allocator cannot hand their memory to the step. Where the state
is on the CPU there are no streams: the copy is a plain one when the StagedSave is built (the
writer then reads that copy rather than the trainer's live memory).

The write buckets are found where megatron-core's own schedulers look for them: the second
argument of the request's write function, which its preload function replaces with host copies.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest


class StagedSave:
    """The host copy of an asynchronous save's shards, started when built."""

    def __init__(self, write: Callable[[], AsyncRequest], saved_at: torch.cuda.Event | None) -> None:
        """write: hands the captured state to megatron and returns its request. saved_at: the event
        recorded on the current stream after the step that saved and its capture (None where the
        state is on the CPU); nothing queued since has changed the state. `write` runs on the side
        stream, so that device work megatron may queue (building pieces of a parameter, say) is
        ordered after that point, and before the copies, as the copies are."""
        stream = torch.cuda.Stream() if saved_at is not None else None
        if stream is not None:
            stream.wait_event(saved_at)
        staged = []
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            request = write()
            buckets = request.async_fn_args[1]
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
