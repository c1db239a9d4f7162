"""The background writer of asynchronous saves: a process forked per save, or one started once
for the whole run (checkpoint.async_writer=persistent).

megatron-core's default writer is a process forked at every save. The fork copies the trainer's
page tables, and while the writer lives every page of host memory the trainer writes is first
copied (copy-on-write: on a CPU, all of the weights and optimizer state at the next update); and
it forks a process that runs CUDA, NCCL and data-loader threads. megatron-core also has a writer
started once and fed through queues (PersistentAsyncCaller). Used as is, it would not do here:
- its process sets the rank's GPU as its device, which creates a CUDA context there (hundreds of
  MiB of the GPU's memory), and divides the rank by the device count (zero on a CPU). It only
  writes host memory: here its loop runs with setting the device made a no-op (`_writer_loop`);
- a writer that dies (killed, out of memory) leaves the trainer waiting for its completion
  forever. Here the trainer checks that it lives and fails with its exit code;
- what it writes must reach it through shared memory without being copied at every save: the
  staging buffers (staging.py) are shared memory kept from save to save.
"""

from __future__ import annotations

import logging
import signal
from queue import Empty
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies.async_utils import (
    AsyncCallsQueue,
    AsyncCaller,
    PersistentAsyncCaller,
    TemporalAsyncCaller,
)

from qwen2_megatron.parallel.lifetime import end_with_parent


class WriterDiedError(RuntimeError):
    """The run's persistent checkpoint writer exited while a save was in flight."""


def _writer_loop(rank: int, *queues_and_log_level: Any) -> None:
    """The writer process: megatron's loop, without a device of its own (see the module's doc). The
    loop's first act is torch.cuda.set_device(rank % torch.cuda.device_count()); in this process,
    which has no other use for CUDA, that reads a count of 1 and sets nothing. It ends with its
    rank, even one killed outright (it would otherwise wait on its queue forever)."""
    end_with_parent(signal.SIGKILL)
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    PersistentAsyncCaller.async_loop(rank, *queues_and_log_level)


class PersistentWriter(PersistentAsyncCaller):
    """megatron's persistent writer, its process spawned when this is built (so it starts while
    the trainer builds its model), one per rank."""

    def __init__(self) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")
        # megatron's caller keeps these on the class, for one writer per process; here they are the
        # instance's, which its methods read the same way
        self._persistent_queue = ctx.JoinableQueue()
        self._persistent_preload_q = ctx.JoinableQueue()
        self._persistent_comp_q = ctx.Queue()
        self._rank = dist.get_rank()
        self.process = self._persistent_process = ctx.Process(
            target=_writer_loop,
            args=(self._rank, self._persistent_queue, self._persistent_preload_q, self._persistent_comp_q,
                  logging.getLogger("megatron.core").getEffectiveLevel()),
            name=f"checkpoint-writer-{self._rank}",
            daemon=True,
        )
        self.process.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """megatron's check, which first waits (blocking) for the writer's word that it finished,
        failing if the writer is gone."""
        while self.cur_item is None:
            try:
                self.cur_item = self._persistent_comp_q.get(timeout=1.0) if blocking else self._persistent_comp_q.get_nowait()
            except Empty:
                if not self.process.is_alive():
                    raise WriterDiedError(
                        f"rank {self._rank}: the checkpoint writer process (pid {self.process.pid}) exited with "
                        f"code {self.process.exitcode} while writing a checkpoint (a negative code is the signal "
                        "that ended it: -9 is a kill, often for lack of host memory); that checkpoint was not "
                        "published, and its partial directory is reported and ignored at the next start"
                    ) from None
                if not blocking:
                    break
        return super().is_current_async_call_done(blocking, no_dist)

    def close(self, abort: bool = False) -> None:
        if self.process is not None and not self.process.is_alive():
            self.process = None  # megatron's close would wait for a dead writer's answer forever
        super().close(abort)


class WriterQueue(AsyncCallsQueue):
    """megatron's queue of background saves, with a writer forked per save or the run's
    persistent one."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.writer = PersistentWriter() if persistent else None

    def _get_async_caller(self) -> AsyncCaller:
        return self.writer if self.writer is not None else TemporalAsyncCaller()

    def close(self, abort: bool = False) -> None:
        """Finish (abort: stop) the saves in flight, then stop the persistent writer."""
        super().close(abort)
        if self.writer is not None:
            self.writer.close(abort)
            self.writer = None
