"""Training configuration: invalid settings fail before any process starts; schedules are right."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.parallel.layout import LayoutError, ParallelLayout
from qwen2_megatron.train.config import ConfigError, OptimConfig, StageConfig, TrainConfig, TrainerConfig, validate
from qwen2_megatron.train.optimizer import build_scheduler


def _cfg(**sections) -> TrainerConfig:
    cfg = TrainerConfig()
    for name, changes in sections.items():
        setattr(cfg, name, replace(getattr(cfg, name), **changes) if isinstance(changes, dict) else changes)
    return cfg


@pytest.mark.parametrize(
    "sections, world, message",
    [
        ({"optim": {"schedule": "linear"}}, 2, "optim.schedule='linear': choose one of"),
        ({"train": {"precision": "fp16"}}, 2, "train.precision='fp16'"),
        ({"train": {"precision": "fp8"}}, 2, "fp8 needs Transformer Engine"),
        ({"train": {"recompute": "some"}}, 2, "train.recompute='some'"),
        ({"train": {"on_nonfinite": "ignore"}}, 2, "train.on_nonfinite='ignore'"),
        ({"train": {"steps": 0}}, 2, "train.steps=0 must be >= 1"),
        ({"checkpoint": {"write_threads": 0}}, 2, "checkpoint.write_threads=0 must be >= 1"),
        ({"checkpoint": {"async_copy": "later"}}, 2, "checkpoint.async_copy='later': choose one of"),
        ({"checkpoint": {"async_writer": "thread"}}, 2, "checkpoint.async_writer='thread': choose one of"),
        ({"checkpoint": {"async_writer": "persistent"}}, 2,
         "checkpoint.async_writer=persistent writes asynchronous saves: set checkpoint.async_save=true as well"),
        ({"optim": {"fp32_master_weights": False, "distributed_optimizer": False}}, 2,
         "optim.fp32_master_weights=false applies to train.precision=bf16 (not fp32)"),
        ({"optim": {"fp32_master_weights": False}, "train": {"precision": "bf16"}}, 2,
         "optim.fp32_master_weights=false needs optim.distributed_optimizer=false"),
        ({"train": {"global_batch_size": 6}}, 2, "global_batch_size=6 is not a multiple of micro_batch_size x data-parallel size = 2 x 2 = 4; use 4"),
        ({"optim": {"lr": 1e-3, "min_lr": 1e-2}}, 2, "need 0 <= min_lr <= lr"),
        ({"optim": {"warmup_steps": 300}}, 2, "optim.warmup_steps=300 must be in [0, decay steps=300)"),
        ({"optim": {"schedule": "wsd", "wsd_decay_steps": 290}}, 2, "wsd_decay_steps=290 is longer"),
        ({"train": {"stages": [StageConfig(start_step=400, seq_length=256)]}}, 2, "start_step=400 must be inside (0, 300)"),
        ({"train": {"stages": [StageConfig(start_step=10, seq_length=64), StageConfig(start_step=5, seq_length=64)]}}, 2, "increasing, distinct start_step"),
        ({"parallel": ParallelLayout(pp=2, vpp=2), "train": {"global_batch_size": 2, "micro_batch_size": 2}}, 2, "needs the number of micro-batches (1) to be a multiple of pp=2"),
        ({"log": {"peak_tflops": -1.0}}, 2, "log.peak_tflops=-1.0 must be positive"),
        ({"log": {"wandb": {"mode": "cloud"}}}, 2, "log.wandb.mode='cloud'"),
        ({"data": {"num_lanes": 3}}, 2, "data.num_lanes=3 is not a multiple of the data-parallel size 2"),
    ],
)
def test_invalid_training_config_is_rejected(sections: dict, world: int, message: str) -> None:
    if "log" in sections and "wandb" in sections["log"]:
        sections["log"] = replace(TrainerConfig().log, wandb=replace(TrainerConfig().log.wandb, **sections["log"]["wandb"]))
    with pytest.raises(ConfigError) as err:
        validate(_cfg(**sections), world)
    assert message in str(err.value)


def test_flat_adam_where_megatron_uses_another_adam_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """optim.flat_adam replaces torch's AdamW; with Transformer Engine or apex megatron-core takes
    their FusedAdam, and the run stops before any model is built."""
    from megatron.core import optimizer as mcore_optimizer

    assert validate(_cfg(optim={"flat_adam": True}), 2).dp == 2  # torch's AdamW here
    monkeypatch.setattr(mcore_optimizer, "Adam", type("FusedAdam", (), {"__module__": "transformer_engine.optimizers"}))
    with pytest.raises(ConfigError, match=r"here it uses transformer_engine.optimizers.FusedAdam: set optim.flat_adam=false"):
        validate(_cfg(optim={"flat_adam": True}), 2)
    assert validate(_cfg(), 2).dp == 2


def test_layout_problems_surface_through_validate() -> None:
    with pytest.raises(LayoutError, match="world size 3 is not divisible"):
        validate(_cfg(parallel=ParallelLayout(tp=2)), 3)
    with pytest.raises(LayoutError, match="exceeds model.max_position_embeddings"):
        validate(_cfg(train={"stages": [StageConfig(start_step=10, seq_length=65536)]}), 2)


def test_qwen2_7b_recipe_layout_validates() -> None:
    cfg = _cfg(
        model=get_preset("qwen2_7b"), parallel=ParallelLayout(tp=2, sequence_parallel=True),
        train={"global_batch_size": 1024, "micro_batch_size": 1, "seq_length": 4096, "steps": 1000,
               "stages": [StageConfig(start_step=900, seq_length=32768, rope_theta=1e6)]},
        optim={"warmup_steps": 500}, data={"num_lanes": 64},
    )
    assert validate(cfg, 64).dp == 32


class _Optimizer(SimpleNamespace):
    """The one attribute megatron's scheduler uses."""


