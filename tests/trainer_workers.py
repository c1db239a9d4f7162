"""Rank function for the trainer tests: several training runs in one spawn (megatron's import
dominates start-up), each with its own layout; errors come back as text."""

from __future__ import annotations

import gc
import signal
import weakref
from pathlib import Path

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


def train_and_release(configs: list[TrainerConfig]) -> list[list[str]]:
    """Train each config, drop the trainer, collect garbage: what is still alive of it (and of a
    trainer that failed to start, its error's name, and its SIGTERM handler if still installed)."""
    survivors: list[list[str]] = []
    for cfg in configs:
        handler = signal.getsignal(signal.SIGTERM)
        try:
            trainer = Trainer(cfg)
        except Exception as err:
            kept = ["SIGTERM handler"] if signal.getsignal(signal.SIGTERM) is not handler else []
            survivors.append([type(err).__name__, *kept])
            continue
        trainer.train()
        refs = {"trainer": weakref.ref(trainer), "optimizer": weakref.ref(trainer.optimizer),
                "model": weakref.ref(trainer.model[0].module), "ddp": weakref.ref(trainer.model[0])}
        del trainer
        gc.collect()
        survivors.append(sorted(name for name, ref in refs.items() if ref() is not None))
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return survivors


def train_and_list_helpers(configs: list[TrainerConfig]) -> list[bool]:
    """Train each config, then tell for every child process of this rank whether it runs this
    rank's own command line (forked from it) rather than one of its own (spawned: a fresh
    interpreter that imports the whole program again)."""
    for cfg in configs:
        Trainer(cfg).train()
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    mine = Path("/proc/self/cmdline").read_bytes()
    children = [pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]
    return [Path(f"/proc/{pid}/cmdline").read_bytes() == mine for pid in children]
