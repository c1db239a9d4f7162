"""A training save writes the trainer's own memory: no host copy of the state before writing
(qwen2_megatron/checkpoint/save_strategy.py), and what is written is that state. A run's later
saves reuse megatron's plans without collective planning, and still write their own state. A
staged asynchronous save (checkpoint/staging.py) plans and copies during the next step."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen2_megatron.checkpoint.save_strategy import RunSaveStrategy, exact_storage
from qwen2_megatron.parallel.local_launch import spawn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_storage_is_the_same_memory_holding_only_its_bytes(dtype: torch.dtype) -> None:
    buffer = torch.arange(1000, dtype=dtype)
    view = buffer[100:300].view(20, 10)
    alias = exact_storage(view)
    assert alias.data_ptr() == view.data_ptr() and alias.dtype == dtype and alias.shape == view.shape
    assert alias.untyped_storage().nbytes() == view.numel() * view.element_size()
    buffer[100] = -1
    assert alias[0, 0] == -1  # not a copy
    written, whole = io.BytesIO(), io.BytesIO()
    torch.save(alias, written)
    torch.save(view, whole)
    assert torch.equal(torch.load(io.BytesIO(written.getvalue()), weights_only=True), view)
    assert len(written.getvalue()) < len(whole.getvalue()) - 700 * view.element_size()  # not the whole buffer
    assert exact_storage(buffer) is buffer
    transposed = buffer[:200].view(20, 10).t()
    assert exact_storage(transposed) is transposed  # left to megatron-core's clone


def _copies(buckets: list, owners: list[torch.Tensor]) -> tuple[int, int]:
    """The tensors in megatron-core write buckets, and how many of them lie outside the storages
    of `owners` (copies of their memory rather than the memory itself)."""
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in owners]
    written = [tensor for _, _, (_, tensors) in buckets for _, tensor in tensors]
    return len(written), sum(not any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in written)


class _TinyTrainer:
    """The tiny model with megatron DDP and the distributed optimizer (inside a started runtime),
    a training step on fixed tokens, and the tensors of its state."""

    def __init__(self, precision: str, seed: int, layout: Any) -> None:
        from qwen2_megatron.model.builder import build_model
        from qwen2_megatron.model.presets import get_preset
        from qwen2_megatron.parallel.ddp import wrap_ddp
        from qwen2_megatron.train.config import OptimConfig
        from qwen2_megatron.train.optimizer import build_optimizer

        self.shape = get_preset("tiny")
        self.chunks = wrap_ddp(build_model(self.shape, layout, precision), use_distributed_optimizer=True)
        self.optimizer = build_optimizer(OptimConfig(lr=1e-2), precision, self.chunks)
        self.models = [c.module for c in self.chunks]
        tokens = torch.randint(0, self.shape.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
        self.batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32)}

    def step(self) -> None:
        from qwen2_megatron.model.forward import forward_backward

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward(self.chunks, [self.batch])
        self.optimizer.step()

    def tensors(self) -> list[torch.Tensor]:
        """The weights, the optimizer's parameters and Adam's states (the live tensors)."""
        from qwen2_megatron.train.optimizer import adam_tensors

        stepped, states = adam_tensors(self.optimizer)
        return [*(p.detach() for m in self.models for p in m.parameters()), *stepped, *states]


def save_from_trainer_memory(directory: str, precision: str) -> tuple[int, int, int]:
    """One rank: train a step, start an asynchronous training save, and count the tensors its
    writer was given and those of them outside the memory of the model and the optimizer (the
    copies megatron-core makes of views); then write it, load it back after another step and
    count the tensors that differ from the saved state."""
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.location import location
    from qwen2_megatron.checkpoint.model_checkpoint import start_write_results_server
    from qwen2_megatron.checkpoint.train_checkpoint import capture_training, load_training, write_training
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    start_write_results_server()
    runtime = init_runtime(ParallelLayout())
    try:
        trainer = _TinyTrainer(precision, 0, runtime.layout)
        trainer.step()
        path = location(directory)
        path.mkdir(parents=True)
        snapshot = capture_training(trainer.models, trainer.optimizer, {"step": 1})
        request = write_training(path, snapshot, trainer.shape, runtime.layout, precision, asynchronous=True,
                                 strategy=RunSaveStrategy(2))
        written, outside = _copies(request.async_fn_args[1], trainer.tensors())
        saved = [t.clone() for t in trainer.tensors()]
        request.execute_sync()
        trainer.step()
        load_training(path, trainer.models, trainer.optimizer, trainer.shape, runtime.layout)
        differ = sum(not torch.equal(a, b) for a, b in zip(saved, trainer.tensors(), strict=True))
        dist.barrier()
        return written, outside, differ
    finally:
        shutdown_runtime()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_save_writes_the_trainers_memory_uncopied(tmp_path: Path, precision: str) -> None:
    written, outside, differ = spawn(save_from_trainer_memory, 1, str(tmp_path / "ckpt"), precision)[0]
    assert written > 10
    assert outside == 0, f"{outside} of {written} shards are not the trainer's memory but copies of it"
    assert differ == 0, f"{differ} tensors differ from the saved state after loading the checkpoint back"


def model_save_copies(directory: str) -> tuple[int, int]:
    """One rank: a model-only save as qwen2-convert import writes it (no DDP, fused fc1 weights);
    the tensors megatron-core's writer prepared, and those of them outside the model's memory."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from qwen2_megatron.checkpoint.model_checkpoint import save_model
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    shape = get_preset("tiny")
    runtime = init_runtime(ParallelLayout())
    try:
        chunks = build_model(shape, runtime.layout, "bf16", local_spec=True)
        buckets: list = []
        prepare = FileSystemWriterAsync.prepare_write_data

        def observed(writer: FileSystemWriterAsync, plan: object, planner: object) -> None:
            prepare(writer, plan, planner)
            buckets.extend(writer.write_buckets)

        FileSystemWriterAsync.prepare_write_data = observed
        save_model(chunks, directory, shape, runtime.layout, "bf16")
        return _copies(buckets, [p.detach() for chunk in chunks for p in chunk.parameters()])
    finally:
        shutdown_runtime()


