"""Fused output layer + cross-entropy: per-token LM loss without the [tokens, vocab] logits.

megatron-core 0.19.2 has no fused linear + cross-entropy (it fuses only the cross-entropy over
already computed logits: config.cross_entropy_loss_fusion), so GPTModel's loss path is
    logits = output_layer(hidden)                    [s, b, vocab/TP]  compute dtype
    loss   = vocab_parallel_cross_entropy(logits)    fp32 copy of the logits, kept for backward
which for a 152k vocabulary holds far more memory than the rest of the last pipeline stage's
activations. FusedLMLoss computes the same per-token losses and the same gradients from the
hidden states and the (vocab-parallel) output weight, a chunk at a time:

- forward, over token chunks of `chunk_tokens` rows: local logits of the chunk in the compute
  dtype, then in fp32 the row max (all-reduced MAX over TP), exp-sum and target logit (one SUM
  all-reduce over TP; the target logit comes from the rank owning it), exactly megatron's
  vocab_parallel_cross_entropy. Only the loss and the log-sum-exp per token (fp32) are kept.
  Without TP the row's statistics need no collective between the max and the exp-sum, so both
  are one function (`loss_and_lse`), which inductor compiles into one pass over the chunk.
- backward, over vocabulary chunks of the local shard (as many columns as keep the chunk's
  logits no larger than a forward chunk's): recompute the chunk's logits for all tokens,
  softmax = exp(logits - lse), subtract the one-hot of the targets, scale by the incoming
  per-token gradient; then the weight gradient of those vocabulary rows is one GEMM over all
  tokens (as the plain path's, written straight into its rows: no accumulation across chunks),
  and the hidden-state gradient is accumulated over the chunks in fp32 ([tokens, hidden]).

Tensor / sequence parallelism follow ColumnParallelLinear: under sequence parallelism the
sequence-sharded hidden states are all-gathered over TP (in forward, and again in backward, so
only the local shard is saved) and the hidden-state gradient is reduce-scattered; without it the
hidden-state gradient is all-reduced over TP. The weight gradient is returned as the parameter's
gradient (megatron's DDP hook adds it to main_grad), or, when the output layer has
gradient_accumulation_fusion and the weight a main_grad, added straight into main_grad with a dummy
gradient returned and weight.grad_added_to_main_grad set, as megatron's
LinearWithGradAccumulationAndAsyncCommunication does (tied embeddings with zero_out_wgrad included).

Memory (T tokens of a micro-batch on this TP rank's output layer, V vocabulary, TP ranks,
c = chunk_tokens, H hidden, e = bytes of the compute dtype, 2 for bf16):
- plain path: the logits T x V/TP in the compute dtype and their fp32 copy (exp'ed in place into
  the softmax), which is saved for backward; in backward the fp32 logits gradient (in place) and
  its cast to the compute dtype. Peak T x V/TP x (4 + e) bytes in forward and again in backward,
  of which T x V/TP x 4 bytes stay alive from forward to backward.
  Qwen2-7B, T = 8192 (micro-batch 2 x 4096), TP = 1, bf16: 8192 x 152064 x 6 B = 7.5 GB peak,
  5.0 GB kept between forward and backward.
- fused path: between forward and backward only 2 x T fp32 (loss, lse) plus the saved hidden
  states (already saved by the plain path's output layer). Transient, inside forward:
  c x V/TP x (e + 4) bytes (chunk logits and their fp32 copy);
  inside backward: T x c_v x (4 + e) bytes with c_v = ceil(c x (V/TP) / T) vocabulary
  columns, i.e. about the same as a forward chunk, plus T x H x 4 bytes for the fp32
  hidden-state gradient. Same example with c = 2048 (the default): 2048 x 152064 x 6 B = 1.9 GB
  transient (c = 1024: 0.9 GB; c = 4096: 3.7 GB), nothing vocabulary-sized kept across forward
  and backward. The weight gradient is the same V/TP x H tensor the plain path produces.
  Measured on CPU (fp32, T = 2048, H = 64, V/TP = 75968, forward + backward, peak RSS above the
  inputs): plain matmul + torch cross_entropy 2382 MB, fused c = 256: 181 MB, c = 2048: 625 MB.
Cost: one extra logits GEMM (recomputed in backward): about 8 T V H / TP flops instead of 6.

Gradients in forward (train.fused_lm_loss_grad_in_forward, given the loss mask): the trainer's
loss is the masked mean of the per-token losses, so the gradient reaching each token's loss is c
times its mask, with c (1 / tokens, micro-batches, loss scale) known only in backward. Forward
then also computes, from each token chunk's logits while they exist, the hidden-state gradient and
the weight gradient for a loss gradient equal to the mask (the weight gradient summed over the
chunks in fp32), and backward only scales both by c: 6 T V H / TP flops, as Liger's fused linear
cross-entropy. Backward checks that the incoming gradient is c times the mask (one boolean read
back from the device) and otherwise recomputes as above, so any other use of the per-token loss
still gets its exact gradients; the trainer's loss (forward.py's lm_loss, a masked mean) declares
it instead (mask_proportional), so its backward never waits for the device. Memory: the fp32
weight gradient V/TP x H x 4 bytes and the hidden-state gradient T x H in the compute dtype are
held from forward to backward (Qwen2-7B, TP = 1: 2.2 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim
from torch import Tensor
from torch.autograd.function import once_differentiable

from qwen2_megatron.model.wgrad_accumulation import TorchWgradGemm


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the compute dtypes (bf16, fp16, fp32), as megatron's cross-entropy; fp64 stays."""
    return torch.promote_types(dtype, torch.float32)


