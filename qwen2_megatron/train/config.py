"""The trainer's structured (typed) configuration: one section per concern, composed by Hydra.

Each section is a dataclass; the model, layout and data sections are the classes their own
modules define (Qwen2Shape, ParallelLayout, MixtureConfig), so a config key is validated where it
is used. Hydra's ConfigStore holds the schema and the model presets; conf/ holds YAML choices
(layouts, data mixtures, experiments). A typo or a wrong type fails when the config is composed;
values that cannot work together fail in validate() before any process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.data.config import DataConfigError, MixtureConfig
from qwen2_megatron.launch.config import LauncherConfig
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout


class ConfigError(ValueError):
    """Training settings that cannot work together."""


@dataclass
class OptimConfig:
    """AdamW (Qwen2-style: no weight decay on norms and biases) and its learning-rate schedule.

    Defaults suit the tiny CPU demo; the recipes in conf/experiment set Qwen2's values.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_steps: int | None = None  # cosine/wsd: steps until min_lr (default: train.steps)
    wsd_decay_steps: int | None = None  # wsd: length of the final decay (default: 10% of steps)
    wsd_decay_style: str = "cosine"  # linear | cosine | exponential | minus_sqrt
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    fused_adam: bool = True  # torch's fused AdamW kernel where megatron-core falls back to torch's AdamW
    foreach_kernels: bool = True  # torch's foreach gradient norm / clipping where megatron falls back
    clip_in_fused_adam: bool = True  # fused AdamW applies the clipping factor in its kernel (no extra pass)
    # AdamW as one compiled pass over each contiguous run of the gradient buffers, in place of
    # torch's AdamW (train/flat_adam.py; not with Transformer Engine's or apex's FusedAdam)
    flat_adam: bool = False
    # bf16: false updates the bf16 weights in place with bf16 gradients and Adam states, 8 bytes
    # per parameter instead of 18 (transformers' pure-bf16 training); needs distributed_optimizer=false
    fp32_master_weights: bool = True


@dataclass
class StageConfig:
    """From `start_step` on, train with this sequence length and RoPE base (long-context phase)."""

    start_step: int
    seq_length: int
    rope_theta: float | None = None


@dataclass
class TrainConfig:
    """Steps, batch and numerics. Defaults are the CPU demo's (the 152k-token output layer
    dominates a tiny model's step on CPU, so the demo trains on short sequences)."""

    steps: int = 300
    global_batch_size: int = 4  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward/backward on one rank
    seq_length: int = 128
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 (fp32 master weights: optim.fp32_master_weights) | fp8 (Transformer Engine)
    recompute: str = "none"  # none | selective (attention core) | full (whole layers)
    fused_lm_loss: bool = False  # output layer + cross-entropy in chunks, no [tokens, vocab] logits
    fused_lm_loss_chunk: int = 2048  # tokens per chunk of the fused LM loss (its memory: chunk x vocab/TP)
    fused_lm_loss_compile: bool = False  # the fused LM loss's per-chunk arithmetic through torch.compile
    fused_lm_loss_grad_in_forward: bool = False  # its gradients computed in forward: no logits recompute
    on_nonfinite: str = "skip"  # skip the step | stop the run
    max_consecutive_skips: int = 5
    eval_interval: int = 0  # steps between evaluations; 0 = never
    eval_steps: int = 4  # global batches per evaluation
    init_from: str | None = None  # model weights to start from (a qwen2-convert checkpoint)
    moe_grouped_gemm: bool = False  # routed experts as grouped GEMMs without Transformer Engine
    grad_accum_fusion: bool = False  # weight-gradient GEMMs accumulate straight into the fp32 main_grad buffers
    # Fast paths of the local (no Transformer Engine) layers; each computes the same function:
    liger_kernels: list[str] = field(default_factory=list)  # Liger's fused rms_norm, swiglu, rope (GPU)
    compile: str = "none"  # none | layers (torch.compile every dense decoder layer)
    # compiled layers: the share of their activations kept for backward (torch's partitioner knob);
    # below 1 (0.7-0.99) element-wise results (norms, SwiGLU) are recomputed in backward instead
    activation_memory_budget: float = 1.0
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class DDPConfig:
    """Data-parallel gradient reduction and parameter all-gather (megatron-core's DDP).

    Every switch computes the same update as with it off (parallel/ddp.py). Megatron-LM
    recommends both overlaps on multi-GPU runs (conf/experiment recipes may set them); they stay off
    by default until a GPU run has measured them against the synchronous path.
    """

    overlap_grad_reduce: bool = False  # reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # all-gather updated params during the next forward (distributed optimizer)
    bucket_size: int | None = None  # parameters per bucket; None: max(40M, 1M x data-parallel size)
    average_in_collective: bool = False  # average inside the collective (ReduceOp.AVG: NCCL only)


