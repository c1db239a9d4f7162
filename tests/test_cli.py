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
        ("qwen2-train", ["qwen2-train: pre-train", "experiment: qwen2_0.5b", "model: qwen2_0.5b", "hidden_size: 128"]),
        ("qwen2-convert", ["import", "export", "verify", "temporary directory"]),
        ("qwen2-model-info", ["--model", "optimizer", "--world-size"]),
        ("qwen2-plot-run", ["run_dir", "PNG"]),
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


def test_model_info_sizes_pure_bf16() -> None:
    """--no-fp32-master-weights: 1.5B on one GPU, 2 + 2 + 4 bytes per parameter (1.544B: 11.50
    GiB) against 25.88 GiB with fp32 gradients and master weights; refused with the distributed
    optimizer, as the trainer refuses optim.fp32_master_weights=false with it."""
    base = [BIN / "qwen2-model-info", "--model", "qwen2_1.5b"]
    plain = subprocess.run(base, capture_output=True, text=True, check=True).stdout
    pure = subprocess.run([*base, "--no-distributed-optimizer", "--no-fp32-master-weights"], capture_output=True,
                          text=True, check=True).stdout
    assert "total         25.88 GiB" in plain and "(Adam m, v, fp32 master weights)" in plain
    assert "total         11.50 GiB" in pure and "gradients      2.88 GiB (bf16)" in pure and "(bf16 Adam m, v)" in pure
    refused = subprocess.run([*base, "--no-fp32-master-weights"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--no-distributed-optimizer" in refused.stderr


def test_model_info_rejects_invalid_layout_with_fix() -> None:
    run = subprocess.run(
        [BIN / "qwen2-model-info", "--model", "qwen2_0.5b", "--tp", "4"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "valid tp: [1, 2]" in run.stderr and "Traceback" not in run.stderr


def test_main_job_trains_on_the_demo_corpus(tmp_path: Path) -> None:
    """The README's main job (shortened): the loss falls by a clear margin and the run is recorded."""
    run = subprocess.run(
        [BIN / "qwen2-train", "train.steps=40", "optim.warmup_steps=5", "log.interval=10",
         "log.progress_bar=false", f"run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    done = run.stdout.strip().splitlines()[-1].split()
    first, last = float(done[2]), float(done[4])
    assert last < first - 2.0, run.stdout[-2000:]
    assert (tmp_path / "config.yaml").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    plotted = subprocess.run([BIN / "qwen2-plot-run", tmp_path], capture_output=True, text=True, check=True)
    assert "curves.png" in plotted.stdout
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_run_names_a_missing_log(tmp_path: Path) -> None:
    run = subprocess.run([BIN / "qwen2-plot-run", tmp_path], capture_output=True, text=True)
    assert run.returncode == 2 and "metrics.jsonl not found" in run.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=5", "Key 'stpes' not in 'TrainConfig'"),
        ("train.steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("model=qwen2_8b", "Could not find 'model/qwen2_8b'"),
        ("parallel.tp=3", "world size 2 is not divisible by tp*pp*cp"),
        ("model.num_key_value_heads=3", "not a multiple of model.num_key_value_heads=3"),
    ],
)
def test_bad_overrides_fail_before_training(override: str, message: str) -> None:
    run = subprocess.run([BIN / "qwen2-train", override], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert message in run.stderr + run.stdout
    assert "step " not in run.stdout
