"""Training metrics: throughput, FLOP/s and MFU, memory, and where they are written.

Rank 0 appends one JSON line per log interval to <run dir>/metrics.jsonl (the record that the
plotting tool and tests read, W&B or not), prints a compact console line and drives a progress
bar with an ETA.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# Dense BF16 peak per device, TFLOP/s (spec sheets), by a substring of the device name.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(override: float | None) -> float | None:
    """The per-device peak used for MFU; None where unknown (CPU, unlisted GPUs)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib() -> float:
    """Peak device memory allocated by this process (GPU) or its peak RSS (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Accumulates step results between log intervals and emits them (on the logging rank)."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        world_size: int,
        flops_per_token: float,
        peak_tflops: float | None,
        enabled: bool,
        progress_bar: bool,
        start_step: int = 0,
    ) -> None:
        self.world_size, self.flops_per_token, self.peak = world_size, flops_per_token, peak_tflops
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
            if enabled and progress_bar
            else None
        )
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.started = time.perf_counter()

    def step_done(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def emit(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Summarise the interval; returns the record (on every rank; written on the logging one)."""
        finite = [x for x in self.losses if math.isfinite(x)]
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "step_time_s": self.seconds / max(len(self.losses), 1),
            "peak_memory_gib": peak_memory_gib(),
            **extra,
        }
        if self.enabled:
            self.append(record)
            line = (
                f"step {step:>6d} | loss {record['loss']:.4f} | lr {record.get('lr', 0):.2e} | "
                f"grad norm {record.get('grad_norm', float('nan')):.3f} | "
                f"{tokens_per_s:,.0f} tok/s ({record['tokens_per_s_per_device']:,.0f}/device) | "
                f"{tflops:.2f} TFLOP/s/device"
                + (f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
                + f" | {record['step_time_s']:.2f} s/step | mem {record['peak_memory_gib']:.2f} GiB"
                + f" | tokens {record.get('consumed_tokens', 0):,} | skipped {record.get('skipped_steps', 0)}"
            )
            (self.bar.write if self.bar is not None else print)(line)
        self._reset()
        return record

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (a training interval or an evaluation) to metrics.jsonl."""
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