@dataclass
class WandbConfig:
    """Weights & Biases; mode "disabled" writes nothing, "offline" writes local run files."""

    mode: str = "disabled"  # online | offline | disabled
    project: str = "qwen2-megatron"
    entity: str | None = None
    name: str | None = None  # default: run.name
    tags: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    interval: int = 10  # steps between metric lines
    progress_bar: bool = True
    peak_tflops: float | None = None  # per device; None: known GPUs (H100/H200: 989), else no MFU
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    dir: str = "runs/${run.name}"  # everything a run writes: config, metrics, W&B, checkpoints
    name: str = "tiny-demo"


@dataclass
class TrainerConfig:
    model: Qwen2Shape = field(default_factory=lambda: _tiny())
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: MixtureConfig = field(default_factory=MixtureConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def _tiny() -> Qwen2Shape:
    from qwen2_megatron.model.presets import get_preset

    return get_preset("tiny")


_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.wsd_decay_style": ("linear", "cosine", "exponential", "minus_sqrt"),
    "train.precision": ("fp32", "bf16", "fp8"),
    "train.recompute": ("none", "selective", "full"),
    "train.compile": ("none", "layers"),
    "train.on_nonfinite": ("skip", "stop"),
    "log.wandb.mode": ("online", "offline", "disabled"),
    "checkpoint.async_copy": ("auto", "overlap", "at_save"),
    "checkpoint.async_writer": ("fork", "persistent"),
}


