"""When and where the trainer saves, and what it resumes from.

Saving: every `interval` steps, at the end, and on request (a signal or a SAVE file in the run
directory; see train/trainer.py). With `async_save`, the step that saves only captures the state
and hands the shards to megatron-core's background writer (writer_process.py: a process forked per
save, or with `async_writer=persistent` one per rank for the run, which reads the shards from
shared staging buffers, so that they are always staged); the checkpoint is published when every
rank's writer has finished (checked at each step by `poll`), and at most one save is in flight.
Where `async_copy` says so (staging.py), the step that saves only captures its state; its
handing to megatron and its copy to host memory overlap the next step: the trainer calls
`before_update` before each optimizer step, which does that work while the device still computes
the step's forward and backward, and the writer is started at the first `poll` after the update.
Resuming: `resume=auto` takes the newest complete checkpoint of the run (starting fresh when there
is none), reports incomplete ones, and with `fallback` skips a newest checkpoint whose files are
damaged (missing, truncated, or failing their checksums: `verify_checksums`); `resume=<path>`
loads exactly that checkpoint; `resume=none` starts fresh. Every decision is taken on rank 0 (the
checksums on every rank, for its share of the files) and shared, so all ranks load the same
checkpoint or none.
Retention deletes old checkpoints in a background thread (on shared file systems and object stores
a deletion takes long, and every rank would wait for it); their markers go first, synchronously.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.checkpoint.location import Location, location, remove_tree
from qwen2_megatron.checkpoint.model_checkpoint import start_write_results_server
from qwen2_megatron.checkpoint.save_strategy import RunSaveStrategy
from qwen2_megatron.checkpoint.staging import StagedSave, StagingBuffers
from qwen2_megatron.checkpoint.store import CheckpointStore, checkpoint_step
from qwen2_megatron.checkpoint.train_checkpoint import (
    TrainingSnapshot,
    capture_training,
    load_training,
    write_training,
)
from qwen2_megatron.checkpoint.validate import (
    IncompleteCheckpointError,
    UnsafeCheckpointError,
    check_files,
    verify_checksums_collectively,
)
from qwen2_megatron.checkpoint.writer_process import WriterQueue
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from although one was asked for."""


@dataclass
class _Captured:
    """A step captured for an asynchronous save, not yet handed to megatron."""

    step: int
    start: float  # when its save began (perf_counter)
    snapshot: TrainingSnapshot
    saved_at: torch.cuda.Event | None  # after the step and the capture, on the device's stream


