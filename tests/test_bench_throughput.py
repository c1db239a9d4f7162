"""tools/bench_throughput.py runs both sides end to end on CPU and reports sane numbers.

A smoke test of the benchmark script, not a timing assertion: the numbers it measures on a
shared CPU mean nothing; the GPU run is tools/gpu_check.sh.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "bench_throughput.py"
sys.path.insert(0, str(TOOL.parent))

from bench_throughput import parse_args, summarize_file, trainer_config  # noqa: E402


def test_cpu_tiny_reports_both_sides(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--preset", "tiny", "--seq", "64", "--steps", "2",
         "--warmup", "1", "--micro-batch", "2", "--json-out", str(out_file), "--profile", str(tmp_path / "prof")],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_file.read_text().strip()) == record
    assert "tokens/s" in proc.stdout and "ours/hf" in proc.stdout
    assert (record["preset"], record["layers"], record["seq"], record["micro_batch"]) == ("tiny", 4, 64, 2)
    assert record["flops_per_token"] > 0 and record["peak_tflops"] is None  # no peak known for a CPU
    for side in ("ours", "hf"):
        result = record[side]
        assert "error" not in result, result
        for key in ("tokens_per_s", "tflops_per_device", "step_time_s", "peak_memory_gib"):
            assert result[key] > 0 and math.isfinite(result[key]), (side, key, result[key])
        assert result["mfu"] is None
        # Same shape on both sides; a fresh model's loss is about ln(vocab) = 11.93.
        assert result["params"] == record["params_total"]
        assert 10.0 < result["loss_first"] < 14.0 and math.isfinite(result["loss_last"])
    assert record["ratio"]["tokens_per_s"] == pytest.approx(
        record["ours"]["tokens_per_s"] / record["hf"]["tokens_per_s"]
    )
    for side in ("ours", "hf"):  # --profile: torch.profiler's table of 2 more steps per side
        table = (tmp_path / f"prof.{side}.txt").read_text()
        assert "Self CPU" in table and "aten::mm" in table, table[:500]
        assert table.rstrip().endswith("device idle gaps: no device kernels in the profile")  # on CPU
    assert proc.stdout.count("top kernels") == 2


def test_idle_gaps_between_kernels_of_overlapping_streams() -> None:
    from device_gaps import describe, idle_gaps

    kernels = [(0, 10, "a"), (5, 20, "b"), (12, 15, "c"),  # overlapping (two streams): busy 0-20
               (50, 60, "d"),  # 30 us after b
               (61, 70, "e"),  # 1 us after d
               (170, 180, "f")]  # 100 us after e
    host = [(20, 45, "aten::item"), (25, 30, "cudaStreamSynchronize"), (100, 101, "cudaLaunchKernel"),
            (72, 160, "optimizer.step"), (5, 60, "started before the gap")]
    result = idle_gaps(kernels, host, top=2)
    assert result["span_us"] == 180 and result["busy_us"] == 20 + 10 + 9 + 10 and result["gap_count"] == 3
    first, second = result["gaps"]
    assert (first["us"], first["after"], first["before"]) == (100, "e", "f")
    assert first["host_ops"] == ["optimizer.step", "cudaLaunchKernel"]
    assert (second["us"], second["after"], second["before"]) == (30, "b", "d")
    assert second["host_ops"] == ["aten::item", "cudaStreamSynchronize"]
    text = describe(result)
    assert "device busy 0.0 of 0.2 ms" in text and "(27.2%)" in text and "idle 0.1 ms in 3 gaps" in text
    assert idle_gaps([], host)["gap_count"] == 0


def test_overrides_reach_the_trainer_config(tmp_path: Path) -> None:
    args = parse_args(["--preset", "qwen2_7b", "--layers", "8", "--recompute", "selective", "--micro-batch", "2",
                       "--override", "optim.distributed_optimizer=false", "--override", "model.rope_theta=10000"])
    cfg = trainer_config(args, tmp_path)
    assert cfg.model.num_hidden_layers == 8 and cfg.model.hidden_size == 3584 and cfg.model.rope_theta == 10000.0
    assert cfg.train.recompute == "selective" and cfg.optim.distributed_optimizer is False
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.seq_length) == (2, 2, 4096)
    assert cfg.train.precision == "bf16"  # the GPU default
    with pytest.raises(Exception, match="no_such_field"):
        trainer_config(parse_args(["--override", "train.no_such_field=1"]), tmp_path)


def test_out_of_memory_is_reported_not_raised() -> None:
    import torch

    from bench_throughput import run_side

    def oom(_device: torch.device) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")

    result = run_side("hf", oom, torch.device("cpu"), summary=lambda run: run)
    assert result["error"] == "out of memory" and "9.27 GiB" in result["detail"]


def test_fused_loss_shorthand_is_a_trainer_override(tmp_path: Path) -> None:
    cfg = trainer_config(parse_args(["--preset", "tiny", "--fused-loss"]), tmp_path)
    assert cfg.train.fused_lm_loss is True


@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_same_init_trains_like_transformers(tmp_path: Path, loss: str) -> None:
    """--same-init: ours starts from transformers' initial weights (saved, imported by our
    converter) and, on the same batches with the same AdamW, clipping and schedule, its fp32 losses
    follow transformers' step by step: the whole training step (megatron DDP, distributed
    optimizer, guarded step; with the fused LM loss too) is the same as transformers'."""
    fused = ["--fused-loss"] if loss == "fused" else []
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--preset", "tiny", "--seq", "64", "--steps", "4",
         "--warmup", "0", "--micro-batch", "2", "--same-init", *fused],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = record["ours"]["losses"], record["hf"]["losses"]
    print(f"ours {ours}\nhf   {hf}")
    assert len(ours) == len(hf) == 4 and hf[-1] < hf[0]  # transformers learns on these batches
    assert max(abs(a - b) for a, b in zip(ours, hf)) <= 1e-4


