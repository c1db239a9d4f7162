"""qwen2-launch without running anything: the exact commands and sbatch script it prints, the
checks that fail before submission, SLURM time limits, and the submitit sweep config; and the
ranks' default environment at work."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qwen2_megatron.cli.launch import main
from qwen2_megatron.cli.train import CONF_DIR, _register
from qwen2_megatron.launch.checks import slurm_time_s
from qwen2_megatron.launch.config import LauncherConfig
from qwen2_megatron.parallel.local_launch import spawn

SHORT = ["train.steps=5", "optim.warmup_steps=1"]


def launch_dry(capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["--dry-run", *SHORT, *overrides])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_local_prints_the_trainer_command(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = launch_dry(capsys, f"run.dir={tmp_path}/../{tmp_path.name}")
    assert code == 0
    assert out.strip() == shlex.join(
        ["env", "THP_MEM_ALLOC_ENABLE=1", sys.executable, "-m", "qwen2_megatron.cli.train", *SHORT, f"run.dir={tmp_path}"]
    )


def test_torchrun_single_and_multi_node(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = launch_dry(capsys, "launcher.mode=torchrun", f"run.dir={tmp_path}")
    assert code == 0 and "-m torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone -m " in out
    code, out, _ = launch_dry(
        capsys, "launcher.mode=torchrun", "launcher.nnodes=2", "launcher.nproc=1",
        "launcher.rdzv_endpoint=10.1.0.1:29500", "launcher.local_addr=10.1.0.1", "+launcher.env.NCCL_DEBUG=WARN",
        "run.name=job7", f"run.dir={tmp_path}",
    )
    assert code == 0
    assert out.startswith("env THP_MEM_ALLOC_ENABLE=1 NCCL_DEBUG=WARN ")  # the default, then the user's
    assert ("--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=10.1.0.1:29500 --rdzv-id=job7 "
            "--local-addr=10.1.0.1 --rdzv-conf=is_host=true -m qwen2_megatron.cli.train") in out


def test_sbatch_script(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = launch_dry(
        capsys, "launcher.mode=slurm", "launcher.nnodes=2", "launcher.nproc=4", "launcher.slurm.gpus_per_node=4",
        "train.global_batch_size=16",
        "launcher.slurm.partition=gpu", "launcher.slurm.account=proj1", "launcher.slurm.qos=high",
        "launcher.slurm.time=2-00:00:00", "launcher.slurm.exclusive=true", "launcher.slurm.cpus_per_task=8",
        "launcher.slurm.container_image=/images/qwen2.sqsh", "launcher.slurm.container_mounts=/lustre:/lustre",
        "launcher.slurm.max_requeues=3", "+launcher.env.NCCL_IB_HCA=mlx5", f"run.dir={tmp_path}",
    )
    assert code == 0
    script = out.split("\n", 1)[1]
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --qos=high",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --exclusive", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/slurm-%j.log", "export THP_MEM_ALLOC_ENABLE=1", "export NCCL_IB_HCA=mlx5",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))",
                 'elif [ "$restarts" -ge 3 ]; then', "\"step\": 5[,}]"]:
        assert line in script, line
    assert "--container-image=/images/qwen2.sqsh" in script and "--container-mounts=/lustre:/lustre" in script
    assert " rank python -m qwen2_megatron.cli.train " in script  # the image's python
    assert not (tmp_path / "sbatch.sh").exists()  # dry run writes nothing
    lint = subprocess.run([Path(sys.executable).parent / "shellcheck", "--severity=warning", "-"],
                          input=script, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


SLURM = ["launcher.mode=slurm"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher.mode=k8s"], "launcher.mode='k8s': choose one of ['local', 'torchrun', 'slurm']"),
        (["launcher.nnodes=2"], "launcher.mode=local runs on this machine only"),
        (["launcher.mode=torchrun", "launcher.nnodes=2"], "needs launcher.rdzv_endpoint=HOST:PORT"),
        (["launcher.mode=torchrun", "launcher.rdzv_endpoint=node1"], "must be HOST:PORT"),
        ([*SLURM, "launcher.nnodes=3", "parallel.tp=4"], "world size 6 is not divisible by tp*pp*cp"),
        ([*SLURM, "launcher.slurm.gpus_per_node=8"], "one process per GPU; set them equal"),
        ([*SLURM, "launcher.slurm.time=banana"], "'banana' is not a SLURM time"),
        ([*SLURM, "launcher.slurm.time=2", "launcher.slurm.signal_lead_s=120"],
         "(120 s) leaves no time before the checkpoint signal"),
        ([*SLURM, "launcher.expected_step_time_s=400"], "signal_lead_s=300 is shorter than one step"),
        ([*SLURM, "launcher.expected_step_time_s=10", "checkpoint.interval=500"],
         "gives 3300 s before the checkpoint signal, less than one checkpoint interval (checkpoint.interval=500"),
        ([*SLURM, "launcher.slurm.max_requeues=-1"], "max_requeues=-1 must be >= 0"),
    ],
)
def test_bad_launch_fails_before_anything_runs(
    capsys: pytest.CaptureFixture, overrides: list[str], message: str
) -> None:
    code, out, err = launch_dry(capsys, *overrides)
    assert code == 2 and message in err and out == "", err


@pytest.mark.parametrize(
    "text, seconds",
    [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780), ("1-0:0:5", 86405)],
)
def test_slurm_time_formats(text: str, seconds: int) -> None:
    assert slurm_time_s(text) == seconds


def test_sweep_config_selects_submitit_slurm() -> None:
    """`qwen2-train -m hydra/launcher=submitit_slurm ...` composes with this project's config."""
    _register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                                 "hydra.launcher.timeout_min=30", "train.steps=5", "optim.warmup_steps=1"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.partition == "debug" and cfg.train.steps == 5


def test_dockerfile_lints_clean() -> None:
    """The image cannot be built here (no Docker engine); hadolint checks the Dockerfile."""
    hadolint = Path(sys.executable).parent / "hadolint"
    dockerfile = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"
    run = subprocess.run([hadolint, dockerfile], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_page_kib_of_a_host_buffer() -> int:
    """KiB of this process's memory in transparent huge pages once a 64 MiB tensor is filled."""
    import torch

    buffer = torch.ones(64 << 20, dtype=torch.uint8)
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    del buffer
    return sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(), reason="no transparent huge pages")
def test_ranks_back_large_host_buffers_with_huge_pages() -> None:
    """launcher.env's default makes torch's CPU allocator ask for huge pages (ranks started by
    qwen2-train, torchrun or SLURM get it); without it a kernel in `madvise` mode gives none."""
    (with_default,) = spawn(_huge_page_kib_of_a_host_buffer, 1, env=LauncherConfig().env)
    assert with_default >= 32 << 10, with_default
    if "[madvise]" in THP_MODE.read_text():
        (switched_off,) = spawn(_huge_page_kib_of_a_host_buffer, 1, env={"THP_MEM_ALLOC_ENABLE": "0"})
        assert switched_off < 32 << 10, switched_off
