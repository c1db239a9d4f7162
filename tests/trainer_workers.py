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
        except (RuntimeError, ValueError) as err:  # ValueError: CheckpointMismatchError
            results.append(f"{type(err).__name__}: {err}")
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return results


def _gloo_threads() -> int:
    return sum((task / "comm").read_text().startswith(("gloo", "pt_gloo")) for task in Path("/proc/self/task").iterdir())


def train_and_release(configs: list[TrainerConfig]) -> tuple[list[list[str]], list[int]]:
    """Train each config, drop the trainer, collect garbage: what is still alive of it (and of a
    trainer that failed to start, its error's name, and its SIGTERM handler if still installed);
    and after each teardown that keeps the default group, this rank's gloo threads."""
    survivors: list[list[str]] = []
    threads: list[int] = []
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
        threads.append(_gloo_threads())
    shutdown_runtime()
    return survivors, threads


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


def train_and_measure_state(configs: list[TrainerConfig]) -> list[dict[str, object]]:
    """Train each config, then measure what it holds per rank: the bytes of the weights, of the
    gradients DDP accumulates into (main_grad), of the optimizer's own tensors (master weights:
    the parameters it steps that are not the model's) and of its states (Adam's m and v), with
    their dtypes."""
    from qwen2_megatron.train.optimizer import adam_tensors

    def size(tensors: list) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    measured = []
    for cfg in configs:
        trainer = Trainer(cfg)
        losses = [r["loss"] for r in trainer.train()]
        weights = [p for chunk in trainer.model for p in chunk.module.parameters()]
        mine = {id(p) for p in weights}
        stepped, states = adam_tensors(trainer.optimizer)
        measured.append({
            "params": sum(p.numel() for p in weights), "losses": losses,
            "weights": size(weights), "grads": size([p.main_grad for p in weights]),
            "master": size([p for p in stepped if id(p) not in mine]), "states": size(states),
            "dtypes": sorted({str(t.dtype) for t in [*(p.main_grad for p in weights), *states]}),
        })
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return measured
