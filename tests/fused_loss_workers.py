"""Rank function for tests/test_fused_loss.py: every layout and embedding variant in one spawn.

Each rank measures, per case, the largest difference between the fused LM loss and megatron's
plain path (and the size of the compared values), and returns those numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce
from torch import Tensor

from qwen2_megatron.model.builder import build_model
from qwen2_megatron.model.forward import _position_ids, forward_backward
from qwen2_megatron.model import fused_loss as fused_loss_module
from qwen2_megatron.model.fused_loss import FusedLMLoss, fused_linear_cross_entropy
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.ddp import wrap_ddp
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
from qwen2_megatron.train.config import TrainerConfig
from qwen2_megatron.train.trainer import Trainer

SEQ, MICRO, VOCAB, HIDDEN = 16, 2, 96, 32
CHUNKS = (5, 10_000)  # several chunks in forward and backward; one chunk


@dataclass(frozen=True)
class Case:
    name: str
    layout: ParallelLayout
    tied: bool


Diff = tuple[float, float]  # (max |fused - plain|, max |plain|)


def _diff(fused: Tensor, plain: Tensor) -> Diff:
    return (fused - plain).abs().max().item(), plain.abs().max().item()


def _shape(tied: bool) -> Qwen2Shape:
    return Qwen2Shape(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied, initializer_range=0.2,
        max_position_embeddings=64,
    )


def _labels(gen: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    labels = torch.randint(0, VOCAB, shape, generator=gen)
    labels.view(-1)[::7] = -100  # out-of-vocabulary targets take megatron's convention too
    return labels


def _function_level(sp: bool) -> dict[str, Diff]:
    """fused_linear_cross_entropy against ColumnParallelLinear's linear + vocab_parallel_cross_entropy."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = tp_group.size(), tp_group.rank()
    gen = torch.Generator().manual_seed(3)  # the same global tensors on every rank
    hidden = torch.randn(SEQ, MICRO, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    labels = _labels(gen, (SEQ, MICRO))
    grad_out = torch.randn(SEQ, MICRO, generator=gen) * (torch.rand(SEQ, MICRO, generator=gen) > 0.3)
    rows = VOCAB // tp
    w_local = weight[rank * rows : (rank + 1) * rows]
    h_local = hidden.chunk(tp)[rank] if sp else hidden

    h = h_local.clone().requires_grad_()
    w = w_local.clone().requires_grad_()
    logits = linear_with_grad_accumulation_and_async_allreduce(
        h, w, None, gradient_accumulation_fusion=False, allreduce_dgrad=tp > 1 and not sp,
        sequence_parallel=sp, tp_group=tp_group,
    )
    plain = tensor_parallel.vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group)
    plain.backward(grad_out)
    out: dict[str, Diff] = {}
    for chunk in CHUNKS:
        hf = h_local.clone().requires_grad_()
        wf = w_local.clone().requires_grad_()
        fused = fused_linear_cross_entropy(hf, wf, labels, tp_group, sp, chunk_tokens=chunk)
        fused.backward(grad_out)
        out[f"fn{chunk}_loss"] = _diff(fused.detach(), plain.detach())
        out[f"fn{chunk}_hidden_grad"] = _diff(hf.grad, h.grad)
        out[f"fn{chunk}_weight_grad"] = _diff(wf.grad, w.grad)
    return out


def _batches(dp_rank: int) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(100 + dp_rank)
    batches = []
    for _ in range(2):
        mask = (torch.rand(MICRO, SEQ, generator=gen) > 0.25).long()
        batches.append({
            "tokens": torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen),
            "labels": torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen),
            "loss_mask": mask,
        })
    return batches


def _grads(chunks: list, batches: list, fused: FusedLMLoss | None) -> tuple[dict[str, Tensor], Tensor | None]:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    losses = forward_backward(chunks, batches, fused_loss=fused)
    grads = {
        f"{i}.{name}": p.main_grad.clone()
        for i, chunk in enumerate(chunks)
        for name, p in chunk.module.named_parameters()
    }
    loss = torch.stack([d["lm loss"] for d in losses]) if losses else None
    return grads, loss


