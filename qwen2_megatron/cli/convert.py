"""qwen2-convert: Hugging Face Qwen2 / Qwen2-MoE <-> megatron-core distributed checkpoints."""

from __future__ import annotations

import argparse
import sys

import torch

from qwen2_megatron.cli.common import add_layout_args, fail, layout_from_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2-convert",
        description=(
            "Convert Qwen2 / Qwen2-MoE checkpoints between Hugging Face format (config.json + "
            "safetensors) and megatron-core distributed checkpoints (torch_dist), and verify a "
            "conversion. Runs one local CPU/GPU process per rank of the given layout; each holds "
            "only its shard. Output is written to a temporary directory and renamed into place "
            "when complete."
        ),
        epilog=(
            "examples:\n"
            "  qwen2-convert import --hf ./Qwen2-7B --out ckpt/qwen2_7b --tp 2\n"
            "  qwen2-convert export --checkpoint ckpt/qwen2_7b --out ./Qwen2-7B-trained --pp 4\n"
            "  qwen2-convert verify --hf ./Qwen2-7B --checkpoint ckpt/qwen2_7b --tokens 9707,1879"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> megatron checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face model directory")
    imp.add_argument("--out", required=True, help="new megatron checkpoint directory")
    add_layout_args(imp, "layout the conversion processes use (any layout can load the result)")
    exp = sub.add_parser("export", help="megatron checkpoint -> Hugging Face directory")
    exp.add_argument("--checkpoint", required=True, help="megatron checkpoint directory")
    exp.add_argument("--out", required=True, help="new Hugging Face model directory")
    add_layout_args(exp, "layout the conversion processes use; pp > 1 splits the memory")
    ver = sub.add_parser("verify", help="largest logit difference between both sides")
    ver.add_argument("--hf", required=True, help="Hugging Face model directory")
    ver.add_argument("--checkpoint", required=True, help="megatron checkpoint directory")
    ver.add_argument("--tokens", help="comma-separated token ids (default: 64 random ids)")
    ver.add_argument("--tolerance", type=float, default=1e-4, help="fail above this (default 1e-4)")
    add_layout_args(ver, "layout the megatron side runs in")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qwen2_megatron.convert import convert

    try:
        layout = layout_from_args(args)
        if args.command == "import":
            out = convert.import_hf(args.hf, args.out, layout)
            print(f"wrote megatron checkpoint {out}")
        elif args.command == "export":
            out = convert.export_hf(args.checkpoint, args.out, layout)
            print(f"wrote Hugging Face model {out}")
        else:
            shape = convert.checkpoint_shape(args.checkpoint)
            tokens = _tokens(args.tokens, shape.vocab_size)
            diff = convert.verify(args.hf, args.checkpoint, tokens, layout)
            verdict = "OK" if diff <= args.tolerance else "MISMATCH"
            print(f"max |logit difference| = {diff:.3e} over {tokens.shape[1]} tokens: {verdict}")
            return 0 if diff <= args.tolerance else 1
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        return fail(err)
    return 0


def _tokens(text: str | None, vocab: int) -> torch.Tensor:
    if text is None:
        return torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected comma-separated integers") from None
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"--tokens must be non-empty ids in [0, {vocab})")
    return torch.tensor([ids])


if __name__ == "__main__":
    sys.exit(main())
