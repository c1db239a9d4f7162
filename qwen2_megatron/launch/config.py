"""The `launcher` section of the trainer's config: how and where the training processes start.

It lives next to the code that reads it (qwen2-launch); qwen2-train itself reads only `nproc`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlurmConfig:
    """sbatch settings; None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"  # SLURM time format: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    cpus_per_task: int = 1
    gpus_per_node: int = 0  # 0 for CPU jobs, else one GPU per process (= launcher.nproc)
    exclusive: bool = False
    container_image: str | None = None  # pyxis/enroot image (e.g. a squashfs of docker/Dockerfile)
    container_mounts: str | None = None  # pyxis --container-mounts, e.g. /lustre:/lustre
    signal_lead_s: int = 300  # USR1 this long before the time limit: time to save a checkpoint
    max_requeues: int = 10  # stop requeueing after this many restarts
    extra_args: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--mem=0"]


@dataclass
class LauncherConfig:
    """How `qwen2-launch` starts the training processes (qwen2-train alone uses `nproc`)."""

    mode: str = "local"  # local (qwen2-train spawns nproc) | torchrun | slurm
    nproc: int = 2  # processes per node (gloo on CPU, one per GPU otherwise)
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # torchrun, several nodes: host:port of the c10d store
    rdzv_id: str = "${run.name}"  # the same on all nodes of one job
    rdzv_backend: str = "c10d"
    local_addr: str | None = None  # torchrun: this node's address when its hostname does not resolve to it
    # environment of every rank, in every mode, e.g. {NCCL_IB_HCA: mlx5, NCCL_DEBUG: WARN}. The
    # default lets torch back host buffers of 2 MB or more with transparent huge pages: 512x fewer
    # page faults in the host copies of checkpoint saves and loads (README, Checkpoints)
    env: dict[str, str] = field(default_factory=lambda: {"THP_MEM_ALLOC_ENABLE": "1"})
    expected_step_time_s: float | None = None  # measured seconds per step: checks the time limit
    dry_run: bool = False  # print the command (and the sbatch script) without running
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
