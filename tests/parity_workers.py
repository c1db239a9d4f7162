"""Rank functions for the multi-process tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import Tensor

from qwen2_megatron.convert.hf_io import HFCheckpoint, gather_hf_state, load_hf_weights
from qwen2_megatron.model.builder import build_model
from qwen2_megatron.model.forward import forward_backward, forward_logits
from qwen2_megatron.parallel.ddp import wrap_ddp
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime


def parity_rank(
    cases: list[tuple[str, dict[str, ParallelLayout]]], tokens: Tensor, labels: Tensor, grads: bool
) -> list[dict[str, dict]]:
    """For each (HF model directory, layouts) case and layout: logits and HF-named gradients.

    Samples are split over data-parallel ranks (rank r takes samples r, r + dp, ...), each
    sample is one micro-batch, and the loss is the mean token cross-entropy.
    """
    results = []
    for hf_dir, layouts in cases:
        ckpt = HFCheckpoint(hf_dir)
        per_layout: dict[str, dict] = {}
        for name, layout in layouts.items():
            runtime = init_runtime(layout)
            dp_rank = parallel_state.get_data_parallel_rank()
            mine = slice(dp_rank, None, runtime.layout.dp)
            out: dict = {"dp_rank": dp_rank, "logits": None, "grads": {}}
            chunks = build_model(ckpt.shape, runtime.layout, parallel_output=False)
            load_hf_weights(chunks, ckpt)
            logits = forward_logits(chunks, tokens[mine])
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                out["logits"] = logits
            if grads:
                chunks = wrap_ddp(build_model(ckpt.shape, runtime.layout))
                load_hf_weights([c.module for c in chunks], ckpt)
                batches = [
                    {"tokens": t[None], "labels": l[None], "loss_mask": torch.ones_like(l[None])}
                    for t, l in zip(tokens[mine], labels[mine])
                ]
                forward_backward(chunks, batches)
                out["grads"] = gather_hf_state([c.module for c in chunks], ckpt.shape, grads=True)
            per_layout[name] = out
            shutdown_runtime(keep_process_group=True)
        results.append(per_layout)
    shutdown_runtime()
    return results
