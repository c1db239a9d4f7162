"""The console scripts install, explain themselves, and run the embedded main job."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "script, words",
    [
        ("qwen2-train", ["tiny Qwen2", "--tp", "--pp"]),
        ("qwen2-convert", ["import", "export", "verify", "temporary directory"]),
        ("qwen2-model-info", ["--model", "optimizer", "--world-size"]),
    ],
)
def test_help(script: str, words: list[str]) -> None:
    exe = shutil.which(script, path=str(BIN))
    assert exe, f"{script} is not installed next to {sys.executable}"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for word in words:
        assert word in out


def test_model_info_reports_per_rank_memory() -> None:
    out = subprocess.run(
        [BIN / "qwen2-model-info", "--model", "qwen2_72b", "--tp", "8", "--pp", "4", "--world-size", "64"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "72.71B parameters" in out and "dp=2" in out and "most loaded rank: 2.350B" in out


def test_model_info_rejects_invalid_layout_with_fix() -> None:
    run = subprocess.run(
        [BIN / "qwen2-model-info", "--model", "qwen2_0.5b", "--tp", "4"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "valid tp: [1, 2]" in run.stderr and "Traceback" not in run.stderr


def test_main_job_loss_falls() -> None:
    run = subprocess.run(
        [BIN / "qwen2-train", "--steps", "6", "--seq-length", "32", "--tp", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first, last = (float(x) for x in run.stdout.strip().splitlines()[-1].split()[1:4:2])
    assert last < first - 1.0
