"""Rank function for the trainer tests: several training runs in one spawn (megatron's import
dominates start-up), each with its own layout; errors come back as text."""

from __future__ import annotations

from qwen2_megatron.parallel.runtime import shutdown_runtime
from qwen2_megatron.train.config import TrainerConfig
from qwen2_megatron.train.trainer import Trainer


def train_configs(configs: list[TrainerConfig]) -> list[list[float] | str]:
    results: list[list[float] | str] = []
    for cfg in configs:
        try:
            results.append([r["loss"] for r in Trainer(cfg).train()])
        except RuntimeError as err:
            results.append(f"{type(err).__name__}: {err}")
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return results