def _tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _row_max(logits: Tensor, acc: torch.dtype) -> Tensor:
    """Per-row max of a chunk's logits, in the loss dtype."""
    return logits.to(acc).amax(dim=-1)


def _target_and_sum_exp(logits: Tensor, row_max: Tensor, local: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(logit of each row's target minus the row max, or 0 where another TP rank owns the target;
    sum of exp(logits - row max)) for a chunk [c, V/TP]; `local` is the target's column here."""
    shifted = logits.to(acc)  # in place from here: a copy unless the logits are already fp32
    shifted -= row_max.unsqueeze(-1)
    v_local = shifted.shape[-1]
    mine = (local >= 0) & (local < v_local)
    target = shifted.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(mine, target, 0.0), shifted.exp_().sum(dim=-1)


def _loss_and_lse(logits: Tensor, local: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Without TP (the chunk holds the whole vocabulary): (loss, log-sum-exp) of each row of a
    chunk [c, V] in the loss dtype; a target outside 0..V-1 counts as megatron's does (loss
    log(sum(exp(logits - max)))). Max and exp-sum in one function: compiled, inductor matches its
    online-softmax pattern (amax, subtract, exp, sum) on a GPU and reads the logits once for
    both, where `row_max` and `target_and_sum_exp` are two kernels and small ones between."""
    x = logits.to(acc, copy=True)  # in place from here (the logits themselves may be needed later)
    v = x.shape[-1]
    row_max = x.amax(dim=-1, keepdim=True)
    target = x.gather(-1, local.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1)
    x -= row_max
    lse = (x.exp_().sum(dim=-1, keepdim=True).log() + row_max).squeeze(-1)
    mine = (local >= 0) & (local < v)
    return lse - torch.where(mine, target, row_max.squeeze(-1)), lse


def _grad_logits(logits: Tensor, lse: Tensor, grad_loss: Tensor, column: Tensor) -> Tensor:
    """d loss / d logits of a vocabulary chunk [T, cv], in the logits' dtype: (softmax minus the
    one-hot of the targets that fall in this chunk, `column` in 0..cv-1) times the loss gradient."""
    probs = logits.to(lse.dtype)
    probs -= lse.unsqueeze(-1)
    probs.exp_()
    # The one-hot by a comparison (a column outside 0..cv-1 matches none), not a scatter into
    # probs: compiled, the whole function is then one pointwise kernel that reads the logits once
    # and writes the gradient. A scatter between the exp and the product made inductor write and
    # re-read an fp32 [T, cv] intermediate: two kernels, 0.87 ms of the 1.29 ms spent on each
    # 2048-token chunk of the 1.5B vocabulary on an H200 (tools/GPU_RESULTS.md).
    # uint8, not bool: torch subtracts no bool tensor; eagerly a 1-byte temporary per element.
    probs -= (torch.arange(probs.shape[-1], device=probs.device) == column.unsqueeze(-1)).to(torch.uint8)
    probs *= grad_loss.unsqueeze(-1)
    return probs.to(logits.dtype)


@dataclass(frozen=True)
class ChunkMath:
    """The element-wise and reduction work on each chunk of logits, apart from the GEMMs and the
    TP collectives. Eager, it makes about six fp32 passes over each chunk in forward and seven in
    backward, and holds an fp32 copy of it. That is where the eager fused loss lost to transformers'
    compiled cross-entropy on an H200 (tools/GPU_RESULTS.md). Compiled (torch.compile, inductor),
    each function becomes one fused kernel that reads the chunk's logits once in their own dtype
    (train.fused_lm_loss_compile: +14% tokens/s on 1.5B on an H200)."""

    row_max: Any
    target_and_sum_exp: Any
    loss_and_lse: Any  # without TP, in place of the two above
    grad_logits: Any


_FUNCTIONS = (_row_max, _target_and_sum_exp, _loss_and_lse, _grad_logits)
_EAGER = ChunkMath(*_FUNCTIONS)
# dynamic=None: the first shapes compile static; the last, shorter chunk recompiles once, dynamic.
_COMPILED = ChunkMath(*(torch.compile(f) for f in _FUNCTIONS))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits = hidden @ weight.T over a vocabulary sharded over TP.

    hidden: [s_local, b, H] ([s / TP, b, H] under sequence parallelism); weight: [V / TP, H],
    this rank's rows of the vocabulary (rank r owns rows r * V/TP ...); labels: [s, b]. Returns the
    fp32 loss [s, b] (fp64 for fp64 inputs). A label outside the vocabulary (e.g. -100) gets what
    megatron's vocab_parallel_cross_entropy gives it: loss log(sum(exp(logits - max))), gradient
    the softmax (the loss mask is expected to exclude such tokens). loss_mask: [s, b] or None; given
    (and a gradient wanted), the gradients are computed in forward (module docstring).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        loss_mask: Tensor | None,
        tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool,
        chunk_tokens: int,
        gradient_accumulation_fusion: bool,
        compiled: bool,
        mask_proportional: bool,
    ) -> Tensor:
        tp = _tp_size(tp_group)
        total = _gather_along_first_dim(hidden, tp_group) if sequence_parallel and tp > 1 else hidden
        if total.shape[:-1] != labels.shape:
            raise ValueError(f"hidden states {tuple(total.shape)} do not match labels {tuple(labels.shape)}")
        if loss_mask is not None and loss_mask.shape != labels.shape:
            raise ValueError(f"loss mask {tuple(loss_mask.shape)} does not match labels {tuple(labels.shape)}")
        x = total.reshape(-1, total.shape[-1])
        n, v_local = x.shape[0], weight.shape[0]
        local = labels.reshape(-1) - _tp_rank(tp_group) * v_local  # each target's column on this rank
        acc = _loss_dtype(x.dtype)
        loss = torch.empty(n, dtype=acc, device=x.device)
        lse = torch.empty(n, dtype=acc, device=x.device)
        chunk = _COMPILED if compiled else _EAGER
        # Gradients in forward (see the module docstring): for per-token loss gradients
        # proportional to the mask, computed from each chunk's logits while they exist.
        early = loss_mask is not None and any(ctx.needs_input_grad[:2])
        mask = loss_mask.reshape(-1).to(acc) if early else None
        early_x = torch.empty_like(x) if early else None
        early_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if early and ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            logits = torch.matmul(x[start:end], weight.t())  # [c, V/TP] compute dtype
            if tp == 1:
                loss[start:end], lse[start:end] = chunk.loss_and_lse(logits, local[start:end], acc)
            else:
                loss[start:end], lse[start:end] = _vocab_parallel_loss(
                    chunk, logits, local[start:end], acc, tp_group, copy=early and logits.dtype == acc
                )
            if early:
                grad_logits = chunk.grad_logits(logits, lse[start:end], mask[start:end], local[start:end])
                torch.matmul(grad_logits, weight, out=early_x[start:end])
                if early_w is not None:
                    _accumulate_wgrad(early_w, grad_logits, x[start:end])
            del logits
        ctx.save_for_backward(hidden, weight, local, lse, mask, early_x, early_w)
        ctx.tp_group = tp_group
        ctx.sequence_parallel = sequence_parallel and tp > 1
        ctx.chunk_tokens = chunk_tokens
        ctx.chunk = chunk
        ctx.mask_proportional = mask_proportional
        # As megatron's linear layer: the buffer is looked up at forward (a module may be reused).
        ctx.main_grad = getattr(weight, "main_grad", None) if gradient_accumulation_fusion else None
        return loss.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, local, lse, mask, early_x, early_w = ctx.saved_tensors
        g = grad_loss.reshape(-1).to(lse.dtype)
        scale = None
        if early_x is not None:
            scale = _scale_of(g, mask)
            if not ctx.mask_proportional and not _is_mask_proportional(g, scale, mask):
                scale = None
        if scale is not None:
            grad_x = (early_x * scale).to(hidden.dtype)
            grad_w = None
            if early_w is not None:
                if ctx.main_grad is not None:
                    ctx.main_grad.addcmul_(early_w, scale)
                else:
                    grad_w = (early_w * scale).to(weight.dtype)
        else:  # no early gradient, or the loss gradient is not mask-proportional: recompute
            grad_x, grad_w = _recompute_grads(ctx, hidden, weight, local, lse, g)
        grad_hidden = _reduce_hidden_grad(ctx, grad_x.view(-1, *hidden.shape[1:]))  # [s, b, H], s gathered
        return (grad_hidden, _dummy_if_fused(ctx, weight, hidden.dtype, grad_w), *([None] * 8))


def _vocab_parallel_loss(
    chunk: ChunkMath, logits: Tensor, local: Tensor, acc: torch.dtype, tp_group: dist.ProcessGroup, copy: bool
) -> tuple[Tensor, Tensor]:
    """(loss, log-sum-exp) of each row of a chunk [c, V/TP] of logits sharded over TP, as megatron's
    vocab_parallel_cross_entropy: the row max all-reduced (MAX), then the target logit and the
    exp-sum (SUM). copy: work on a copy (fp32 logits that the early gradient still needs)."""
    row_max = chunk.row_max(logits, acc)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    both = torch.stack(chunk.target_and_sum_exp(logits.clone() if copy else logits, row_max, local, acc))
    dist.all_reduce(both, group=tp_group)
    log_sum = both[1].log()
    return log_sum - both[0], log_sum + row_max


def _scale_of(g: Tensor, mask: Tensor) -> Tensor:
    """c with g = c * mask if g has that form, as a 0-dim tensor on the device (no synchronisation)."""
    i = mask.abs().argmax()
    return torch.where(mask[i] != 0, g[i] / mask[i], torch.zeros((), dtype=g.dtype, device=g.device))


def _is_mask_proportional(g: Tensor, c: Tensor, mask: Tensor) -> bool:
    """Whether g = c * mask (to rounding); reads one boolean back from the device."""
    return torch.allclose(g, c * mask, rtol=1e-6, atol=0.0)


def _accumulate_wgrad(grad_w: Tensor, grad_logits: Tensor, x: Tensor) -> None:
    """grad_w (the loss dtype) += grad_logits^T @ x, accumulated in grad_w's precision."""
    if grad_logits.dtype == grad_w.dtype:
        grad_w.addmm_(grad_logits.t(), x)
    else:
        TorchWgradGemm.wgrad_gemm_accum_fp32(x, grad_logits, grad_w)


