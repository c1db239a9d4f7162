"""qwen2-launch end to end on real infrastructure (root): two torchrun "nodes" in network
namespaces joined by a veth pair, and a real one-node SLURM cluster. Both compare their losses
with the same uninterrupted single-machine run (one module, so that run happens once)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch_fixtures import (  # noqa: F401 (fixtures)
    LAUNCH, TINY_JOB, launch, losses, netns_pair, reference_losses, slurm_cluster,
)
from tests.slurm_cluster import LocalSlurm, installable

SLURM_JOB = [*TINY_JOB, "launcher.mode=slurm", "launcher.nproc=2", "launcher.slurm.time=00:20:00",
             "launcher.slurm.signal_lead_s=120"]
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)
needs_slurm = pytest.mark.skipif(not installable(), reason="SLURM is not installed and apt needs root")


@needs_netns
def test_two_node_torchrun_matches_single_node(
    netns_pair: tuple[tuple[str, str], tuple[str, str]], reference_losses: dict[int, float], tmp_path: Path
) -> None:
    (_, master), _ = netns_pair
    common = [
        *TINY_JOB, f"run.dir={tmp_path}", "launcher.mode=torchrun", "launcher.nnodes=2", "launcher.nproc=1",
        f"launcher.rdzv_endpoint={master}:29611", "launcher.rdzv_id=two-hosts",
        "+launcher.env.GLOO_SOCKET_IFNAME=qveth",  # the ranks' traffic goes over the veth pair
    ]
    agents = [
        subprocess.Popen(["ip", "netns", "exec", name, LAUNCH, *common, f"launcher.local_addr={addr}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, addr in netns_pair
    ]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    prefix = "env THP_MEM_ALLOC_ENABLE=1 GLOO_SOCKET_IFNAME=qveth "  # launcher.env: the default, then ours
    printed = [line for line in outputs[0].splitlines() if line.startswith(prefix)]
    assert printed and f"--rdzv-endpoint={master}:29611" in printed[0] and f"--local-addr={master}" in printed[0]
    assert losses(tmp_path) == pytest.approx(reference_losses, rel=1e-6)


def job_field(cluster: LocalSlurm, job: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=cluster.env).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(ready, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@needs_slurm
def test_missing_partition_fails_before_submission(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    run = launch([*SLURM_JOB, "launcher.slurm.partition=gpu-h100", f"run.dir={tmp_path}"], env=slurm_cluster.env)
    assert run.returncode == 2
    assert "launcher.slurm.partition='gpu-h100' does not exist on this cluster; available: ['debug']" in run.stderr
    assert not (tmp_path / "sbatch.sh").exists()


@needs_slurm
def test_preempted_slurm_job_requeues_resumes_and_matches(
    slurm_cluster: LocalSlurm, reference_losses: dict[int, float], tmp_path: Path
) -> None:
    """Submit 2 tasks, send USR1 to the batch shell after step 3: the ranks checkpoint and exit,
    the job requeues itself, resumes from that step and ends with the uninterrupted losses."""
    run = launch([*SLURM_JOB, "launcher.slurm.partition=debug", f"run.dir={tmp_path}"], env=slurm_cluster.env)
    assert run.returncode == 0, run.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", run.stdout).group(1)
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / f"slurm-{job}.log"
    wait_for(lambda: metrics.exists() and len(losses(tmp_path)) >= 3, "step 3")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm_cluster.env)
    wait_for(lambda: job_field(slurm_cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job")
    text = log.read_text()
    assert job_field(slurm_cluster, job, "JobState") == "COMPLETED", text[-4000:]
    assert job_field(slurm_cluster, job, "Restarts") == "1", text[-4000:]
    assert "requeueing job" in text and f"job {job} start 1 on" in text, text[-4000:]
    before = text[: text.index("requeueing job")]
    last_step_before = max(int(s) for s in re.findall(r"^step\s+(\d+) \|", before, re.MULTILINE))
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", text)
    assert resumed and int(resumed.group(1)) == last_step_before, text[-4000:]
    assert 3 <= last_step_before < 8
    assert losses(tmp_path) == pytest.approx(reference_losses, rel=1e-6)
