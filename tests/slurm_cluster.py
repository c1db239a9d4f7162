"""A real one-node SLURM cluster for the launch tests (Debian's slurm-wlm 22.05 and munge).

Everything lives in one temporary directory: munge key and socket, slurm.conf, state, spool and
logs, on ports picked free, so the cluster never touches /etc/slurm or a munged or slurmd that
already runs. `start` installs the packages with apt when they are missing (needs root);
`stop` ends exactly the three daemons it started, by process id.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen2_megatron.parallel.local_launch import free_port
from tests.processes import stop_process

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
_SBIN = Path("/usr/sbin")

SLURM_CONF = """\
ClusterName=qwen2test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def installed() -> bool:
    return all((_SBIN / d).exists() for d in DAEMONS)


def installable() -> bool:
    """Installed already, or apt can install it (as root)."""
    return installed() or (os.geteuid() == 0 and shutil.which("apt-get") is not None)


def ensure_installed() -> None:
    """apt-get install the packages when a daemon is missing (about 20 s)."""
    if installed():
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)


@dataclass
class LocalSlurm:
    root: Path
    partition: str = "debug"
    cpus: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment under which sbatch/sinfo/scontrol talk to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def start(self) -> "LocalSlurm":
        ensure_installed()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname().split(".")[0]
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            host=host, root=self.root, ctld_port=free_port(), slurmd_port=free_port(),
            cpus=self.cpus, partition=self.partition,
        ))
        munge = [
            str(_SBIN / "munged"), "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.root}/munge.sock", f"--pid-file={self.root}/munged.pid",
            f"--log-file={self.root}/munged.log", f"--seed-file={self.root}/munge.seed",
        ]
        self._spawn(munge)
        self._wait(lambda: (self.root / "munge.sock").exists(), "munged socket")
        conf = str(self.root / "slurm.conf")
        self._spawn([str(_SBIN / "slurmctld"), "-D", "-i", "-f", conf])
        self._spawn([str(_SBIN / "slurmd"), "-D", "-f", conf])
        self._wait(self._node_idle, "the node to become idle")
        return self

    def _spawn(self, cmd: list[str]) -> None:
        with open(self.root / f"{Path(cmd[0]).name}.out", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return out.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local SLURM: waiting for {what} failed ({dead or 'timeout'}); logs in {self.root}")
            time.sleep(0.5)

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env)
        return out.stdout.split()

    def stop(self) -> None:
        """Cancel this cluster's jobs (a failed test may leave one running), then end the
        daemons this object started, newest first, by process id."""
        try:
            if self.procs and self.jobs():
                subprocess.run(["scancel", *self.jobs()], env=self.env)
                self._wait(lambda: not self.jobs(), "the jobs to end")
        finally:
            for proc in reversed(self.procs):
                stop_process(proc, 30)
        self.procs.clear()

