"""megatron-core's optimizer and learning-rate scheduler, and a step that refuses non-finite updates.

AdamW comes from get_megatron_optimizer (distributed optimizer optional; fp32 master weights with
bf16 parameters, or, with optim.fp32_master_weights=false, megatron's FP32Optimizer stepping the
bf16 parameters themselves with bf16 Adam states: transformers' pure-bf16 numerics), whose default
parameter groups already exempt 1-D parameters and biases from weight decay, as Qwen2's recipe
does. The schedule is megatron-core's OptimizerParamScheduler stepped once per optimizer step
(warm-up, then cosine, WSD or constant).

Without Transformer Engine or apex, megatron-core falls back to torch's AdamW in its default
(foreach) form, several passes over the fp32 master weights and states per step; optim.fused_adam
switches those to torch's fused kernel, one pass (measured on an H200: see README);
optim.flat_adam replaces that AdamW by one compiled pass per contiguous gradient run
(train/flat_adam.py). optim.foreach_kernels gives its gradient norm and clipping torch's multi-tensor kernels
(train/multi_tensor.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from qwen2_megatron.train.config import OptimConfig, TrainConfig
from qwen2_megatron.train.flat_adam import FlatAdamW, use_flat_adam
from qwen2_megatron.train.multi_tensor import use_foreach_kernels

_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def build_optimizer(
    optim: OptimConfig, precision: str, chunks: list[torch.nn.Module]
) -> MegatronOptimizer:
    low_precision = precision in ("bf16", "fp8")
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        # bf16=False with bf16 parameters: megatron's FP32Optimizer, no master copy (validated:
        # only without the distributed optimizer, which always makes fp32 master shards)
        bf16=low_precision and optim.fp32_master_weights,
        params_dtype=torch.bfloat16 if low_precision else torch.float32,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    use_foreach_kernels(optim.foreach_kernels)
    optimizer = get_megatron_optimizer(config, chunks)
    if optim.flat_adam:
        for inner in inner_optimizers(optimizer):
            if getattr(inner, "optimizer", None) is not None:
                use_flat_adam(inner)
    elif optim.fused_adam:
        _use_fused_adam(optimizer)
    return optimizer


def inner_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    """The megatron optimizers inside a ChainedOptimizer (MoE: dense and expert), or the one given."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def adam_tensors(optimizer: MegatronOptimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the inner torch optimizers hold: the parameters they step (the model's own weights, or
    fp32 master copies of them) and their states (Adam's m and v; step counters excluded)."""
    adams = [inner.optimizer for inner in inner_optimizers(optimizer) if inner.optimizer is not None]
    stepped = [p for adam in adams for group in adam.param_groups for p in group["params"]]
    states = [t for adam in adams for state in adam.state.values() for key, t in state.items() if key != "step"]
    return stepped, states


def stepping_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    """The inner optimizers that hold parameters (a stub or empty one takes no part in a step)."""
    return [inner for inner in inner_optimizers(optimizer) if inner.get_parameters()]


def _use_fused_adam(optimizer: MegatronOptimizer) -> None:
    """Switch megatron's torch AdamW fallback to torch's fused implementation (same update rule).

    megatron-core builds torch.optim.AdamW without a way to pass fused=True; torch reads the flag
    from each parameter group at every step, so setting it there is enough. TE's or apex's
    FusedAdam (used when installed) is left alone.
    """
    for inner in inner_optimizers(optimizer):
        adam = getattr(inner, "optimizer", None)
        if isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
            adam.defaults.update(fused=True, foreach=False)
            for group in adam.param_groups:
                group.update(fused=True, foreach=False)


def adam_step_tensor(group: dict[str, Any], param: torch.Tensor, step: int) -> torch.Tensor:
    """Adam's step count as torch keeps it: on the parameter's device for the fused and capturable
    forms (their kernels read it there), else on the CPU."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def build_scheduler(optim: OptimConfig, train: TrainConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    decay = optim.decay_steps or train.steps
    wsd = optim.wsd_decay_steps or max(1, train.steps // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=_STYLE[optim.schedule],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        wsd_decay_steps=wsd if optim.schedule == "wsd" else None,
        lr_wsd_decay_style=optim.wsd_decay_style if optim.schedule == "wsd" else None,
    )


def guarded_step(optimizer: MegatronOptimizer, clip_in_fused_adam: bool = False) -> tuple[bool, float]:
    """Step only if the gradient norm is finite; returns (stepped, grad norm).

    megatron's own step() would clip with a NaN coefficient and write NaN into the weights, so
    its three phases run here with the decision in between: prepare the gradients, take their
    norm once (reduced over all model-parallel ranks, so every rank decides alike; a
    ChainedOptimizer combines its dense and expert norms), then clip every inner optimizer's
    gradients by that total norm as megatron's step does, and update. With clip_in_fused_adam
    (optim.clip_in_fused_adam) and torch's fused AdamW everywhere, the clipping factor goes to
    the fused kernel as its grad_scale (the AMP unscaling input: gradients divided by it as they
    are read), which saves the separate multiply over all fp32 gradients.

    Where megatron gives the norm as a device tensor (optim.foreach_kernels, or TE) and the update
    is torch's fused AdamW throughout, the decision is taken on the device too (_step_on_device):
    the host reads the norm only after the update is queued, so the GPU never idles between the
    backward pass and the optimizer step waiting for the host.
    """
    if optimizer.prepare_grads():  # an fp16 loss scaler found inf/NaN (and lowered its scale)
        return False, float("nan")
    norm = optimizer.get_grad_norm()
    inners = stepping_optimizers(optimizer)
    if isinstance(norm, torch.Tensor) and (adams := _device_decidable(inners, clip_in_fused_adam)):
        return _step_on_device(optimizer, adams, inners[0].config.clip_grad, norm)
    value = float(norm)
    if not math.isfinite(value):
        return False, value
    scaled = _clip_in_fused_adam(inners, value) if clip_in_fused_adam else []
    if not scaled:
        for inner in inners:
            if inner.config.clip_grad > 0.0:  # megatron's clipping, given the norm as megatron gave it
                _clip_by_total_norm(inner.get_parameters(), inner.config.clip_grad, norm)
    try:
        return bool(optimizer.step_with_ready_grads()), value
    finally:
        for adam in scaled:
            del adam.grad_scale


def _fused_adams(inners: list[Any]) -> list[Any]:
    """The torch AdamW of every inner optimizer if each is torch's fused AdamW or a FlatAdamW (both
    take grad_scale and found_inf as device tensors), else []."""
    adams = [getattr(inner, "optimizer", None) for inner in inners]
    fused = all(isinstance(a, FlatAdamW) or (isinstance(a, torch.optim.Adam | torch.optim.AdamW)
                                              and all(g.get("fused") for g in a.param_groups)) for a in adams)
    return adams if adams and fused else []


def _device_decidable(inners: list[Any], clip_in_fused_adam: bool) -> list[Any]:
    """The fused AdamWs that can take the step decision and the clipping on the device, or []:
    torch's fused AdamW everywhere (it skips its update where its found_inf input is 1), and
    either no clipping or one clip_grad applied inside those kernels (clip_in_fused_adam)."""
    clips = {inner.config.clip_grad for inner in inners}
    if len(clips) != 1 or (clips.pop() > 0.0 and not clip_in_fused_adam):
        return []
    return _fused_adams(inners)


def _step_on_device(optimizer: MegatronOptimizer, adams: list[Any], clip: float, norm: torch.Tensor) -> tuple[bool, float]:
    """guarded_step's update with its decision in the fused AdamW kernels: found_inf = 1 where the
    norm is not finite (the kernel then changes neither weights nor states, and torch takes its
    step count back), grad_scale = megatron's clipping factor inverted where it clips (as
    _clip_in_fused_adam), 1 elsewhere. Skipped updates leave megatron's copies of unchanged
    weights (master -> model parameters) unchanged too."""
    norm = norm.detach().reshape(()).float()
    finite = torch.isfinite(norm)
    found_inf = (~finite).float()
    scale = None
    if clip > 0.0:
        scale = torch.where(finite, ((norm + 1.0e-6) / clip).clamp(min=1.0), torch.ones_like(norm))
    try:
        for adam in adams:
            device = adam.param_groups[0]["params"][0].device
            adam.found_inf = found_inf.to(device)
            if scale is not None:
                adam.grad_scale = scale.to(device)
        updated = bool(optimizer.step_with_ready_grads())
    finally:
        for adam in adams:
            adam.__dict__.pop("found_inf", None)
            adam.__dict__.pop("grad_scale", None)
    value = float(norm)  # the one synchronisation, with the update already queued behind it
    return updated and math.isfinite(value), value


def _clip_coefficient(clip: float, norm: float) -> float:
    """megatron's clipping factor; gradients are scaled by it only where it is below 1."""
    return clip / (norm + 1.0e-6)


