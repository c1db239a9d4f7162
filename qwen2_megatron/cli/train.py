"""qwen2-train: Hydra-configured pre-training.

Without overrides it runs the embedded default: the tiny Qwen2 on CPU, launcher.nproc=2 processes
over gloo, on the demo corpus. Under torchrun (RANK set) each process runs the trainer itself;
otherwise this command starts launcher.nproc local processes. The config is validated before any
process starts, printed once and saved as <run dir>/config.yaml.

  qwen2-train                                   # the CPU demo
  qwen2-train train.steps=50 parallel.tp=2      # any key, any value
  qwen2-train +experiment=qwen2_7b              # a recipe from conf/experiment
  qwen2-train --cfg job                         # print the composed config and exit
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen2_megatron.model.presets import PRESETS
from qwen2_megatron.train.config import TrainerConfig

CONF_DIR = Path(os.environ.get("QWEN2_MEGATRON_CONF", Path(__file__).resolve().parents[2] / "conf"))


def _register() -> None:
    store = ConfigStore.instance()
    store.store(name="trainer_schema", node=TrainerConfig)
    for name, shape in PRESETS.items():
        store.store(group="model", name=name, node=shape)
    if not OmegaConf.has_resolver("demo_corpus"):
        OmegaConf.register_new_resolver("demo_corpus", _demo_path)


def _demo_path(name: str) -> str:
    from qwen2_megatron.data.demo import SHIPPED, build_demo_corpus

    shipped = SHIPPED / name
    return str(shipped if shipped.exists() else build_demo_corpus() / name)


def train_rank(cfg: TrainerConfig) -> list[float]:
    """One process's training run; returns the per-step losses."""
    from qwen2_megatron.parallel.runtime import shutdown_runtime
    from qwen2_megatron.train.trainer import Trainer

    try:
        return [r["loss"] for r in Trainer(cfg).train()]
    finally:
        shutdown_runtime()


def run(cfg: TrainerConfig) -> list[float]:
    """Validate, then train here (under torchrun) or on launcher.nproc local processes."""
    from qwen2_megatron.model.spec import use_transformer_engine
    from qwen2_megatron.parallel.local_launch import spawn
    from qwen2_megatron.parallel.runtime import process_env
    from qwen2_megatron.train.config import validate

    under_launcher = "RANK" in os.environ
    world = process_env()[1] if under_launcher else cfg.launcher.nproc
    validate(cfg, world, use_transformer_engine())
    if under_launcher:
        return train_rank(cfg)
    return next(r for r in spawn(train_rank, world, cfg, env=cfg.launcher.env) if r is not None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    from qwen2_megatron.parallel.runtime import process_env

    from qwen2_megatron.parallel.local_launch import WorkerError

    main_rank = process_env()[0] == 0
    try:
        cfg: TrainerConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        if main_rank:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), flush=True)
        losses = run(cfg)
    except (ValueError, OmegaConfBaseException) as err:  # config errors name the key and the fix
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerError as err:
        print(f"error: training failed on a rank:\n{err}", file=sys.stderr)
        sys.exit(1)
    if main_rank and losses:
        print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps", flush=True)


def main() -> None:
    _register()
    _hydra_main()


if __name__ == "__main__":
    main()