def _get(cfg: TrainerConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def num_microbatches(cfg: TrainerConfig, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def validate(cfg: TrainerConfig, world_size: int, have_te: bool = False) -> ParallelLayout:
    """Check everything that can be checked before a process group or model exists.

    Returns the layout resolved for `world_size` (data parallel filled in).
    """
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: choose one of {list(allowed)}")
    t, o = cfg.train, cfg.optim
    for key in ("train.steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_length",
                "log.interval", "train.max_consecutive_skips", "train.eval_steps", "checkpoint.keep_last",
                "checkpoint.write_threads", "train.fused_lm_loss_chunk"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    if cfg.checkpoint.async_writer == "persistent" and not cfg.checkpoint.async_save:
        raise ConfigError("checkpoint.async_writer=persistent writes asynchronous saves: "
                          "set checkpoint.async_save=true as well")
    for key in ("fused_lm_loss_compile", "fused_lm_loss_grad_in_forward"):
        if getattr(t, key) and not t.fused_lm_loss:
            raise ConfigError(f"train.{key}=true changes the fused LM loss, which is off: "
                              "set train.fused_lm_loss=true as well")
    for key in ("checkpoint.interval", "checkpoint.keep_every", "train.eval_interval"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0 (0 turns it off)")
    if not (0 < o.lr and 0 <= o.min_lr <= o.lr and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} need 0 <= min_lr <= lr, lr > 0")
    decaying = o.schedule != "constant"
    if o.warmup_steps < 0 or (decaying and o.warmup_steps >= (o.decay_steps or t.steps)):
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be in [0, decay steps={o.decay_steps or t.steps}); "
            "shorten the warm-up or train longer"
        )
    if o.schedule == "wsd" and (o.wsd_decay_steps or 0) > (o.decay_steps or t.steps) - o.warmup_steps:
        raise ConfigError(f"optim.wsd_decay_steps={o.wsd_decay_steps} is longer than the steps after warm-up")
    if not o.fp32_master_weights:
        _check_pure_bf16(t, o)
    if o.flat_adam:
        _check_flat_adam()
    if t.precision == "fp8" and not have_te:
        raise ConfigError("train.precision=fp8 needs Transformer Engine on a GPU; use bf16 or install it")
    if cfg.ddp.bucket_size is not None and cfg.ddp.bucket_size < 1:
        raise ConfigError(f"ddp.bucket_size={cfg.ddp.bucket_size} must be >= 1 (or null for megatron's default)")
    if cfg.log.peak_tflops is not None and cfg.log.peak_tflops <= 0:
        raise ConfigError(f"log.peak_tflops={cfg.log.peak_tflops} must be positive (or null)")
    layout = cfg.parallel.resolve(world_size)
    _check_fast_paths(t, layout)
    longest = max([t.seq_length] + [s.seq_length for s in t.stages])
    layout.check_model(cfg.model, seq_length=longest, have_te=have_te)
    per_step = t.micro_batch_size * layout.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
            f"x data-parallel size = {t.micro_batch_size} x {layout.dp} = {per_step}; use "
            f"{max(per_step, t.global_batch_size // per_step * per_step)} (gradient accumulation "
            "fills the rest)"
        )
    microbatches = num_microbatches(cfg, layout.dp)
    if (layout.vpp or 1) > 1 and microbatches % layout.pp:
        raise ConfigError(
            f"the interleaved pipeline schedule needs the number of micro-batches ({microbatches}) "
            f"to be a multiple of pp={layout.pp}; raise train.global_batch_size"
        )
    for stage in t.stages:
        if not 0 < stage.start_step < t.steps:
            raise ConfigError(f"train.stages: start_step={stage.start_step} must be inside (0, {t.steps})")
        layout.check_model(cfg.model, seq_length=stage.seq_length, have_te=have_te)
    if [s.start_step for s in t.stages] != sorted({s.start_step for s in t.stages}):
        raise ConfigError("train.stages must have increasing, distinct start_step values")
    try:
        cfg.data.check_dp_size(layout.dp)
    except DataConfigError as err:
        raise ConfigError(str(err)) from None
    return layout


def _check_pure_bf16(t: TrainConfig, o: OptimConfig) -> None:
    if t.precision != "bf16":
        raise ConfigError(f"optim.fp32_master_weights=false applies to train.precision=bf16 (not {t.precision}): "
                          "fp32 training has no master copy to drop; set train.precision=bf16")
    if o.distributed_optimizer:
        raise ConfigError("optim.fp32_master_weights=false needs optim.distributed_optimizer=false: megatron-core's "
                          "distributed optimizer always keeps fp32 master shards (bf16 ones need Transformer "
                          "Engine's FusedAdam); bf16 states are not sharded, so this saves memory only while "
                          "the data-parallel size is below 6 (8 bytes per parameter against 6 + 12 / DP)")


def _check_flat_adam() -> None:
    import torch
    from megatron.core import optimizer as mcore_optimizer

    if mcore_optimizer.Adam is not torch.optim.AdamW:
        adam = mcore_optimizer.Adam
        raise ConfigError(f"optim.flat_adam replaces torch's AdamW, which megatron-core uses only without Transformer "
                          f"Engine and apex; here it uses {adam.__module__}.{adam.__name__}: set optim.flat_adam=false")


def _check_fast_paths(t: TrainConfig, layout: ParallelLayout) -> None:
    from qwen2_megatron.model import liger

    kernels = list(t.liger_kernels)
    unknown = [k for k in kernels if k not in liger.KERNELS]
    if unknown or len(set(kernels)) != len(kernels):
        raise ConfigError(f"train.liger_kernels={kernels}: distinct names from {list(liger.KERNELS)}")
    if kernels and not liger.available():
        raise ConfigError(f"train.liger_kernels={kernels} needs the liger-kernel package: {liger.INSTALL_HINT}")
    if not 0 < t.activation_memory_budget <= 1:
        raise ConfigError(f"train.activation_memory_budget={t.activation_memory_budget} must be in (0, 1]: 1 keeps "
                          "torch's choice, 0.7-0.99 recompute the compiled layers' element-wise results")
    if t.compile == "none":
        if t.activation_memory_budget != 1:
            raise ConfigError(f"train.activation_memory_budget={t.activation_memory_budget} applies to compiled "
                              "layers: set train.compile=layers as well, or leave it at 1")
        return
    if apart := [k for k in kernels if k not in liger.WITH_COMPILED_LAYERS]:
        raise ConfigError(f"train.compile=layers and train.liger_kernels={apart} are alternatives (inductor fuses "
                          f"those itself; only {list(liger.WITH_COMPILED_LAYERS)} combines with compiled layers); "
                          "drop them from train.liger_kernels or set train.compile=none")
    if layout.tp > 1:
        raise ConfigError(f"train.compile=layers supports tensor parallel size 1 only (tp={layout.tp}): the "
                          "asynchronous collectives of megatron's tensor-parallel linears break the compiled graphs")
    if t.recompute == "selective":
        raise ConfigError("train.compile=layers does not combine with train.recompute=selective (the attention "
                          "checkpoint breaks the compiled graph); use recompute=none or full")
