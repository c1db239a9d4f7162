"""SLURM: render the sbatch script into the run directory and submit it.

One srun task per rank; the batch shell receives USR1 before the time limit, forwards it to the
ranks (which checkpoint and exit 0) and requeues the job unless the run is finished or
launcher.slurm.max_requeues is reached. The requeued job runs the same script and the trainer
resumes from the newest checkpoint (checkpoint.resume=auto). Output of every start is appended
to <run dir>/slurm-<job id>.log.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from qwen2_megatron.launch.commands import train_command
from qwen2_megatron.train.config import TrainerConfig

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "sbatch.template.sh"


def sbatch_directives(cfg: TrainerConfig, run_dir: Path) -> list[str]:
    lc, s = cfg.launcher, cfg.launcher.slurm
    options = [
        f"--job-name={cfg.run.name}", f"--nodes={lc.nnodes}", f"--ntasks-per-node={lc.nproc}",
        f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}", f"--signal=B:USR1@{s.signal_lead_s}",
        "--requeue", "--open-mode=append", f"--output={run_dir}/slurm-%j.log", f"--chdir={os.getcwd()}",
    ]
    named = {"partition": s.partition, "account": s.account, "qos": s.qos}
    options += [f"--{key}={value}" for key, value in named.items() if value]
    if s.gpus_per_node:
        options.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.exclusive:
        options.append("--exclusive")
    return [f"#SBATCH {option}" for option in options + list(s.extra_args)]


def srun_args(cfg: TrainerConfig) -> list[str]:
    """pyxis/enroot: each rank runs in the image, in the submission directory (mount it with
    container_mounts)."""
    s = cfg.launcher.slurm
    if not s.container_image:
        return []
    args = [f"--container-image={s.container_image}", f"--container-workdir={os.getcwd()}"]
    if s.container_mounts:
        args.append(f"--container-mounts={s.container_mounts}")
    return args


def render(cfg: TrainerConfig, overrides: list[str], run_dir: Path) -> str:
    """The sbatch script; inside a container the image's `python` runs the trainer."""
    python = "python" if cfg.launcher.slurm.container_image else sys.executable
    command = train_command(overrides, python)
    values = {
        "DIRECTIVES": "\n".join(sbatch_directives(cfg, run_dir)),
        "EXPORTS": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in cfg.launcher.env.items()),
        "SRUN_ARGS": shlex.join(srun_args(cfg)),
        "TRAIN_COMMAND": shlex.join(command),
        "FINAL_STEP": str(cfg.train.steps),
        "METRICS": shlex.quote(str(run_dir / "metrics.jsonl")),
        "MAX_REQUEUES": str(cfg.launcher.slurm.max_requeues),
    }
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], TEMPLATE.read_text())


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    command = ["sbatch", "--parsable", str(script)]
    print(shlex.join(command), flush=True)
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