def _clip_by_total_norm(params: list[torch.nn.Parameter], clip: float, norm: float | torch.Tensor) -> None:
    """megatron's clipping of fp32 gradients; the bf16 gradients of pure bf16 (optim.fp32_master_weights
    =false), which megatron's function refuses, are scaled by the same factor with torch's foreach kernel."""
    grads = [p.grad for p in params if p.grad is not None]
    if all(g.dtype == torch.float32 for g in grads):
        # looked up at call time: the CPU compatibility layer wraps it after import
        clip_grads.clip_grad_by_total_norm_fp32(params, clip, norm)
    elif (coeff := _clip_coefficient(clip, float(norm))) < 1.0:
        torch._foreach_mul_(grads, coeff)


def _clip_in_fused_adam(inners: list[Any], norm: float) -> list[Any]:
    """Hand megatron's clipping factor (clip_grad / (norm + 1e-6), applied when below 1) to each
    torch fused AdamW as grad_scale = 1 / factor; the optimizers so set, or [] (then clip as
    megatron does) unless every one of them is torch's fused AdamW with the same clip_grad."""
    adams = _fused_adams(inners)
    clips = {inner.config.clip_grad for inner in inners}
    if not adams or len(clips) != 1 or (clip := clips.pop()) <= 0.0:  # clip_grad <= 0: no clipping
        return []
    coeff = _clip_coefficient(clip, norm)
    if coeff >= 1.0:  # megatron scales only by factors below 1
        return []
    for adam in adams:
        device = adam.param_groups[0]["params"][0].device
        adam.grad_scale = torch.tensor(1.0 / coeff, dtype=torch.float32, device=device)
    return adams