def test_model_save_writes_the_models_memory_uncopied(tmp_path: Path) -> None:
    written, outside = spawn(model_save_copies, 1, str(tmp_path / "model"))[0]
    assert written > 10
    assert outside == 0, f"{outside} of {written} shards are copies (the fused fc1 halves are views)"


class _RecordingStrategy(RunSaveStrategy):
    """Records what each save was given: (the strategy's identity, validate)."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.given: list[tuple[int, bool]] = []

    def get(self, sharded_state_dict: dict) -> tuple:
        strategy, validate = super().get(sharded_state_dict)
        self.given.append((id(strategy), validate))
        return strategy, validate


def _count_object_collectives() -> list[int]:
    """From now on in this process, count torch.distributed's object collectives (megatron's
    validation, distribution and planning all-gather Python objects) into the returned [count]."""
    import torch.distributed as dist

    collectives = [0]
    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"):
        original = getattr(dist, name)

        def counted(*args: object, _original: object = original, **kwargs: object) -> object:
            collectives[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return collectives


def reused_plans(directory: str) -> dict:
    """Distributed optimizer: three saves of one run (synchronous, synchronous, asynchronous), a
    step between each; what each was given, the object collectives (megatron's validation,
    distribution and planning all-gather Python objects) of each save, whether each checkpoint
    loads back to the state it was saved at; then, on two ranks, a structure that changed on rank
    1 only."""
    import torch.distributed as dist

    from qwen2_megatron.checkpoint import train_checkpoint
    from qwen2_megatron.checkpoint.location import location
    from qwen2_megatron.checkpoint.model_checkpoint import sharded_model_state, start_write_results_server
    from qwen2_megatron.checkpoint.train_checkpoint import capture_training, load_training, write_training
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    start_write_results_server()
    runtime = init_runtime(ParallelLayout())
    collectives = _count_object_collectives()
    try:
        trainer = _TinyTrainer("bf16", dist.get_rank(), runtime.layout)
        models, optimizer = trainer.models, trainer.optimizer
        strategy = _RecordingStrategy(2)
        saved, paths, per_save = [], [], []
        for index in range(3):
            trainer.step()
            path = location(directory) / f"save_{index}"
            if dist.get_rank() == 0:
                path.mkdir(parents=True)
            dist.barrier()
            saved.append([t.clone() for t in trainer.tensors()])
            before = collectives[0]
            snapshot = capture_training(models, optimizer, {"step": index})
            request = write_training(path, snapshot, trainer.shape, runtime.layout, "bf16",
                                     asynchronous=index == 2, strategy=strategy)
            per_save.append(collectives[0] - before)
            if request is not None:
                request.execute_sync()  # writes, then finalises (the description files)
            paths.append(path)
        trainer.step()
        differ = []
        for path, expected in zip(paths, saved, strict=True):
            load_training(path, models, optimizer, trainer.shape, runtime.layout)
            differ.append(sum(not torch.equal(a, b) for a, b in zip(expected, trainer.tensors(), strict=True)))
        if dist.get_world_size() > 1:  # rank 1's state changes structure (its model alone), rank 0's does not
            full = train_checkpoint._sharded_state(models, optimizer, is_loading=False)
            strategy.get(sharded_model_state(models) if dist.get_rank() == 1 else full)
        return {"given": strategy.given, "object_collectives": per_save, "differ": differ}
    finally:
        shutdown_runtime()


@pytest.mark.parametrize("nproc", [1, 2])
def test_later_saves_reuse_the_plans_and_write_their_own_state(tmp_path: Path, nproc: int) -> None:
    """Two ranks: the data-parallel ranks share the writing of the replicated shards; one rank:
    nothing to share, and no sharding validated again after the first save either."""
    results = spawn(reused_plans, nproc, str(tmp_path / "ckpt"))
    for rank, result in enumerate(results):
        given = result["given"]
        ids, validated = [g[0] for g in given], [g[1] for g in given]
        assert validated == [True, False, False] + [True] * (nproc > 1), f"rank {rank}: validated {validated}"
        assert len(set(ids[:3])) == 1 and (nproc == 1 or ids[3] != ids[0]), f"rank {rank}: strategies {ids}"
        # the second save gathers the plans once more (megatron checks the merged plan against its
        # cache before trusting it); from the third on, none
        first, second, third = result["object_collectives"]
        assert first > second and third == 0, f"rank {rank}: object collectives per save {result['object_collectives']}"
        assert result["differ"] == [0, 0, 0], f"rank {rank}: tensors differing from the saved state {result['differ']}"


def staged_save(directory: str) -> dict:
    """Distributed optimizer, checkpoint.async_copy=overlap: a step, a save, then a step as the
    trainer runs it (before_update between its backward and its update), the writer's poll and
    the wait for the checkpoint; what the save and before_update did, and whether the checkpoint
    loads back to the state of the step that saved."""
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.config import CheckpointConfig
    from qwen2_megatron.checkpoint.manager import CheckpointManager
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime(ParallelLayout())
    try:
        trainer = _TinyTrainer("bf16", dist.get_rank(), runtime.layout)
        manager = CheckpointManager(CheckpointConfig(dir=directory, async_save=True, async_copy="overlap"),
                                    trainer.shape, runtime.layout, "bf16")
        collectives = _count_object_collectives()
        trainer.step()
        saved = [t.clone() for t in trainer.tensors()]
        path = manager.save(1, trainer.models, trainer.optimizer, {"step": 1})
        at_save = collectives[0]
        files_at_save = sorted(p.name for p in manager.store.partial_path(1).rglob("*"))
        for chunk in trainer.chunks:
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        forward_backward(trainer.chunks, [trainer.batch])
        manager.before_update()
        at_update = collectives[0] - at_save
        trainer.optimizer.step()
        manager.poll()  # starts the writer
        manager.wait()
        changed = sum(not torch.equal(a, b) for a, b in zip(saved, trainer.tensors(), strict=True))
        state = manager.resume(trainer.models, trainer.optimizer)
        differ = sum(not torch.equal(a, b) for a, b in zip(saved, trainer.tensors(), strict=True))
        return {"object_collectives_at_save": at_save, "files_at_save": files_at_save,
                "object_collectives_at_update": at_update, "published": path.exists(), "resumed_step": state["step"],
                "changed_by_the_step": changed, "differ": differ}
    finally:
        shutdown_runtime()


def test_staged_save_captures_at_the_save_and_writes_from_the_next_update(tmp_path: Path) -> None:
    """The step that saves only captures its state: megatron's planning and the copy to host memory
    run at the next step's before_update, while its forward and backward keep the device busy.
    What is written is still the state of the step that saved, not the next step's."""
    for rank, result in enumerate(spawn(staged_save, 2, str(tmp_path / "run"))):
        assert result["object_collectives_at_save"] == 0, f"rank {rank}: {result}"
        assert result["files_at_save"] == [], f"rank {rank}: written at the save: {result['files_at_save']}"
        assert result["object_collectives_at_update"] > 0, f"rank {rank}: megatron did not plan at the update"
        assert result["published"] and result["resumed_step"] == 1, f"rank {rank}: {result}"
        assert result["changed_by_the_step"] > 0, f"rank {rank}: the step after the save changed nothing"
        assert result["differ"] == 0, f"rank {rank}: {result['differ']} tensors differ from the saved state"


