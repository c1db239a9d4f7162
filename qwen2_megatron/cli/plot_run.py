"""qwen2-plot-run: loss and throughput curves of a run, from its metrics.jsonl, as a PNG.

For users without W&B access: every run directory holds metrics.jsonl (one JSON record per log
interval, plus evaluation records), written by the trainer on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen2_megatron.cli.common import fail


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a qwen2-train run directory?")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON record (a truncated write?)") from None
        (evals if "eval_loss" in record else train).append(record)
    if not train:
        raise ValueError(f"{path} holds no training records yet")
    return train, evals


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    loss_ax.plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    speed_ax.plot(steps, [r["tokens_per_s_per_device"] for r in train], color="tab:green")
    speed_ax.set_ylabel("tokens/s per device", color="tab:green")
    speed_ax.set_xlabel("step")
    speed_ax.grid(alpha=0.3)
    if all(r.get("mfu") is not None for r in train):
        mfu_ax = speed_ax.twinx()
        mfu_ax.plot(steps, [100 * r["mfu"] for r in train], color="tab:red", alpha=0.6)
        mfu_ax.set_ylabel("MFU %", color="tab:red")
    fig.suptitle(f"{run_dir.name}: {steps[-1]} steps, {train[-1].get('consumed_tokens', 0):,} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen2-plot-run",
        description="Plot a run's loss (train and eval) and throughput (tokens/s, MFU) to a PNG.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (run.dir of qwen2-train)")
    parser.add_argument("--out", type=Path, help="PNG path (default: <run_dir>/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "curves.png")
    except (OSError, ValueError) as err:
        return fail(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
