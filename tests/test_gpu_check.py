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


def test_adam_case_and_flat_adam_in_the_later_cases(tmp_path: Path) -> None:
    """The adam case (tools/bench_adam.py) writes its record and summary line; with FLAT_ADAM=on (as
    when the adam case found FlatAdamW faster) a later *-swiglu case trains with optim.flat_adam."""
    env_cases = "adam 0.5b-swiglu"
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_CPU_SMOKE": "1", "CASES": env_cases,
           "GPU_CHECK_BUDGET_S": "400", "FLAT_ADAM": "on"}
    result = subprocess.run(["bash", str(SCRIPT), sys.executable], env=env, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    adam = [json.loads(line) for line in (tmp_path / "adam.jsonl").read_text().splitlines()]
    assert [(r["precision"], r["layers"]) for r in adam] == [("pure", 2)]
    assert adam[0]["fused"]["ms"] > 0 and adam[0]["flat"]["max_rel_diff"] < 1e-2
    records = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["case"] for r in records] == ["qwen2_0.5b-fast-ligerswiglu-purebf16-flatadam"]
    assert "optim.flat_adam=true" in records[0]["overrides"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "adam tiny 2L pure: torch's fused AdamW" in summary and "-flatadam" in summary


def _pays(tmp_path: Path, records: list[dict]) -> int:
    path = tmp_path / "adam.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_adam.py"), "--pays", str(path)],
                          capture_output=True, text=True, timeout=120).returncode


def test_flat_adam_is_taken_only_where_it_was_faster_and_agreed(tmp_path: Path) -> None:
    def record(fused_ms: float, flat_ms: float, diff: float) -> dict:
        return {"fused": {"ms": fused_ms, "max_rel_diff": 0.0}, "flat": {"ms": flat_ms, "max_rel_diff": diff}}

    assert _pays(tmp_path, [record(20.9, 11.0, 3e-4)]) == 0
    assert _pays(tmp_path, [record(20.9, 11.0, 3e-4), record(20.9, 22.0, 3e-4)]) == 1  # the last record decides
    assert _pays(tmp_path, [record(20.9, 11.0, 0.5)]) == 1  # faster, but not the same update
    assert _pays(tmp_path, []) == 1
    assert subprocess.run([sys.executable, str(REPO / "tools" / "bench_adam.py"), "--pays", str(tmp_path / "none")],
                          capture_output=True, timeout=120).returncode == 1  # the case was skipped
