"""A training save writes the trainer's own memory: no host copy of the state before writing
(qwen2_megatron/checkpoint/save_strategy.py), and what is written is that state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from qwen2_megatron.checkpoint.save_strategy import exact_storage
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


def save_from_trainer_memory(directory: str, precision: str) -> tuple[int, int, int]:
    """One rank: train a step, start an asynchronous training save, and count the tensors its
    writer was given and those of them outside the memory of the model and the optimizer (the
    copies megatron-core makes of views); then write it, load it back after another step and
    count the tensors that differ from the saved state."""
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.location import location
    from qwen2_megatron.checkpoint.model_checkpoint import start_write_results_server
    from qwen2_megatron.checkpoint.train_checkpoint import load_training, save_training
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import adam_tensors, build_optimizer

    start_write_results_server()
    shape = get_preset("tiny")
    runtime = init_runtime(ParallelLayout())
    try:
        chunks = wrap_ddp(build_model(shape, runtime.layout, precision), use_distributed_optimizer=True)
        optimizer = build_optimizer(OptimConfig(lr=1e-2), precision, chunks)
        tokens = torch.randint(0, shape.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32)}

        def step() -> None:
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(chunks, [batch])
            optimizer.step()

        def trainer_tensors() -> list[torch.Tensor]:
            stepped, states = adam_tensors(optimizer)
            return [*(p.detach() for c in chunks for p in c.module.parameters()), *stepped, *states]

        step()
        models = [c.module for c in chunks]
        path = location(directory)
        path.mkdir(parents=True)
        request = save_training(path, models, optimizer, shape, runtime.layout, precision, {"step": 1},
                                asynchronous=True, threads=2)
        written, outside = _copies(request.async_fn_args[1], trainer_tensors())
        saved = [t.clone() for t in trainer_tensors()]
        request.execute_sync()
        step()
        load_training(path, models, optimizer, shape, runtime.layout)
        differ = sum(not torch.equal(a, b) for a, b in zip(saved, trainer_tensors(), strict=True))
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