def _lrs(optim: OptimConfig, steps: int, at: list[int]) -> list[float]:
    opt = _Optimizer(param_groups=[{"lr": 0.0, "weight_decay": 0.0}])
    scheduler = build_scheduler(optim, TrainConfig(steps=steps), opt)
    values, done = [], 0
    for step in at:
        scheduler.step(increment=step - done)
        done = step
        values.append(opt.param_groups[0]["lr"])
    return values


def test_cosine_schedule_values() -> None:
    lrs = _lrs(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine"), 110, [5, 10, 60, 110, 200])
    expected = [5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), 1e-4, 1e-4]
    assert lrs == pytest.approx(expected)


def test_wsd_schedule_values() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, schedule="wsd", wsd_decay_steps=20, wsd_decay_style="linear")
    assert _lrs(optim, 100, [10, 50, 80, 90, 100]) == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 0.0])


def test_constant_schedule_values() -> None:
    assert _lrs(OptimConfig(lr=2e-4, warmup_steps=4, schedule="constant"), 50, [2, 4, 40]) == pytest.approx([1e-4, 2e-4, 2e-4])


@pytest.mark.parametrize(
    "experiment, world, dp",
    [("qwen2_0.5b", 8, 8), ("qwen2_1.5b", 8, 8), ("qwen2_7b", 8, 4), ("qwen2_72b", 64, 2), ("qwen2_57b_a14b", 16, 8)],
)
def test_experiment_recipes_compose_and_validate(experiment: str, world: int, dp: int) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qwen2_megatron.cli.train import CONF_DIR, _register

    _register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[f"+experiment={experiment}"]))
    assert cfg.model == replace(get_preset(experiment), rope_theta=10000.0)
    assert validate(cfg, world).dp == dp
    assert cfg.train.stages[0].rope_theta == 1e6 and cfg.train.precision == "bf16"
