"""Full training state: model, optimizer, schedule, data position, RNG, counters.

Model and optimizer go through megatron-core's dist_checkpointing (torch_dist): every rank writes
its own shards in parallel (weights replicated over data-parallel ranks are split among them by
megatron's fully parallel save), and the distributed optimizer's state is saved per parameter in
model space (optimizer_shards.py), so a run may resume with another TP / PP / EP / DP layout.
Everything else is small and JSON (train_state.json), except each rank's RNG state
(rng/rank_N.pt, plain tensors and numbers, loaded with torch.load(weights_only=True): nothing in a
checkpoint is ever executed).

Without Transformer Engine or apex, megatron-core restores Adam's step counter from the live
optimizer instead of the checkpoint (platform.md); the step is therefore also saved here and put
back into the optimizer after loading.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

from qwen2_megatron.checkpoint.location import Location, torch_load_weights, torch_save, write_text_atomic
from qwen2_megatron.checkpoint.model_checkpoint import (
    CheckpointMismatchError,
    check_shape,
    read_info,
    restore_model_state,
    sharded_model_state,
    write_info,
)
from qwen2_megatron.checkpoint.optimizer_shards import restore_optimizer_state, sharded_optimizer_state
from qwen2_megatron.checkpoint.save_strategy import RunSaveStrategy
from qwen2_megatron.checkpoint.store import TRAIN_STATE
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.train.optimizer import adam_step_tensor, inner_optimizers

# megatron-core's own background writer (a forked process per save). The alternative, "nvrx",
# needs nvidia-resiliency-ext, which has no wheel for this Python.
ASYNC_STRATEGY = "mcore"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose files cannot be read back."""


def _sharded_state(chunks: list[torch.nn.Module], optimizer: Any, is_loading: bool) -> dict[str, Any]:
    state = sharded_model_state(chunks)
    state["optimizer"] = sharded_optimizer_state(optimizer, state, is_loading)
    return state


def _load_strategy(fully_parallel: bool) -> TorchDistLoadShardedStrategy | FullyParallelLoadStrategyWrapper:
    """torch_dist; fully_parallel: what data-parallel ranks hold alike (the weights) is read in
    disjoint parts by them and exchanged (checkpoint.fully_parallel_load)."""
    if not fully_parallel:
        return TorchDistLoadShardedStrategy()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), group)


@dataclass
class TrainingSnapshot:
    """One step's checkpoint as captured at that step, before anything is written.

    `sharded` is the sharded state dict: views of the live weights and optimizer state, which
    stay the step's state until the next optimizer update; its other leaves (the optimizer's
    common state) hold no device tensors, so that writing it later reads nothing from the device.
    `state` is train_state.json's content and `rng` this rank's RNG states, both copied now."""

    sharded: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any]

    @property
    def on_gpu(self) -> bool:
        """Whether any shard lives on a GPU."""
        return any(isinstance(v, ShardedTensor) and v.data is not None and v.data.is_cuda
                   for v in nested_values(self.sharded))


def capture_training(chunks: list[torch.nn.Module], optimizer: Any, train_state: dict[str, Any]) -> TrainingSnapshot:
    """Everything a checkpoint of the current step holds (no communication)."""
    state = {**train_state, "adam_step": _adam_step(optimizer), "optimizer": optimizer_kinds(optimizer),
             "world_size": dist.get_world_size()}
    sharded = _sharded_state(chunks, optimizer, is_loading=False)
    dict_list_map_inplace(_common_on_host, sharded)
    return TrainingSnapshot(sharded, state, _rng_state())


def _common_on_host(value: Any) -> Any:
    """A device tensor of the common state (an optimizer's step) as a host copy."""
    if isinstance(value, ShardedObject) and isinstance(value.data, torch.Tensor) and value.data.is_cuda:
        value.data = value.data.cpu()
    elif isinstance(value, torch.Tensor) and value.is_cuda:
        return value.cpu()
    return value


def write_training(
    path: Location,
    snapshot: TrainingSnapshot,
    shape: Qwen2Shape,
    layout: ParallelLayout,
    precision: str,
    asynchronous: bool,
    strategy: RunSaveStrategy,
) -> AsyncRequest | None:
    """Collective. Writes a captured step into `path` (a partial directory); train_state.json is
    written last.

    With `asynchronous`, the shards are written by megatron-core's background writer and the
    returned request must be scheduled on an AsyncCallsQueue; its finalisation writes the
    description files. `strategy`: the run's (its saves reuse megatron's plans).
    """
    describe = partial(_write_description, path, shape, layout, precision, snapshot.state)
    sharded_strategy, validate = strategy.get(snapshot.sharded)
    request = dist_checkpointing.save(
        snapshot.sharded,
        str(path),
        sharded_strategy=sharded_strategy,
        validate_access_integrity=validate,
        async_sharded_save=asynchronous,
        async_strategy=ASYNC_STRATEGY,
    )
    (path / "rng").mkdir(exist_ok=True)  # after: megatron warns about a non-empty directory
    torch_save(snapshot.rng, path / "rng" / f"rank_{dist.get_rank():05d}.pt")
    if request is None:
        describe()
        return None
    request.add_finalize_fn(describe)
    return request


