"""torch's foreach kernels in place of megatron-core's per-tensor stand-ins for apex's multi-tensor ops.

Without Transformer Engine or apex, megatron-core's gradient norm and clipping (clip_grads) and its
fp16-optimizer copies use local fallbacks from megatron.core.utils: the L2 norm takes one norm per
tensor and turns each into a Python float (one device synchronisation per gradient tensor, twice
a step with clipping), and scaling allocates a product per tensor before copying it back.
torch's _foreach_norm / _foreach_mul_ / _foreach_copy_ do the same arithmetic in a few
multi-tensor kernels with no synchronisation. They are installed through the module-level kernel
choices megatron makes at import (l2_norm_impl, multi_tensor_scale_impl, and the
multi_tensor_scale_tensor_impl that only TE provides: with it, megatron returns the gradient norm
as a device tensor, as it does under TE), only where those are still megatron's fallbacks, so
TE's or apex's kernels are never replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer


def foreach_l2_norm(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args: Any
) -> tuple[torch.Tensor, None]:
    """The L2 norm of all tensors of tensor_lists[0] together, as a 1-element fp32 tensor on their
    device (amp_C.multi_tensor_l2norm's contract without per-tensor norms); fp32 arithmetic for
    bf16 inputs too, as amp_C's."""
    del chunk_size, noop_flag, args
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not used by megatron-core's clipping")
    norms = torch._foreach_norm(tensor_lists[0], 2, dtype=torch.float32)  # accumulated in fp32
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.reshape(1), None


def foreach_scale(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], scale: float | torch.Tensor
) -> None:
    """tensor_lists[1][i] = tensor_lists[0][i] * scale (amp_C.multi_tensor_scale's contract); scale a
    float, or a 0-dim device tensor that is never read on the host."""
    del chunk_size, noop_flag
    sources, targets = tensor_lists
    if all(source is target for source, target in zip(sources, targets, strict=True)):
        torch._foreach_mul_(targets, scale)
    elif isinstance(scale, float) and scale == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def foreach_scale_tensor(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], scale: torch.Tensor
) -> None:
    """foreach_scale by a 1-element device tensor (Transformer Engine's multi_tensor_scale_tensor
    contract): read on the device, never on the host."""
    foreach_scale(chunk_size, noop_flag, tensor_lists, scale.reshape(()))


def use_foreach_kernels(enabled: bool) -> bool:
    """Put the foreach kernels (enabled) or megatron-core's own fallbacks back where megatron
    uses its fallbacks; True if it did. A kernel of Transformer Engine or apex is always kept.
    """
    swapped = False
    choices = (
        (clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm, foreach_l2_norm),
        # TE's tensor-scale kernel, absent without TE (None): with it, megatron's gradient norm stays
        # a device tensor (no host synchronisation) and its clipping reads the factor on the device
        (clip_grads, "multi_tensor_scale_tensor_impl", None, foreach_scale_tensor),
        (clip_grads, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale, foreach_scale),
        (mcore_optimizer, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale, foreach_scale),
    )
    for module, name, fallback, foreach in choices:
        if getattr(module, name) in (fallback, foreach):
            setattr(module, name, foreach if enabled else fallback)
            swapped = True
    return swapped
