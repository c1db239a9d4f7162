"""Checks of a launch that fail before anything is submitted, each naming the key and the fix.

The trainer's own validate() covers the layout against the world size (nodes x processes);
this adds what only the launcher knows: the mode, rendezvous, GPUs per node, the SLURM time
limit against the checkpoint interval, and the partition as the cluster reports it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from qwen2_megatron.launch.config import LauncherConfig
from qwen2_megatron.train.config import ConfigError, TrainerConfig, validate

MODES = ("local", "torchrun", "slurm")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_s(text: str) -> int:
    """Seconds in a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(f"launcher.slurm.time={text!r} is not a SLURM time; use e.g. 04:00:00 or 2-00:00:00")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # MM[:SS]


def validate_launch(cfg: TrainerConfig, have_te: bool) -> None:
    """Everything checkable from the config alone (no cluster queries)."""
    lc = cfg.launcher
    if lc.mode not in MODES:
        raise ConfigError(f"launcher.mode={lc.mode!r}: choose one of {list(MODES)}")
    for key in ("nproc", "nnodes"):
        if getattr(lc, key) < 1:
            raise ConfigError(f"launcher.{key}={getattr(lc, key)} must be >= 1")
    if lc.mode == "local" and lc.nnodes > 1:
        raise ConfigError(f"launcher.mode=local runs on this machine only; for launcher.nnodes={lc.nnodes} "
                          "use launcher.mode=torchrun (on every node) or launcher.mode=slurm")
    if lc.mode == "torchrun":
        _check_rendezvous(lc)
    validate(cfg, lc.nnodes * lc.nproc, have_te)
    if lc.mode == "slurm":
        _check_slurm(cfg)


def _check_rendezvous(lc: LauncherConfig) -> None:
    if lc.nnodes > 1 and not lc.rdzv_endpoint:
        raise ConfigError(f"launcher.nnodes={lc.nnodes} needs launcher.rdzv_endpoint=HOST:PORT, an address of "
                          "the first node that every node reaches (the same value on all nodes)")
    if lc.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d+", lc.rdzv_endpoint):
        raise ConfigError(f"launcher.rdzv_endpoint={lc.rdzv_endpoint!r} must be HOST:PORT, e.g. node001:29500")


def _check_slurm(cfg: TrainerConfig) -> None:
    s = cfg.launcher.slurm
    if s.gpus_per_node not in (0, cfg.launcher.nproc):
        raise ConfigError(f"launcher.slurm.gpus_per_node={s.gpus_per_node} with launcher.nproc={cfg.launcher.nproc}: "
                          "the trainer runs one process per GPU; set them equal (or gpus_per_node=0 on CPU)")
    for key in ("cpus_per_task", "signal_lead_s"):
        if getattr(s, key) < 1:
            raise ConfigError(f"launcher.slurm.{key}={getattr(s, key)} must be >= 1")
    if s.max_requeues < 0:
        raise ConfigError(f"launcher.slurm.max_requeues={s.max_requeues} must be >= 0 (0: never requeue)")
    limit = slurm_time_s(s.time)
    if limit <= s.signal_lead_s:
        raise ConfigError(f"launcher.slurm.time={s.time} ({limit} s) leaves no time before the checkpoint signal "
                          f"(launcher.slurm.signal_lead_s={s.signal_lead_s}); raise the time limit")
    step_s = cfg.launcher.expected_step_time_s
    if step_s is None:
        print("note: set launcher.expected_step_time_s (seconds per step, from a short run's metrics.jsonl) to "
              "check the time limit against checkpoint.interval", file=sys.stderr)
        return
    if step_s > s.signal_lead_s:
        raise ConfigError(f"launcher.slurm.signal_lead_s={s.signal_lead_s} is shorter than one step "
                          f"({step_s} s): the trainer finishes its step before saving; raise the lead time")
    needed = cfg.checkpoint.interval * step_s
    if needed > limit - s.signal_lead_s:
        raise ConfigError(
            f"launcher.slurm.time={s.time} gives {limit - s.signal_lead_s} s before the checkpoint signal, less "
            f"than one checkpoint interval (checkpoint.interval={cfg.checkpoint.interval} steps x "
            f"{step_s} s = {needed:.0f} s); raise the time limit or lower checkpoint.interval"
        )


def check_cluster(cfg: TrainerConfig) -> None:
    """Ask the cluster (sinfo) whether the partition exists and has enough nodes."""
    if shutil.which("sinfo") is None:
        raise ConfigError("launcher.mode=slurm needs SLURM's client commands (sinfo, sbatch) on this machine; "
                          "run qwen2-launch on a login node, or use launcher.dry_run=true to only print the script")
    out = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True)
    if out.returncode:
        raise ConfigError(f"sinfo failed ({out.stderr.strip()}); is the SLURM controller reachable?")
    nodes: dict[str, int] = {}
    default = None
    for line in out.stdout.split("\n"):
        if line.strip():
            name, count = line.split()
            if name.endswith("*"):
                name = default = name[:-1]
            nodes[name] = nodes.get(name, 0) + int(count)
    partition = cfg.launcher.slurm.partition or default
    if partition is None:
        raise ConfigError(f"this cluster has no default partition; set launcher.slurm.partition to one of {sorted(nodes)}")
    if partition not in nodes:
        raise ConfigError(f"launcher.slurm.partition={partition!r} does not exist on this cluster; "
                          f"available: {sorted(nodes)}")
    if nodes[partition] < cfg.launcher.nnodes:
        raise ConfigError(f"partition {partition!r} has {nodes[partition]} node(s), launcher.nnodes="
                          f"{cfg.launcher.nnodes}; lower launcher.nnodes or pick another partition")
