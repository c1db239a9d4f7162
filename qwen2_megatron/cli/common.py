"""Command-line pieces shared by the console scripts."""

from __future__ import annotations

import argparse
import sys

from qwen2_megatron.parallel.layout import ParallelLayout


def add_layout_args(parser: argparse.ArgumentParser, title: str) -> None:
    group = parser.add_argument_group("parallel layout", title)
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE)")
    group.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")
    group.add_argument("--sp", action="store_true", help="sequence parallel (needs tp > 1)")


def layout_from_args(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(
        tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp, sequence_parallel=args.sp
    )


def fail(err: BaseException) -> int:
    """Print a user error (no traceback: the message names the problem and the fix)."""
    print(f"error: {err}", file=sys.stderr)
    return 2
