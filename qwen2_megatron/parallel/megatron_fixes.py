"""Fixes for megatron-core 0.19 bugs that are not about CUDA (so they apply on GPU too).

Applied once by the runtime; each is a small wrapper around the one megatron function at fault.

1. Distributed optimizer, "fully_reshardable" checkpoints, torch Adam (no apex / Transformer
   Engine): loading copies every tensor in the live optimizer state from the checkpoint, but
   torch Adam keeps its step counter as a tensor state that the checkpoint does not hold
   (megatron stores it in param_groups), so loading fails with KeyError: 'step'. The wrapper
   hides "step" from that copy and puts it back; train_checkpoint restores its value.
"""

from __future__ import annotations

from typing import Any

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _fix_reshardable_adam_step()
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
