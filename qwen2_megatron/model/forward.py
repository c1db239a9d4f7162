"""Forward (and backward) passes through megatron-core's pipeline schedules.

Every pass, with or without pipeline parallelism, goes through megatron-core's
get_forward_backward_func(), so the same code serves PP=1, 1F1B and interleaved schedules.

The LM loss is either megatron's (output layer, then vocab-parallel cross-entropy over the full
logits: the default) or, with `fused_loss`, fused_loss.FusedLMLoss, which GPTModel.forward runs on
the last pipeline stage as its output_processor: the same per-token losses and gradients without
materialising the [tokens, vocab] logits. This is the one place where the loss path is chosen.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from functools import partial
from typing import Any, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from qwen2_megatron.model.fused_loss import FusedLMLoss


def _position_ids(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def lm_loss(loss_mask: Tensor, per_token_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over the unmasked tokens of one micro-batch."""
    mask = loss_mask.float()
    loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _lm_step(
    data_iterator: Iterator[dict[str, Tensor]], model: torch.nn.Module, fused_loss: FusedLMLoss | None = None
) -> tuple[Tensor, Any]:
    batch = next(data_iterator)
    tokens = batch["tokens"]
    # GPTModel calls an output_processor only on the last pipeline stage, in place of its
    # output layer + cross-entropy; other stages return their hidden states as usual.
    # lm_loss is a mask-weighted mean: the gradient reaching the per-token losses is proportional to
    # the mask, which the fused loss then need not check in backward (a device synchronisation)
    fused = {} if fused_loss is None else {"output_processor": replace(fused_loss, mask_proportional=True),
                                           "loss_mask": batch["loss_mask"]}
    output = model(tokens, _position_ids(tokens), None, labels=batch["labels"], **fused)
    return output, partial(lm_loss, batch["loss_mask"])


def forward_backward(
    chunks: list[torch.nn.Module],
    micro_batches: list[dict[str, Tensor]],
    forward_only: bool = False,
    fused_loss: FusedLMLoss | None = None,
) -> list[dict[str, Tensor]]:
    """Run the micro-batches (dicts of tokens, labels, loss_mask, each [b, s]) through the model.

    Gradients accumulate in the parameters (or megatron DDP's buffers). Returns the per-micro-batch
    loss dicts on the last pipeline stage and an empty list elsewhere. fused_loss: compute the LM
    loss by the fused output layer + cross-entropy (None: megatron's plain path).
    """
    first = micro_batches[0]["tokens"]
    iterators = [iter(micro_batches) for _ in chunks]
    step = _lm_step if fused_loss is None else partial(_lm_step, fused_loss=fused_loss)
    # forward_only under no_grad, as Megatron-LM evaluates: no autograd graph is kept (megatron's
    # schedule itself only skips the backward)
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )


def forward_logits(chunks: list[torch.nn.Module], tokens: Tensor) -> Tensor | None:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage, None on other stages.

    Each sample is its own micro-batch (the interleaved schedule needs a multiple of the
    pipeline size). The chunks must be built with parallel_output=False (logits gathered over TP).
    """
    collected: list[Tensor] = []

    def step(data_iterator: Iterator[Tensor], model: torch.nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        output = model(batch, _position_ids(batch), None)

        def keep(logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            collected.append(logits.detach())
            return logits.sum() * 0.0, {}

        return output, keep

    samples = list(tokens.split(1))
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(samples) for _ in chunks] if len(chunks) > 1 else iter(samples),
            model=chunks,
            num_microbatches=len(samples),
            seq_length=tokens.shape[1],
            micro_batch_size=1,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat(collected)