@pytest.mark.parametrize("clip", ["in_fused_adam", "foreach"])
def test_pure_bf16_trains_like_transformers(tmp_path: Path, clip: str) -> None:
    """optim.fp32_master_weights=false against transformers' pure-bf16 baseline (bf16 weights,
    gradients and AdamW states) from the same initial weights, on 16 steps over 8 repeated batches
    (the loss falls once they repeat): the same training up to bf16 rounding. Gradient clipping
    (norms above 1.0 here) in the fused AdamW kernel and as a foreach multiply of the bf16
    gradients, the way torch.nn.utils.clip_grad_norm_ clips transformers'. (The losses alone do
    not tell fp32 master weights from none at this size: the bytes test in test_trainer does.)"""
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--dtype", "bf16", "--preset", "tiny", "--seq", "32",
         "--steps", "16", "--warmup", "0", "--micro-batch", "2", "--lr", "1e-3", "--same-init",
         "--override", "optim.distributed_optimizer=false", "--override", "optim.fp32_master_weights=false",
         "--override", f"optim.clip_in_fused_adam={clip == 'in_fused_adam'}"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, hf = record["ours"]["losses"], record["hf"]["losses"]
    print(f"ours {ours}\nhf   {hf}")
    assert len(ours) == len(hf) == 16 and hf[-1] < hf[0] - 0.4
    assert max(abs(a - b) for a, b in zip(ours, hf)) <= 1e-2


def test_summary_table_keeps_its_columns_for_long_case_names(tmp_path: Path) -> None:
    side = {"tokens_per_s": 21892.0, "mfu": 0.205, "peak_memory_gib": 94.4}
    records = [
        {"case": "qwen2_57b_a14b-2L-grouped-purebf16", "device_name": "NVIDIA H200", "micro_batch": 1,
         "ours": side, "hf": side, "ratio": {"tokens_per_s": 1.0}},
        {"case": "qwen2_0.5b", "device_name": "NVIDIA H200", "micro_batch": 4, "ours": side, "hf": None},
        {"case": "qwen2_7b-8L", "skipped": "12s of the budget left"},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    header, long, short, skipped = summarize_file(path).splitlines()
    column = header.index("card")
    assert long.index("H200") == short.index("H200") == column
    assert long[:column].rstrip() == "qwen2_57b_a14b-2L-grouped-purebf16"
    assert skipped[column:] == "12s of the budget left"