def _write_description(
    path: Location, shape: Qwen2Shape, layout: ParallelLayout, precision: str, state: dict[str, Any]
) -> None:
    """Collective, after every rank's shards are written: rank 0 writes the description and,
    last, train_state.json (its presence marks the checkpoint complete)."""
    dist.barrier()
    if dist.get_rank() == 0:
        write_info(path, shape, layout, precision)
        write_text_atomic(path / TRAIN_STATE, json.dumps(state, indent=1) + "\n")
    dist.barrier()


def load_training(
    path: Location,
    chunks: list[torch.nn.Module],
    optimizer: Any,
    shape: Qwen2Shape,
    layout: ParallelLayout,
    fully_parallel: bool = False,
) -> dict[str, Any]:
    """Collective. Restores model, optimizer and (same layout only) RNG; returns train_state.
    fully_parallel: spread the reading of the weights over the data-parallel ranks."""
    check_shape(path, shape)
    state_file = path / TRAIN_STATE
    try:
        train_state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{state_file} cannot be read ({err})") from None
    _check_optimizer_kinds(path, train_state.get("optimizer"), optimizer_kinds(optimizer))
    _initialise_states(optimizer)
    try:
        sharded = _sharded_state(chunks, optimizer, is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(path), sharded_strategy=_load_strategy(fully_parallel))
    except Exception as err:  # noqa: BLE001 - any read failure means the same thing to the user
        raise CorruptCheckpointError(
            f"{path}: the model/optimizer shards cannot be read ({type(err).__name__}: {err}); "
            "a file is truncated, corrupted or missing"
        ) from err
    restore_model_state(chunks, loaded)
    with torch.no_grad():  # the distributed optimizer's fp32 main params are views of the weights
        restore_optimizer_state(optimizer, sharded_model_state(chunks), loaded["optimizer"])
    _set_adam_step(optimizer, train_state["adam_step"])
    same_layout = read_info(path)["layout"] == asdict(layout) and train_state["world_size"] == dist.get_world_size()
    if same_layout:
        _set_rng_state(torch_load_weights(path / "rng" / f"rank_{dist.get_rank():05d}.pt"))
    train_state["rng_restored"] = same_layout
    dist.barrier()  # megatron's load does not wait for the other ranks' reads to finish
    return train_state


# The settings that select each of megatron's optimizers, whose checkpoint states differ in form.
_KIND_SETTINGS = {
    "DistributedOptimizer": "optim.distributed_optimizer=true",
    "Float16OptimizerWithFloat16Params": "optim.distributed_optimizer=false with train.precision=bf16 "
                                         "(fp32 master weights)",
    "FP32Optimizer": "optim.distributed_optimizer=false with train.precision=fp32 or "
                     "optim.fp32_master_weights=false",
}


def optimizer_kinds(optimizer: Any) -> list[str]:
    """The class of each of megatron's inner optimizers (MoE: dense, then experts)."""
    return [type(inner).__name__ for inner in inner_optimizers(optimizer)]


def _check_optimizer_kinds(path: Location, saved: list[str] | None, live: list[str]) -> None:
    """Refuse, before reading any shard, a checkpoint whose optimizer state has another form than
    this run's optimizer keeps (checkpoints written before the kinds were recorded are not checked)."""
    if saved is None or saved == live:
        return
    raise CheckpointMismatchError(
        f"{path}: its optimizer state was written by megatron's {saved[0]} ({_KIND_SETTINGS.get(saved[0], '?')}), "
        f"this run's optimizer is {live[0]} ({_KIND_SETTINGS.get(live[0], '?')}); resume with the settings it "
        "was saved with, or start from its weights alone with train.init_from=<checkpoint> checkpoint.resume=none"
    )


def _initialise_states(optimizer: Any) -> None:
    """A fresh torch Adam has no state; megatron's loading path needs it, with a step entry."""
    for inner in inner_optimizers(optimizer):
        if not inner.optimizer.state and getattr(inner, "init_state_fn", None) is not None:
            inner.init_state_fn(inner.optimizer, inner.config)
        for group, param, state in _adam_states(inner.optimizer):
            state.setdefault("step", adam_step_tensor(group, param, 0))


def _adam_step(optimizer: Any) -> int:
    steps = {
        int(state["step"])
        for inner in inner_optimizers(optimizer)
        for state in inner.optimizer.state.values()
        if "step" in state
    }
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on Adam's step: {sorted(steps)}")
    return steps.pop() if steps else 0


def _set_adam_step(optimizer: Any, step: int) -> None:
    for inner in inner_optimizers(optimizer):
        for group, param, state in _adam_states(inner.optimizer):
            state["step"] = adam_step_tensor(group, param, step)


def _adam_states(adam: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]]:
    """(parameter group, parameter, its state) for every parameter that has state."""
    for group in adam.param_groups:
        for param in group["params"]:
            if param in adam.state:
                yield group, param, adam.state[param]


def _rng_state() -> dict[str, Any]:
    keys, position, has_gauss, gauss = np.random.get_state()[1:]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