def _count_forks() -> list[int]:
    """From now on in this process, count os.fork calls (megatron forks its per-save writer) into
    the returned [count]."""
    import os

    forks, original = [0], os.fork

    def counted() -> int:
        forks[0] += 1
        return original()

    os.fork = counted
    return forks


def _writers() -> list:
    import torch.multiprocessing as mp

    return [p for p in mp.active_children() if p.name.startswith("checkpoint-writer")]


def persistent_saves(directory: str) -> dict:
    """Distributed optimizer, checkpoint.async_writer=persistent, async_copy=overlap (the copy
    during the next step, as on a GPU): two saves, each followed by a step beside its writer; the writer processes seen, the forks made, whether each checkpoint
    loads back to the state it was saved at, and how the writer ended after the manager closed."""
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.config import CheckpointConfig
    from qwen2_megatron.checkpoint.manager import CheckpointManager
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime(ParallelLayout())
    try:
        trainer = _TinyTrainer("bf16", dist.get_rank(), runtime.layout)
        manager = CheckpointManager(
            CheckpointConfig(dir=directory, async_save=True, async_copy="overlap", async_writer="persistent",
                             keep_last=5), trainer.shape, runtime.layout, "bf16")
        forks = _count_forks()
        writers, saved = [], []
        for step in (1, 2):
            trainer.step()
            saved.append([t.clone() for t in trainer.tensors()])
            manager.save(step, trainer.models, trainer.optimizer, {"step": step})
            for chunk in trainer.chunks:  # the next step, as the trainer runs it
                chunk.zero_grad_buffer()
            trainer.optimizer.zero_grad()
            forward_backward(trainer.chunks, [trainer.batch])
            manager.before_update()
            trainer.optimizer.step()
            manager.poll()
            writers.append([p.pid for p in _writers()])
            manager.wait()
        differ = []
        for step, expected in zip((1, 2), saved, strict=True):
            manager.cfg.resume = str(manager.store.path(step))
            manager.resume(trainer.models, trainer.optimizer)
            differ.append(sum(not torch.equal(a, b) for a, b in zip(expected, trainer.tensors(), strict=True)))
        (writer,) = _writers()
        manager.close()
        writer.join(timeout=60)
        return {"writers": writers, "forks": forks[0], "differ": differ, "exitcode": writer.exitcode}
    finally:
        shutdown_runtime()


