"""Fixes for megatron-core 0.19 bugs that are not about CUDA (so they apply on GPU too).

Applied once by the runtime; each is a small wrapper around the one megatron function at fault.

1. Distributed optimizer, "fully_reshardable" checkpoints, torch Adam (no apex / Transformer
   Engine): loading copies every tensor in the live optimizer state from the checkpoint, but
   torch Adam keeps its step counter as a tensor state that the checkpoint does not hold
   (megatron stores it in param_groups), so loading fails with KeyError: 'step'. The wrapper
   hides "step" from that copy and puts it back; train_checkpoint restores its value.
2. Distributed optimizer, "fully_reshardable" checkpoints, a gradient buffer of more than one
   bucket (ddp.overlap_grad_reduce with more parameters than ddp.bucket_size): saving gathers
   the state bucket by bucket without each bucket's end padding, then slices it with parameter
   offsets that include that padding, so every parameter after the first bucket is saved from
   the wrong place (the overshoot zero-padded, with the warning "param range exceeds unpadded
   buffer"). Fixed upstream after 0.19.2 (NVIDIA/Megatron-LM#5077) the same way: the wrapper
   rebases the offsets by the padding stripped before each bucket while the state is sliced.
"""

from __future__ import annotations

from typing import Any

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _fix_reshardable_adam_step()
    _fix_reshardable_multi_bucket_save()
    _applied = True


def _fix_reshardable_adam_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _fix_reshardable_multi_bucket_save() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = [buffer.param_index_map for buffer in self.buffers]
        for buffer in self.buffers:
            stripped, before = 0, []  # end padding of the buckets before each bucket
            for bucket in buffer.buckets:
                before.append(stripped)
                stripped += bucket.grad_data.numel() - bucket.numel_unpadded
            buffer.param_index_map = {
                param: (start - before[b], end - before[b], b)
                for param, (start, end, b) in buffer.param_index_map.items()
            }
        try:
            return original(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, saved):
                buffer.param_index_map = index_map

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_state
