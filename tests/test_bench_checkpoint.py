"""tools/bench_checkpoint.py runs end to end on CPU (2 ranks, tiny shape) and reports every figure.

A smoke test of the benchmark script, not a timing assertion (timings on a shared CPU mean
nothing); it is what keeps the script working for the runs on real storage and GPU nodes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "bench_checkpoint.py"


@pytest.mark.parametrize("async_copy, async_writer", [("overlap", "fork"), ("at_save", "fork"), ("overlap", "persistent")])
def test_two_ranks_report_save_async_load_and_checksums(tmp_path: Path, async_copy: str, async_writer: str) -> None:
    """Also the bench's own check that the asynchronous save wrote the state of the step that saved
    (overlap: the writer starts after a step that changed the state; at_save: megatron's;
    persistent: the run's writer process reads the shared staging buffers)."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--preset", "tiny", "--layers", "1", "--nproc", "2", "--repeats", "2",
         "--seq", "32", "--write-threads", "2", "--dir", str(tmp_path), "--async-copy", async_copy,
         "--async-writer", async_writer],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    size = re.search(
        r"checkpoint size\s+([\d.]+) GiB \(1-layer tiny shape, model \+ Adam, 2 ranks, 2 files per rank written in parallel\)",
        out,
    )
    assert size and float(size.group(1)) > 0, out
    assert re.search(r"ratio\s+[\d.]+x of the raw write speed \(median of the 2 save/raw pairs", out), out
    assert re.search(r"^raw write, 4 files\s+[\d.]+ s  -> [\d.]+ GB/s", out, re.MULTILINE), out
    assert re.search(r"^ratio to that\s+[\d.]+x \(median", out, re.MULTILINE), out
    for label in ("checkpoint save", "raw write \\+ fsync", "training step", "async save", "step triggering save",
                  "load", "load, fully parallel", "verify checksums"):
        assert re.search(rf"^{label}\s+[-+\d.]", out, re.MULTILINE), (label, out)
    assert re.search(r"^async save in all\s+\d+ steps ran until published", out, re.MULTILINE), out
    assert f"blocking (checkpoint.async_copy={async_copy}, async_writer={async_writer})" in out
    assert re.search(r"^  blocking, by save   [\d.]+, [\d.]+ s \(rank 0", out, re.MULTILINE), out
    assert re.search(r"^  staging at update   [\d.]+ s \(median, rank 0", out, re.MULTILINE), out
    assert re.search(r"^async = sync save     yes: 0 of \d+ tensors differ", out, re.MULTILINE), out
    assert list(tmp_path.iterdir()) == []  # the benchmark's checkpoints are removed