def test_persistent_writer_writes_every_save_without_forking(tmp_path: Path) -> None:
    """One writer process per rank, started with the manager, writes all of a run's saves: the
    trainer forks nothing, each checkpoint is the state of the step that saved (the writer reads
    the staging buffers, never the live state the next step changes), and closing stops it.
    (async_copy=at_save with this writer: test_checkpoint.py's exact resume.)"""
    results = spawn(persistent_saves, 2, str(tmp_path / "run"))
    assert results[0]["writers"] != results[1]["writers"]  # one per rank
    for rank, result in enumerate(results):
        first = result["writers"][0]
        assert len(first) == 1 and result["writers"] == [first] * 2, f"rank {rank}: writers {result['writers']}"
        assert result["forks"] == 0, f"rank {rank}: {result['forks']} forks"
        assert result["differ"] == [0, 0], f"rank {rank}: tensors differing from the saved states {result['differ']}"
        assert result["exitcode"] == 0, f"rank {rank}: the writer ended with {result['exitcode']}"


def killed_writer(directory: str) -> dict:
    """checkpoint.async_writer=persistent on one rank: the writer is killed (kill -9), then a save;
    what waiting for it raises, and what the store lists."""
    import os
    import signal

    from qwen2_megatron.checkpoint.config import CheckpointConfig
    from qwen2_megatron.checkpoint.manager import CheckpointManager
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime(ParallelLayout())
    try:
        trainer = _TinyTrainer("bf16", 0, runtime.layout)
        manager = CheckpointManager(CheckpointConfig(dir=directory, async_save=True, async_writer="persistent"),
                                    trainer.shape, runtime.layout, "bf16")
        (writer,) = _writers()
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        trainer.step()
        manager.save(1, trainer.models, trainer.optimizer, {"step": 1})
        try:
            manager.wait()
            error = None
        except Exception as err:  # noqa: BLE001 - what it is, is the test's to check
            error = f"{type(err).__name__}: {err}"
        manager.abort()
        manager.close()
        listing = manager.store.listing()
        return {"error": error, "pid": writer.pid, "complete": listing.complete, "incomplete": listing.incomplete}
    finally:
        shutdown_runtime()


