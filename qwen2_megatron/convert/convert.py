"""Hugging Face <-> megatron-core checkpoint conversion and verification, run on local processes.

Each direction builds the megatron model in a parallel layout (one process per rank, started by
parallel.local_launch) so that every process holds only its shard. Output goes to a hidden
temporary directory next to the target and is renamed into place only when every rank has
finished: a failed or interrupted conversion leaves no half-written output behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state

from qwen2_megatron.checkpoint.model_checkpoint import checkpoint_shape, load_model, read_info, save_model
from qwen2_megatron.convert.hf_io import HFCheckpoint, gather_hf_state, load_hf_weights, write_hf_shards
from qwen2_megatron.model.builder import build_model
from qwen2_megatron.model.forward import forward_logits
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_DTYPE = {v: k for k, v in _PRECISION.items()}


def import_hf(hf_dir: str | Path, out: str | Path, layout: ParallelLayout) -> Path:
    """Convert a Hugging Face Qwen2 / Qwen2-MoE directory to a megatron distributed checkpoint."""
    ckpt = HFCheckpoint(hf_dir)  # validates config and tensor list before any process starts
    if ckpt.dtype not in _PRECISION:
        raise ValueError(f"{hf_dir}: dtype {ckpt.dtype} is not supported; use float32 or bfloat16")
    world = layout.min_world_size()
    _check_layout(layout, ckpt.shape, world)
    return _publish(out, lambda tmp: spawn(_import_rank, world, str(hf_dir), str(tmp), layout))


def export_hf(ckpt_dir: str | Path, out: str | Path, layout: ParallelLayout | None = None) -> Path:
    """Convert a megatron checkpoint written by qwen2-megatron to a Hugging Face directory."""
    layout = layout or ParallelLayout()
    shape = checkpoint_shape(ckpt_dir)
    world = layout.min_world_size()
    _check_layout(layout, shape, world)
    return _publish(out, lambda tmp: spawn(_export_rank, world, str(ckpt_dir), str(tmp), layout))


def megatron_logits(
    ckpt_dir: str | Path, tokens: torch.Tensor, layout: ParallelLayout | None = None
) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of a megatron checkpoint, computed in the given layout."""
    layout = layout or ParallelLayout()
    world = layout.min_world_size()
    _check_layout(layout, checkpoint_shape(ckpt_dir), world, tokens.shape[1])
    results = spawn(_logits_rank, world, str(ckpt_dir), tokens, layout)
    return next(r for r in results if r is not None)


def verify(
    hf_dir: str | Path, ckpt_dir: str | Path, tokens: torch.Tensor, layout: ParallelLayout | None = None
) -> float:
    """Largest absolute logit difference between the HF model and the megatron checkpoint."""
    from transformers import AutoModelForCausalLM

    hf_shape = HFCheckpoint(hf_dir).shape
    if hf_shape != checkpoint_shape(ckpt_dir):
        raise ValueError(f"{hf_dir} and {ckpt_dir} hold models of different shapes")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(tokens).logits
    del model
    ours = megatron_logits(ckpt_dir, tokens, layout)
    return (ours - reference).abs().max().item()


def _check_layout(layout: ParallelLayout, shape: Qwen2Shape, world: int, seq: int | None = None) -> None:
    layout.resolve(world).check_model(shape, seq_length=seq)


def _publish(out: str | Path, write: Callable[[Path], object]) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        write(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _import_rank(hf_dir: str, tmp: str, layout: ParallelLayout) -> None:
    ckpt = HFCheckpoint(hf_dir)
    runtime = init_runtime(layout)
    try:
        precision = _PRECISION[ckpt.dtype]
        chunks = build_model(
            ckpt.shape, runtime.layout, precision, local_spec=True, perform_initialization=False
        )
        load_hf_weights(chunks, ckpt)
        save_model(chunks, tmp, ckpt.shape, runtime.layout, precision)
    finally:
        shutdown_runtime()


def _export_rank(ckpt_dir: str, tmp: str, layout: ParallelLayout) -> None:
    shape = checkpoint_shape(ckpt_dir)
    precision = read_info(ckpt_dir)["precision"]
    runtime = init_runtime(layout)
    try:
        chunks = build_model(
            shape, runtime.layout, precision, local_spec=True, perform_initialization=False
        )
        load_model(chunks, ckpt_dir, shape)
        if runtime.is_main:
            Path(tmp).mkdir(parents=True)
        torch.distributed.barrier()
        write_hf_shards(gather_hf_state(chunks, shape), Path(tmp), shape, _DTYPE[precision])
    finally:
        shutdown_runtime()


def _logits_rank(ckpt_dir: str, tokens: torch.Tensor, layout: ParallelLayout) -> torch.Tensor | None:
    shape = checkpoint_shape(ckpt_dir)
    runtime = init_runtime(layout)
    try:
        chunks = build_model(
            shape, runtime.layout, "fp32", parallel_output=False, local_spec=True,
            perform_initialization=False,
        )
        load_model(chunks, ckpt_dir, shape)
        for chunk in chunks:
            chunk.eval()
        logits = forward_logits(chunks, tokens)
        owner = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        return logits if owner else None
    finally:
        shutdown_runtime()