def _reduce_hidden_grad(ctx: Any, grad_x: Tensor) -> Tensor:
    """The hidden-state gradient of the full (gathered) sequence -> this rank's, over TP."""
    if ctx.sequence_parallel:
        return _reduce_scatter_along_first_dim(grad_x, ctx.tp_group)
    if _tp_size(ctx.tp_group) > 1:
        dist.all_reduce(grad_x, group=ctx.tp_group)
    return grad_x


def _dummy_if_fused(ctx: Any, weight: Tensor, dtype: torch.dtype, grad_w: Tensor | None) -> Tensor | None:
    """megatron's convention for gradient_accumulation_fusion: the real gradient is in main_grad;
    a dummy one keeps DDP's backward hook firing on this thread."""
    main_grad = ctx.main_grad
    if main_grad is None or not ctx.needs_input_grad[1] or not hasattr(weight, "grad_added_to_main_grad"):
        return grad_w
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(main_grad.shape, dtype=dtype, device=main_grad.device)
    return torch.empty(main_grad.shape, dtype=dtype, device=main_grad.device)


def _recompute_grads(
    ctx: Any, hidden: Tensor, weight: Tensor, local: Tensor, lse: Tensor, g: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(hidden-state gradient of the gathered sequence in the hidden dtype, weight gradient or None
    when it went into main_grad) by recomputing the logits a vocabulary chunk at a time."""
    tp_group = ctx.tp_group
    total = _gather_along_first_dim(hidden, tp_group) if ctx.sequence_parallel else hidden
    x = total.reshape(-1, total.shape[-1])
    n, v_local = x.shape[0], weight.shape[0]
    acc = lse.dtype
    main_grad = ctx.main_grad
    want_wgrad = ctx.needs_input_grad[1]
    grad_w = torch.empty_like(weight) if want_wgrad and main_grad is None else None
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    # Vocabulary columns per chunk: the chunk's logits no larger than a forward chunk's.
    cols = max(1, min(v_local, math.ceil(ctx.chunk_tokens * v_local / max(n, 1))))
    for start in range(0, v_local, cols):
        end = min(start + cols, v_local)
        w = weight[start:end]
        grad_logits = ctx.chunk.grad_logits(torch.matmul(x, w.t()), lse, g, local - start)  # [T, cv]
        if grad_x.dtype == grad_logits.dtype:
            grad_x.addmm_(grad_logits, w)
        else:
            grad_x += torch.matmul(grad_logits, w).to(acc)
        if main_grad is not None and want_wgrad:
            block = main_grad[start:end]
            if block.dtype == grad_logits.dtype:
                block.addmm_(grad_logits.t(), x)
            else:
                block += torch.matmul(grad_logits.t(), x).to(block.dtype)
        elif grad_w is not None:
            torch.matmul(grad_logits.t(), x, out=grad_w[start:end])
    return grad_x.to(hidden.dtype), grad_w


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_tokens: int = 2048,
    gradient_accumulation_fusion: bool = False,
    compiled: bool = False,
    loss_mask: Tensor | None = None,
    mask_proportional: bool = False,
) -> Tensor:
    """Per-token fp32 loss [s, b] of hidden [s(/TP), b, H] against labels [s, b]; see the class.

    compiled: run the per-chunk arithmetic through torch.compile (ChunkMath).
    loss_mask: [s, b]; given, the gradients are computed in forward for a loss gradient
    proportional to it (see the module docstring).
    mask_proportional: the caller guarantees that the loss gradient is proportional to loss_mask
    (its loss is a mask-weighted mean of the per-token losses), so backward does not check it and
    never waits for the device.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if not torch.is_grad_enabled():  # evaluation: no gradients to compute early (forward cannot tell)
        loss_mask = None
    return FusedLinearCrossEntropy.apply(
        hidden, weight, labels, loss_mask, tp_group, sequence_parallel, chunk_tokens, gradient_accumulation_fusion,
        compiled, mask_proportional,
    )


@dataclass(frozen=True)
class FusedLMLoss:
    """GPTModel output_processor: per-token LM loss [b, s] by fused_linear_cross_entropy.

    Passed as `output_processor=` to GPTModel.forward (megatron-core calls it on the last pipeline
    stage, after the decoder and final norm, instead of output layer + cross-entropy), it returns
    what GPTModel returns with labels: the fp32 per-token loss [b, s]. The weight is the output
    layer's, or the word embeddings' when they are tied (megatron passes it as output_weight).
    Without labels it returns the logits [b, s, vocab(/TP)] as GPTModel would.
    """

    chunk_tokens: int = 2048
    compiled: bool = False  # the per-chunk arithmetic through torch.compile (ChunkMath)
    grad_in_forward: bool = False  # gradients computed in forward for the loss mask (module docstring)
    # the loss is a mask-weighted mean (forward.py's lm_loss): backward takes the scale unchecked
    mask_proportional: bool = False

    def __call__(
        self,
        *,
        hidden_states: Tensor,
        output_layer: torch.nn.Module,
        output_weight: Tensor | None,
        labels: Tensor | None,
        config: Any,
        runtime_gather_output: bool | None = None,
        loss_mask: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        if labels is None:
            logits, _bias = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
            return logits.transpose(0, 1).contiguous()
        if getattr(config, "use_mup", False) or getattr(config, "defer_embedding_wgrad_compute", False):
            raise NotImplementedError("the fused LM loss supports neither MuP logit scaling nor deferred wgrad")
        if type(output_layer) is not ColumnParallelLinear or output_layer.bias is not None:
            raise NotImplementedError(
                f"the fused LM loss replaces megatron's ColumnParallelLinear without bias, not {output_layer}"
            )
        # The output layer's forward is bypassed: run its forward pre-hooks, which is where
        # megatron's DDP waits for the overlapped all-gather of its weight (ddp.overlap_param_gather).
        for hook in output_layer._forward_pre_hooks.values():
            hook(output_layer, (hidden_states,))
        weight = output_layer.weight if output_weight is None else output_weight
        loss = fused_linear_cross_entropy(
            hidden_states,
            weight,
            labels.transpose(0, 1).contiguous(),  # [b, s] -> [s, b], as megatron's loss
            tp_group=output_layer.tp_group,
            sequence_parallel=output_layer.sequence_parallel,
            chunk_tokens=self.chunk_tokens,
            gradient_accumulation_fusion=output_layer.gradient_accumulation_fusion,
            compiled=self.compiled,
            loss_mask=loss_mask.transpose(0, 1).contiguous() if self.grad_in_forward and loss_mask is not None else None,
            mask_proportional=self.mask_proportional,
        )
        return loss.transpose(0, 1).contiguous()