def test_killed_persistent_writer_fails_the_save_by_name(tmp_path: Path) -> None:
    """A writer that died does not leave the trainer waiting forever: the wait fails naming the
    process and its signal, and the checkpoint stays unpublished (partial, ignored at the next start)."""
    (result,) = spawn(killed_writer, 1, str(tmp_path / "run"), timeout_s=300)  # a regression would wait forever
    assert result["error"] is not None and result["error"].startswith("WriterDiedError"), result
    assert f"pid {result['pid']}" in result["error"] and "code -9" in result["error"], result["error"]
    assert result["complete"] == [] and len(result["incomplete"]) == 1, result


def test_staging_buffers_are_kept_from_save_to_save() -> None:
    """The same buffers while the files keep their sizes (a run's saves), new ones when they change;
    in shared memory for a persistent writer, which maps them instead of receiving copies."""
    from qwen2_megatron.checkpoint.staging import StagingBuffers

    for shared in (False, True):
        buffers = StagingBuffers(shared)
        first = buffers.get([1024, 64], pinned=False)
        assert [b.numel() for b in first] == [1024, 64] and all(b.is_shared() == shared for b in first)
        assert [b.data_ptr() for b in buffers.get([1024, 64], pinned=False)] == [b.data_ptr() for b in first]
        assert [b.numel() for b in buffers.get([2048], pinned=False)] == [2048]


def test_too_little_shared_memory_is_refused_before_staging() -> None:
    import shutil

    from qwen2_megatron.checkpoint.staging import StagingBuffers, StagingSpaceError

    free = shutil.disk_usage("/dev/shm").free
    with pytest.raises(StagingSpaceError, match=r"/dev/shm has .* GiB free.*--shm-size.*checkpoint.async_writer=fork"):
        StagingBuffers(shared=True).get([free + (1 << 30)], pinned=False)


_RANK_WITH_HELPERS = """
import multiprocessing, os, signal, sys, time
import torch.distributed as dist
from qwen2_megatron.checkpoint.model_checkpoint import start_write_results_server
from qwen2_megatron.checkpoint.writer_process import PersistentWriter
from qwen2_megatron.parallel.local_launch import free_port

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's, which defers SIGTERM
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    start_write_results_server()
    writer = PersistentWriter()
    print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in "ZX"


def test_checkpoint_helpers_end_with_a_killed_rank(tmp_path: Path) -> None:
    """A rank SIGKILLed (the out-of-memory killer, torchrun ending a failed job, `timeout`) cannot
    stop its helper processes: megatron's write-results server (forked, so with the trainer's
    SIGTERM handler) and the persistent writer (blocked on its queue) end with it instead of
    living on with the rank's stdout open."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "rank.py"
    script.write_text(_RANK_WITH_HELPERS)
    rank = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        helpers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(helpers) == 2 and all(map(_running, helpers)), helpers
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 20
    while any(map(_running, helpers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in helpers if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"helpers still running after their rank was killed: {left}"
