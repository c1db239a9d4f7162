"""Wrap model chunks in megatron-core's DistributedDataParallel, wired for its schedules.

megatron's DDP keeps gradients in contiguous buffers (param.main_grad) and reduces them over the
data-parallel group; finalize_model_grads, called by the pipeline schedules at the end of a
step, also all-reduces the sequence-parallel norm gradients over TP and the tied embedding /
output-layer gradients between the first and last pipeline stages.

Communication overlap (the trainer's `ddp` section), wired as Megatron-LM's training loop does:
- overlap_grad_reduce: each bucket's reduce(-scatter) starts asynchronously as soon as its
  gradients of the last micro-batch are ready; the schedules run the other micro-batches under
  config.no_sync_func, start a chunk's remaining buckets with config.grad_sync_func, and
  finalize_model_grads waits for all of them.
- overlap_param_gather (distributed optimizer only): the optimizer step updates only this rank's
  shard; the all-gather of the updated parameters is started bucket by bucket in forward
  pre-hooks of the next forward pass. Until then other ranks' shards are stale in this rank's
  parameters, so whatever reads parameters outside a forward pass (checkpoint saves, export)
  must call sync_params() first. megatron puts a pre-hook on every module; inside a compiled
  module (train.compile) each would break the graph, so a compiled module gets one eager hook
  that waits for all its parameters instead.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from qwen2_megatron.model.wgrad_accumulation import keep_wgrad_flags


def wrap_ddp(
    chunks: list[torch.nn.Module],
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: int | None = None,
    average_in_collective: bool = False,
    fp32_grads: bool = True,
) -> list[DistributedDataParallel]:
    """One DDP wrapper per chunk; gradients are kept and reduced in fp32 (`fp32_grads`), else in the
    parameters' dtype (pure bf16: optim.fp32_master_weights=false).

    overlap_param_gather applies only with the distributed optimizer (it is ignored otherwise).
    bucket_size: parameters per gradient bucket (None: megatron's default, max(40M, 1M x DP);
    without overlap_grad_reduce everything is one bucket). average_in_collective divides by the
    data-parallel size inside the collective (ReduceOp.AVG, NCCL only) instead of before it.
    """
    if average_in_collective and "nccl" not in str(torch.distributed.get_backend()):
        raise ValueError("ddp.average_in_collective needs NCCL (ReduceOp.AVG); gloo cannot average")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32_grads,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather and use_distributed_optimizer,
        bucket_size=bucket_size,
        average_in_collective=average_in_collective,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's gradients may be bucketed lazily (megatron-LM's rule).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    config = chunks[0].config  # one TransformerConfig shared by all chunks of a model

    def per_chunk(method: str) -> object:
        fns = [getattr(chunk, method) for chunk in wrapped]
        return fns[0] if len(fns) == 1 else fns

    for chunk in wrapped:
        _one_wait_per_compiled_module(chunk)
        keep_wgrad_flags(chunk)
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = per_chunk("no_sync")
        config.grad_sync_func = per_chunk("start_grad_sync")  # Megatron-LM's align_grad_reduce
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def sync_params(chunks: list[DistributedDataParallel]) -> None:
    """Complete every parameter on every rank now if the all-gather after the optimizer step
    is overlapped with the next forward pass (a no-op otherwise). Collective."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def drop_stale_graphs(chunks: list[DistributedDataParallel]) -> None:
    """Detach the tensors of a past forward pass that modules keep as attributes, so that the
    model can be freed once its trainer is done.

    megatron's MoE token dispatchers keep the last routing probabilities (`probs`), autograd graph
    included. That graph reaches the parameters' gradient accumulators, which hold DDP's gradient
    hooks, which refer to the DDP wrapper and through it to the model and the dispatcher: a cycle
    through C++ autograd nodes that Python's garbage collector cannot see, so the model and its
    gradient buffers would stay allocated for the life of the process.
    """
    for chunk in chunks:
        for module in chunk.modules():
            holders = [module, *(v for v in vars(module).values() if isinstance(v, MoETokenDispatcher))]
            for holder in holders:
                stale = {k: v for k, v in vars(holder).items() if isinstance(v, torch.Tensor) and v.grad_fn is not None}
                for name, tensor in stale.items():
                    setattr(holder, name, tensor.detach())


class _NoHook:
    def remove(self) -> None:
        pass


def _one_wait_per_compiled_module(ddp: DistributedDataParallel) -> None:
    """Replace DDP's param-gather pre-hooks inside each torch.compile'd module by one eager
    (not traced) pre-hook on that module that finishes the all-gathers of all its parameters."""
    if not ddp.use_forward_hook:
        return
    handles = ddp.remove_forward_pre_hook_handles
    for module in ddp.module.modules():
        if getattr(module, "_compiled_call_impl", None) is None or isinstance(handles.get(module), _NoHook):
            continue
        for sub in module.modules():
            handles[sub].remove()
            handles[sub] = _NoHook()
        params = [p for p in module.parameters() if p in ddp.param_to_bucket_group]

        @torch.compiler.disable
        def wait(_module: torch.nn.Module, *_: object, params: list = params) -> None:
            skip_next = ddp.ddp_config.align_param_gather or ddp.overlap_param_gather_with_optimizer_step
            for param in params:
                ddp.param_to_bucket_group[param].finish_param_sync(skip_next_bucket_dispatch=skip_next)

        handles[module] = module.register_forward_pre_hook(wait)
