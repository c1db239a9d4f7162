"""qwen2-checkpoint: inspect training checkpoints without loading them into a model.

  qwen2-checkpoint inspect runs/x/checkpoints/step_00000300   one checkpoint in detail
  qwen2-checkpoint inspect --checksums <step dir>             ... reading every shard back
  qwen2-checkpoint list runs/x/checkpoints                    every checkpoint of a run
Exporting to Hugging Face format is `qwen2-convert export --checkpoint <step dir>`.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen2_megatron.checkpoint.location import Location, location
from qwen2_megatron.checkpoint.model_checkpoint import read_info
from qwen2_megatron.checkpoint.store import TRAIN_STATE, CheckpointStore
from qwen2_megatron.checkpoint.validate import (
    CorruptShardError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
    check_files,
    verify_checksums,
)
from qwen2_megatron.cli.common import fail


def describe(path: Location, checksums: bool = False) -> dict:
    """What a checkpoint holds and whether it is complete and loadable; with `checksums`, also
    whether every shard still holds the bytes it was written with (reads them all)."""
    info = read_info(path)
    state_file = path / TRAIN_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    try:
        check_files(path, training=bool(state))
        if checksums:
            verify_checksums(path)
        problem = None
    except (IncompleteCheckpointError, UnsafeCheckpointError, CorruptShardError) as err:
        problem = str(err)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    model = info["model"]
    return {
        "path": str(path),
        "complete": problem is None,
        "problem": problem,
        "kind": "training" if state else "weights only",
        "step": state.get("step"),
        "consumed_tokens": state.get("consumed_tokens"),
        "layout": info["layout"],
        "precision": info["precision"],
        "model": {k: model[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "num_experts")},
        "size_bytes": size,
        "versions": info["versions"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2-checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="one checkpoint in detail")
    inspect.add_argument("path", type=location)
    inspect.add_argument(
        "--checksums", action="store_true", help="also read every shard back and verify its checksums"
    )
    sub.add_parser("list", help="the checkpoints of a checkpoint directory").add_argument("dir")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            report = describe(args.path, args.checksums)
            print(json.dumps(report, indent=2) if args.json else _text(report))
            return 0 if report["complete"] else 1
        listing = CheckpointStore(args.dir).listing()
        for path in listing.complete:
            report = describe(path)
            print(json.dumps(report) if args.json else f"{path.name}  step {report['step']}  "
                  f"{report['size_bytes'] / 2**20:.1f} MiB  {'ok' if report['complete'] else report['problem']}")
        for path in listing.incomplete:
            print(f"{path.name}  incomplete (an interrupted save; never resumed from)")
    except (OSError, ValueError) as err:
        return fail(err)
    return 0


def _text(report: dict) -> str:
    lines = [f"{k:16s} {v}" for k, v in report.items() if k not in ("problem",)]
    if report["problem"]:
        lines.append(f"{'problem':16s} {report['problem']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