def _model_level(case: Case) -> dict[str, Diff]:
    """Same model, plain path vs fused path: per-token losses, then DDP gradients of a step."""
    layout = init_runtime(case.layout).layout
    chunks = wrap_ddp(build_model(_shape(case.tied), layout))
    batches = _batches(parallel_state.get_data_parallel_rank())
    out: dict[str, Diff] = {}
    if layout.pp == 1:
        tokens, labels = batches[0]["tokens"], batches[0]["labels"]
        with torch.no_grad():
            plain = chunks[0](tokens, _position_ids(tokens), None, labels=labels)
            fused = chunks[0](tokens, _position_ids(tokens), None, labels=labels, output_processor=FusedLMLoss(5))
        assert plain.shape == fused.shape == (MICRO, SEQ), (plain.shape, fused.shape)
        out["model_per_token_loss"] = _diff(fused, plain)
        with torch.no_grad():  # without labels the processor returns the logits, as GPTModel does
            plain = chunks[0](tokens, _position_ids(tokens), None)
            fused = chunks[0](tokens, _position_ids(tokens), None, output_processor=FusedLMLoss(5))
        out["model_logits_without_labels"] = _diff(fused, plain)
    ref_grads, ref_loss = _grads(chunks, batches, None)
    early = FusedLMLoss(5, grad_in_forward=True)
    variants = {"step": (FusedLMLoss(5), False), "step_grad_accum_fusion": (FusedLMLoss(5), True),
                "step_grad_in_forward": (early, False), "step_grad_in_forward_accum_fusion": (early, True)}
    for label, (fused_loss, fusion) in variants.items():
        # gradient_accumulation_fusion (needs apex for megatron's own layer): the fused path adds
        # the weight gradient into main_grad itself, as megatron's linear layer would.
        for chunk in chunks:
            if chunk.module.post_process:
                chunk.module.output_layer.gradient_accumulation_fusion = fusion
        # gradients in forward must not fall back to recomputing the logits, nor check: the loss
        # gradient of the trainer's masked mean is proportional to the loss mask (forward.py says so)
        with _recompute_refused(fused_loss.grad_in_forward):
            grads, loss = _grads(chunks, batches, fused_loss)
        if ref_loss is not None:
            out[f"{label}_loss"] = _diff(loss, ref_loss)
        for name, grad in grads.items():
            out[f"{label}_grad:{name}"] = _diff(grad, ref_grads[name])
    for chunk in chunks:
        if chunk.module.post_process:
            chunk.module.output_layer.gradient_accumulation_fusion = False
    return out


@contextmanager
def _recompute_refused(refuse: bool) -> Iterator[None]:
    """While `refuse`, the fused loss's backward may neither recompute the logits nor check the loss
    gradient against the mask (a device synchronisation): both raise."""
    originals = {name: getattr(fused_loss_module, name) for name in ("_recompute_grads", "_is_mask_proportional")}

    def refused(*_: object) -> None:
        raise AssertionError("the fused loss recomputed its logits or checked its loss gradient in backward")

    if refuse:
        for name in originals:
            setattr(fused_loss_module, name, refused)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(fused_loss_module, name, original)


def fused_loss_rank(cases: list[Case], trainer_cfgs: list[TrainerConfig]) -> tuple[dict, list[list[float]]]:
    """The cases' differences, then the training losses of each trainer config."""
    results: dict[str, dict[str, Diff]] = {}
    for case in cases:
        out = _model_level(case)
        if case.layout.pp == 1 and not case.tied:
            out.update(_function_level(case.layout.sequence_parallel))
        results[case.name] = out
        shutdown_runtime(keep_process_group=True)
    losses = []
    for cfg in trainer_cfgs:
        losses.append([r["loss"] for r in Trainer(cfg).train()])
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return results, losses
