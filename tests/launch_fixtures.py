"""Shared pieces of the launch tests: the tiny training job, its uninterrupted reference run,
a local SLURM cluster and two network namespaces joined by a veth pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm_cluster import LocalSlurm

LAUNCH = Path(sys.executable).parent / "qwen2-launch"
# Eight short steps, a metrics line per step; checkpoints only on request (signal) and at the end.
TINY_JOB = [
    "train.steps=8", "optim.warmup_steps=2", "train.seq_length=64", "log.interval=1",
    "log.progress_bar=false", "checkpoint.interval=0",
]


def launch(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCH, *args], capture_output=True, text=True, env=env, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from <run dir>/metrics.jsonl (a restarted step keeps its last record)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The tiny job, uninterrupted, on one machine with 2 processes (launcher.mode=local)."""
    run_dir = tmp_path_factory.mktemp("reference")
    run = launch([*TINY_JOB, f"run.dir={run_dir}"])
    assert run.returncode == 0, run.stderr[-3000:]
    found = losses(run_dir)
    assert sorted(found) == list(range(1, 9)), found
    return found


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns_pair() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two "hosts": namespaces with 10.231.0.1 and 10.231.0.2 on an interface named qveth."""
    tag = f"{os.getpid() % 100000}"
    names = (f"q2a{tag}", f"q2b{tag}")
    addrs = ("10.231.0.1", "10.231.0.2")
    created: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
        ip("link", "add", f"{names[0]}v", "type", "veth", "peer", "name", f"{names[1]}v")
        for name, addr in zip(names, addrs):
            ip("link", "set", f"{name}v", "netns", name)
            ip("-n", name, "link", "set", f"{name}v", "name", "qveth")
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", "qveth")
            ip("-n", name, "link", "set", "qveth", "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield tuple(zip(names, addrs))  # type: ignore[misc]
    finally:
        for name in created:  # deleting a namespace deletes its end of the veth pair, and the pair
            ip("netns", "del", name)
