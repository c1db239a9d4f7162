"""Rank function for tests/test_optimizer_shards.py: the same trained optimizer saved in our
parallel format and in megatron's fully_reshardable format, for several layouts."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from qwen2_megatron.model.shape import Qwen2Shape


def save_both_formats(root: str, cases: list[tuple[str, Qwen2Shape, dict, str, dict]]) -> list[str]:
    """cases: (name, shape, layout kwargs, precision, build_model kwargs). Writes
    root/name/{ours,megatron}."""
    from megatron.core import dist_checkpointing

    from qwen2_megatron.checkpoint.model_checkpoint import sharded_model_state
    from qwen2_megatron.checkpoint.optimizer_shards import sharded_optimizer_state
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import build_optimizer

    done = []
    for name, shape, layout, precision, build in cases:
        runtime = init_runtime(ParallelLayout(**layout))
        chunks = wrap_ddp(build_model(shape, runtime.layout, precision, **build), use_distributed_optimizer=True)
        optimizer = build_optimizer(OptimConfig(lr=1e-2), precision, chunks)
        tokens = torch.randint(0, shape.vocab_size, (2, 33), generator=torch.Generator().manual_seed(dist.get_rank()))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32)}
        for _ in range(2):  # exp_avg_sq != exp_avg**2 only after two steps
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(chunks, [batch])
            optimizer.step()
        models = [c.module for c in chunks]
        for fmt in ("ours", "megatron"):
            Path(root, name, fmt).mkdir(parents=True, exist_ok=True)
        state = sharded_model_state(models)
        state["optimizer"] = sharded_optimizer_state(optimizer, state, is_loading=False)
        dist_checkpointing.save(state, f"{root}/{name}/ours")
        state = sharded_model_state(models)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
        )
        dist_checkpointing.save(state, f"{root}/{name}/megatron")
        done.append(name)
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return done
