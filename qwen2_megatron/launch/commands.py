"""The commands qwen2-launch runs: the trainer locally, or under torchrun's c10d rendezvous.

Every command is a plain argv list that begins with `env K=V ...` when launcher.env is set, so
the line printed is exactly the line run (and can be pasted on another node).
"""

from __future__ import annotations

import sys

from qwen2_megatron.launch.config import LauncherConfig

TRAIN_MODULE = "qwen2_megatron.cli.train"


def train_command(overrides: list[str], python: str = sys.executable) -> list[str]:
    """One trainer process (under torchrun/srun) or the local launcher (qwen2-train itself)."""
    return [python, "-m", TRAIN_MODULE, *overrides]


def with_env(lc: LauncherConfig, command: list[str]) -> list[str]:
    if not lc.env:
        return command
    return ["env", *(f"{key}={value}" for key, value in lc.env.items()), *command]


def torchrun_command(lc: LauncherConfig, overrides: list[str]) -> list[str]:
    """torchrun with --standalone on one node, c10d rendezvous at launcher.rdzv_endpoint otherwise."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={lc.nnodes}", f"--nproc-per-node={lc.nproc}"]
    if lc.rdzv_endpoint:
        cmd += [f"--rdzv-backend={lc.rdzv_backend}", f"--rdzv-endpoint={lc.rdzv_endpoint}", f"--rdzv-id={lc.rdzv_id}"]
    else:
        cmd.append("--standalone")
    if lc.local_addr:
        cmd.append(f"--local-addr={lc.local_addr}")
        if lc.rdzv_endpoint and lc.rdzv_endpoint.rsplit(":", 1)[0] == lc.local_addr:
            # torchrun recognises the store's host by its hostname's addresses only; say so
            # explicitly when the endpoint is this node's address on another interface.
            cmd.append("--rdzv-conf=is_host=true")
    return cmd + ["-m", TRAIN_MODULE, *overrides]


def command(lc: LauncherConfig, overrides: list[str]) -> list[str]:
    """launcher.mode=local: qwen2-train starts launcher.nproc processes; torchrun: one agent per node."""
    inner = torchrun_command(lc, overrides) if lc.mode == "torchrun" else train_command(overrides)
    return with_env(lc, inner)
