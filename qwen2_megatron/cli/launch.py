"""qwen2-launch: start the trainer locally, under torchrun (one or many nodes) or on SLURM.

It takes qwen2-train's Hydra overrides plus the launcher.* keys, checks the whole launch
(layout against nodes x processes, rendezvous, SLURM time limit and partition) before anything
starts, prints the exact command and runs it (--dry-run: prints only).

  qwen2-launch train.steps=50                                        # local, launcher.nproc processes
  qwen2-launch launcher.mode=torchrun launcher.nnodes=2 launcher.nproc=8 \\
      launcher.rdzv_endpoint=node001:29500 +experiment=qwen2_7b       # run the same line on each node
  qwen2-launch launcher.mode=slurm launcher.nnodes=4 launcher.nproc=8 \\
      launcher.slurm.gpus_per_node=8 launcher.slurm.partition=gpu launcher.slurm.time=04:00:00
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen2_megatron.cli.common import fail
from qwen2_megatron.cli.train import CONF_DIR, _register
from qwen2_megatron.launch import slurm
from qwen2_megatron.launch.checks import check_cluster, validate_launch
from qwen2_megatron.launch.commands import command
from qwen2_megatron.train.config import TrainerConfig


def load_config(overrides: list[str]) -> TrainerConfig:
    """Compose exactly what qwen2-train would compose from these overrides."""
    _register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides))  # type: ignore[return-value]


def pinned(overrides: list[str], run_dir: Path) -> list[str]:
    """The user's overrides with run.dir made absolute: every rank, node and restart writes there."""
    return [o for o in overrides if not o.lstrip("+~").startswith("run.dir=")] + [f"run.dir={run_dir}"]


def launch(cfg: TrainerConfig, overrides: list[str], dry_run: bool) -> int:
    from qwen2_megatron.model.spec import use_transformer_engine

    lc = cfg.launcher
    validate_launch(cfg, have_te=bool(lc.slurm.gpus_per_node) if lc.mode == "slurm" else use_transformer_engine())
    run_dir = Path(cfg.run.dir).resolve()
    args = pinned(overrides, run_dir)
    if lc.mode != "slurm":
        argv = command(lc, args)
        print(shlex.join(argv), flush=True)
        return 0 if dry_run else subprocess.run(argv).returncode
    script = slurm.render(cfg, args, run_dir)
    path = run_dir / "sbatch.sh"
    if dry_run:
        print(f"# {path} (not written: dry run)\n{script}", flush=True)
        return 0
    check_cluster(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    job = slurm.submit(path)
    print(f"submitted job {job}: logs in {run_dir}/slurm-{job}.log", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qwen2-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command / sbatch script, run nothing")
    parser.add_argument("overrides", nargs="*", help="qwen2-train overrides and launcher.* keys (see conf/)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        sys.exit(launch(cfg, args.overrides, args.dry_run or cfg.launcher.dry_run))
    except (ValueError, RuntimeError, HydraException, OmegaConfBaseException) as err:
        sys.exit(fail(err))


if __name__ == "__main__":
    main()