class CheckpointManager:
    def __init__(
        self, cfg: CheckpointConfig, shape: Qwen2Shape, layout: ParallelLayout, precision: str
    ) -> None:
        self.cfg, self.shape, self.layout, self.precision = cfg, shape, layout, precision
        self.store = CheckpointStore(cfg.dir)
        self.main = dist.get_rank() == 0
        persistent = cfg.async_save and cfg.async_writer == "persistent"
        self._queue = WriterQueue(persistent) if cfg.async_save else None
        self._buffers = StagingBuffers(shared=persistent)
        self._captured: _Captured | None = None  # a save whose writing starts in the next step
        self._staged: StagedSave | None = None  # a save whose host copy overlaps the next step
        self._strategy = RunSaveStrategy(cfg.write_threads)
        self._deleting: threading.Thread | None = None
        start_write_results_server()  # before the trainer builds the model: it forks

    def due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.interval and step % self.cfg.interval == 0) or (last and self.cfg.save_at_end)

    def save(self, step: int, chunks: list[Any], optimizer: Any, train_state: dict[str, Any]) -> Location:
        """Collective: write, publish atomically, then apply retention. With async_save the
        shards are still being written on return (with a staged save, not even handed to megatron
        yet: `before_update` does that); `poll`/`wait` publish them."""
        self._finish_writing()
        start = time.perf_counter()
        if self.main:
            self.store.prepare(step)
        dist.barrier()
        asynchronous = self._queue is not None
        snapshot = capture_training(chunks, optimizer, train_state)
        overlap = asynchronous and (
            self.cfg.async_copy == "overlap" or (self.cfg.async_copy == "auto" and snapshot.on_gpu)
        )
        if overlap or self._buffers.shared:
            saved_at = torch.cuda.current_stream().record_event() if snapshot.on_gpu else None
            self._captured = _Captured(step, start, snapshot, saved_at)
            if not overlap:  # the persistent writer reads only the staging buffers: the copy is made now
                self._stage()
                self._start_writer()
            elif self.main:
                print(f"checkpoint of step {step} captured in {time.perf_counter() - start:.2f} s "
                      "(written from the next step on)", flush=True)
            return self.store.path(step)
        request = self._write(step, snapshot, asynchronous)
        publish = partial(self._publish, step, start)
        if request is None:
            publish()
        else:
            request.add_finalize_fn(publish)
            self._queue.schedule_async_request(request)
            if self.main:
                print(f"checkpoint of step {step} handed to the background writer in "
                      f"{time.perf_counter() - start:.2f} s", flush=True)
        return self.store.path(step)

    def _write(self, step: int, snapshot: TrainingSnapshot, asynchronous: bool) -> Any:
        return write_training(
            self.store.partial_path(step), snapshot, self.shape, self.layout, self.precision, asynchronous,
            self._strategy,
        )

    @property
    def writing(self) -> bool:
        """A background save is in flight (the same on every rank: `poll` finishes saves together)."""
        return (self._captured is not None or self._staged is not None
                or (self._queue is not None and self._queue.get_num_unfinalized_calls() > 0))

    def before_update(self) -> None:
        """Collective, before an optimizer step (its forward and backward queued): hand a captured
        save to megatron and start its copy to host memory; the update must not change the state
        a staged save still copies."""
        if self._captured is not None:
            self._stage()
        if self._staged is not None:
            self._staged.hold_update()

    def _stage(self) -> None:
        captured, self._captured = self._captured, None

        def write() -> Any:
            request = self._write(captured.step, captured.snapshot, asynchronous=True)
            request.add_finalize_fn(partial(self._publish, captured.step, captured.start))
            return request

        self._staged = StagedSave(write, captured.saved_at, self._buffers)
        if self.main:
            print(f"checkpoint of step {captured.step} handed to the background writer "
                  f"{time.perf_counter() - captured.start:.2f} s after its save began", flush=True)

    def poll(self) -> None:
        """Collective (when a save is in flight): start the writer of a staged save once a step has
        run beside its copy (decided by step count, so alike on every rank), and publish a
        background save that has finished."""
        if self._staged is not None and self._staged.held_an_update:
            self._start_writer()
        if self.writing:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def _start_writer(self) -> None:
        request = self._staged.request()
        self._staged = None
        self._queue.schedule_async_request(request)

    def wait(self) -> None:
        """Collective: finish and publish the save in flight, if any, and finish deleting what
        retention dropped."""
        self._finish_writing()
        self._finish_deleting()

    def _finish_writing(self) -> None:
        if self._captured is not None:  # no update has changed the captured state since
            self._stage()
        if self._staged is not None:
            self._start_writer()
        if self.writing:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        """Stop the persistent writer, if any (after `wait` or `abort`: nothing is in flight)."""
        if self._queue is not None:
            self._queue.close()

    def abort(self) -> None:
        """Stop a background save without publishing it (after a failure elsewhere): its partial
        directory stays behind and is reported and ignored by the next start."""
        self._captured = self._staged = None
        if self._queue is not None:
            for call in self._queue.async_calls:
                call.async_caller.close(abort=True)
            self._queue.async_calls.clear()

    def _publish(self, step: int, start: float) -> None:
        if self.main:
            path = self.store.publish(step)
            print(f"saved checkpoint {path} in {time.perf_counter() - start:.2f} s", flush=True)
            self._finish_deleting()
            doomed = self.store.retire(self.cfg.keep_last, self.cfg.keep_every)
            if doomed:
                self._deleting = threading.Thread(target=self._delete, args=(doomed,), name="checkpoint-retention")
                self._deleting.start()
        dist.barrier()

    @staticmethod
    def _delete(doomed: list[Location]) -> None:
        for old in doomed:
            remove_tree(old)
            print(f"checkpoint retention: removed {old}", flush=True)

    def _finish_deleting(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

    def resume(self, chunks: list[Any], optimizer: Any) -> dict[str, Any] | None:
        """Collective: load the checkpoint chosen by `resume`; None when starting fresh."""
        if self.cfg.resume == "none":
            return None
        for path in self._candidates():
            problem = self._check(path)
            if problem is None:
                state = load_training(
                    path, chunks, optimizer, self.shape, self.layout, self.cfg.fully_parallel_load
                )
                if self.main:
                    print(f"resumed from {path} (step {state['step']})", flush=True)
                return state
            explicit = self.cfg.resume != "auto"
            if explicit or not self.cfg.fallback:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            if self.main:
                print(f"warning: skipping checkpoint {path}: {problem}", flush=True)
        if self.cfg.resume != "auto":
            raise CheckpointError(f"checkpoint.resume={self.cfg.resume} does not exist")
        return None

    def _candidates(self) -> list[Location]:
        if self.cfg.resume != "auto":
            path = location(self.cfg.resume)
            return [path] if path.exists() else []
        listing = self.store.listing()
        if self.main:
            for path in listing.incomplete:
                print(f"ignoring incomplete checkpoint {path} (its save did not finish)", flush=True)
        return sorted(listing.complete, key=checkpoint_step, reverse=True)

    def _check(self, path: Location) -> str | None:
        """Rank 0 checks the files, then every rank verifies the checksums of its share of the
        shards; every rank gets the same verdict."""
        verdict: list[str | None] = [None]
        if self.main:
            try:
                check_files(path)
            except (IncompleteCheckpointError, UnsafeCheckpointError) as err:
                verdict[0] = str(err)
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None or not self.cfg.verify_checksums:
            return verdict[0]
        start = time.perf_counter()
        problem = verify_checksums_collectively(path)
        if problem is not None:
            return str(problem)
        if self.main:
            print(f"verified the checksums of {path} in {time.perf_counter() - start:.2f} s", flush=True)
        return None
