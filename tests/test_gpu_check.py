"""tools/gpu_check.sh, the one prepared script of a lent-GPU session, works before a GPU runs it.

A GPU is lent for minutes, so a case name the script does not know, or plumbing that breaks
(pre-flight, run_case, the summary), would cost that session; here the script runs on CPU in its
smoke mode (GPU_CHECK_CPU_SMOKE=1: tiny models, numbers that mean nothing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _run(tmp_path: Path, cases: str, budget_s: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_CPU_SMOKE": "1", "CASES": cases,
           "GPU_CHECK_BUDGET_S": str(budget_s)}
    return subprocess.run(["bash", str(SCRIPT), sys.executable], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def _known_cases() -> list[str]:
    return re.findall(r"^ {12}([\w.-]+)\) run_case", SCRIPT.read_text(), flags=re.MULTILINE)


def test_every_case_named_by_default_or_in_the_header_is_known(tmp_path: Path) -> None:
    text = SCRIPT.read_text()
    known = set(_known_cases())
    default = re.search(r"^CASES=\$\{CASES:-([^}]*)\}", text, flags=re.MULTILINE).group(1).split()
    assert default and set(default) <= known, set(default) - known
    header = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert all(re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", header) for name in known), [
        name for name in known if not re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", header)
    ]
    # With no budget every case is skipped, but the script must recognise each name.
    result = _run(tmp_path, " ".join(sorted(known)) + " no-such-case", budget_s=0)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("skipped, ") == len(known), result.stdout[-3000:]
    assert "unknown case no-such-case" in result.stdout


def test_cpu_smoke_of_a_case_beside_transformers(tmp_path: Path) -> None:
    result = _run(tmp_path, "0.5b-pure", budget_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "=== qwen2_0.5b-pure: exit 0" in result.stdout, result.stdout[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["case"] for r in records] == ["qwen2_0.5b-fast-purebf16"]
    record = records[0]
    assert "optim.fp32_master_weights=false" in record["overrides"]
    assert "train.fused_lm_loss_grad_in_forward=true" in record["overrides"]
    for side in ("ours", "hf"):
        assert record[side]["tokens_per_s"] > 0 and all(map(lambda x: x == x, record[side]["losses"]))
    assert "qwen2_0.5b-fast-purebf16" in (tmp_path / "summary.txt").read_text()
