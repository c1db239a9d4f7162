"""The training loop. The constructor builds, in order: runtime -> model -> DDP -> optimizer ->
schedule -> data -> metrics and W&B; `train()` then runs steps until train.steps.

A step takes global_batch_size sequences as num_microbatches micro-batches per data-parallel
rank through megatron-core's pipeline schedule (gradient accumulation across micro-batches,
reduce over data parallel in megatron's DDP), then one guarded optimizer step.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from qwen2_megatron.checkpoint.manager import CheckpointManager
from qwen2_megatron.checkpoint.model_checkpoint import load_model
from qwen2_megatron.data.loader import build_data_loader
from qwen2_megatron.data.tokenizer import QwenTokenizer
from qwen2_megatron.model.builder import build_model
from qwen2_megatron.model.fast_paths import FastPaths
from qwen2_megatron.model.forward import forward_backward
from qwen2_megatron.model.fused_loss import FusedLMLoss
from qwen2_megatron.model.params import training_flops_per_token
from qwen2_megatron.model.rope import set_rope_base
from qwen2_megatron.model.spec import use_transformer_engine
from qwen2_megatron.model.wgrad_accumulation import enable_wgrad_accumulation_fusion
from qwen2_megatron.parallel.ddp import drop_stale_graphs, sync_params, wrap_ddp
from qwen2_megatron.parallel.runtime import init_runtime, process_env
from qwen2_megatron.train.config import StageConfig, TrainerConfig, num_microbatches, validate
from qwen2_megatron.train.metrics import MetricsLog, device_peak_tflops
from qwen2_megatron.train.moe_stats import ExpertLoad, aux_loss
from qwen2_megatron.train.optimizer import build_optimizer, build_scheduler, guarded_step
from qwen2_megatron.train.wandb_run import ID_FILE, WandbRun


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was not finite and the run is configured (or forced) to stop."""


_RECOMPUTE: dict[str, dict[str, Any]] = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        # First: a preemption signal during start-up must not kill the rank; the request is
        # honoured (checkpoint, exit 0) at the first step boundary.
        self._requests = {"stop": False}
        self._signal_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            self._build(cfg)
        except BaseException:
            self._restore_signal_handlers()  # else SIGTERM would only set a flag of this dead trainer
            raise

    def _build(self, cfg: TrainerConfig) -> None:
        validate(cfg, process_env()[1], use_transformer_engine())
        self.runtime = init_runtime(cfg.parallel, seed=cfg.train.seed)
        layout = self.runtime.layout
        self.run_dir = Path(cfg.run.dir)
        self.logging_rank = self.runtime.is_main
        if self.logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        dist.barrier()
        # before the model exists: the manager forks a helper process (see CheckpointManager)
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.model, layout, _param_precision(cfg))

        fp8 = {"fp8": "hybrid"} if cfg.train.precision == "fp8" else {}
        if cfg.train.grad_accum_fusion:
            enable_wgrad_accumulation_fusion()
        chunks = build_model(
            cfg.model, layout, _param_precision(cfg), moe_grouped_gemm=cfg.train.moe_grouped_gemm,
            fast=FastPaths(tuple(cfg.train.liger_kernels), cfg.train.compile, cfg.train.activation_memory_budget),
            gradient_accumulation_fusion=cfg.train.grad_accum_fusion, **_RECOMPUTE[cfg.train.recompute], **fp8,
        )
        if cfg.train.init_from:
            load_model(chunks, cfg.train.init_from, cfg.model)
        self.model = wrap_ddp(
            chunks, use_distributed_optimizer=cfg.optim.distributed_optimizer,
            overlap_grad_reduce=cfg.ddp.overlap_grad_reduce, overlap_param_gather=cfg.ddp.overlap_param_gather,
            bucket_size=cfg.ddp.bucket_size, average_in_collective=cfg.ddp.average_in_collective,
            fp32_grads=cfg.optim.fp32_master_weights,
        )
        self.optimizer = build_optimizer(cfg.optim, cfg.train.precision, self.model)
        self.scheduler = build_scheduler(cfg.optim, cfg.train, self.optimizer)
        self.fused_loss = (
            FusedLMLoss(cfg.train.fused_lm_loss_chunk, compiled=cfg.train.fused_lm_loss_compile,
                        grad_in_forward=cfg.train.fused_lm_loss_grad_in_forward)
            if cfg.train.fused_lm_loss
            else None
        )

        self.tokenizer = QwenTokenizer(cfg.data.tokenizer)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.seq_length = cfg.train.seq_length
        self.loader = self._loader(cfg.data, self.seq_length)
        self.eval_loader = None  # built on first evaluation

        self.step = 0
        self.last_grad_norm = float("nan")
        self.consumed_tokens = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        resumed = self.checkpoints.resume(chunks, self.optimizer)
        if resumed is not None:
            self._restore(resumed)
        self.expert_load = ExpertLoad(chunks, cfg.model) if cfg.model.is_moe else None
        self.metrics = MetricsLog(
            self.run_dir, cfg.train.steps, self.runtime.world_size,
            training_flops_per_token(cfg.model, self.seq_length),
            device_peak_tflops(cfg.log.peak_tflops), self.logging_rank, cfg.log.progress_bar,
            start_step=self.step,
        )
        self.wandb = (
            WandbRun(cfg.log.wandb, self.run_dir, cfg.run.name, asdict(cfg)) if self.logging_rank else None
        )

    # ----- data ---------------------------------------------------------------------------------

    def _loader(self, mixture: Any, seq_length: int) -> Any:
        return build_data_loader(
            mixture, self.tokenizer, seq_length, self.cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.runtime.layout.dp,
            dp_group=parallel_state.get_data_parallel_group(),
            model_vocab_size=self.cfg.model.vocab_size,
        )

    def _micro_batches(self, loader: Any) -> list[dict[str, torch.Tensor]]:
        n = num_microbatches(self.cfg, self.runtime.layout.dp)
        device = self.runtime.device
        # A copy from pageable host memory waits for the device's queue (the last update) to drain;
        # from pinned memory it is queued behind it, and the host goes on launching the step.
        pin = device.type == "cuda"
        return [{k: (v.pin_memory() if pin and not v.is_cuda else v).to(device, non_blocking=pin)
                 for k, v in next(loader).items()}
                for _ in range(n)]

    # ----- one step -----------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self._micro_batches(self.loader)
        losses = forward_backward(self.model, batches, fused_loss=self.fused_loss)
        mean_loss = self._global_mean([d["lm loss"] for d in losses])
        self.checkpoints.before_update()  # a captured asynchronous save is handed over and copied from here
        stepped, grad_norm = guarded_step(self.optimizer, self.cfg.optim.clip_in_fused_adam)
        loss = float(mean_loss)  # read once the update is queued: the device has work while the host waits
        self.last_grad_norm = grad_norm
        finite = stepped and math.isfinite(loss)
        if finite:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self._handle_nonfinite(loss, grad_norm)
        self.step += 1
        self.consumed_tokens += self.cfg.train.global_batch_size * self.seq_length
        return {"loss": loss, "grad_norm": grad_norm, "stepped": finite}

    def _handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"step {self.step + 1}: loss {loss}, grad norm {grad_norm}"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite {what}; the update was not applied (train.on_nonfinite=stop)")
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.logging_rank:
            print(f"warning: skipped the update of {what}", flush=True)
        if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive non-finite steps (last: {what}); stopping. Lower "
                "optim.lr, check the data, or raise train.max_consecutive_skips"
            )

    def _global_mean(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Mean over micro-batches and data-parallel replicas, known on every rank, as a float64
        device tensor: reading it synchronises with the device, which the caller does when it needs
        the number (after queuing the update, in a training step).

        Losses exist on the last pipeline stage only (on each of its TP ranks); the other ranks
        contribute zeros and are not counted.
        """
        total = torch.zeros(2, dtype=torch.float64, device=self.runtime.device)
        if values:
            total[0] = torch.stack([v.detach().reshape(()) for v in values]).double().sum()
            total[1] = len(values)
        dist.all_reduce(total)
        return total[0] / total[1]

    # ----- the loop -----------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Run to train.steps; returns the per-step losses (for tests and the caller's summary)."""
        history = []
        finished = False
        try:
            while self.step < self.cfg.train.steps:
                self.checkpoints.poll()
                self._apply_stage()
                start = time.perf_counter()
                result = self.train_step()
                seconds = time.perf_counter() - start
                history.append(result)
                self.metrics.step_done(result["loss"], self.cfg.train.global_batch_size * self.seq_length, seconds)
                last = self.step == self.cfg.train.steps
                if self.step % self.cfg.log.interval == 0 or last:
                    self._log()
                if self.cfg.train.eval_interval and self.step % self.cfg.train.eval_interval == 0:
                    self._log_eval()
                stop, save_now = self._pending_requests()
                if stop or save_now or self.checkpoints.due(self.step, last):
                    self.save()
                if stop:
                    self.checkpoints.wait()
                    if self.logging_rank:
                        print(f"stopping at step {self.step} on request (checkpoint saved)", flush=True)
                    break
            self.checkpoints.wait()
            sync_params(self.model)  # parameters whole on every rank for whoever reads them next
            finished = True
        finally:
            if not finished:
                self.checkpoints.abort()
            self.close()
        return history

    # ----- checkpoints --------------------------------------------------------------------------

    def save(self) -> None:
        """Collective: a full checkpoint of the current step."""
        sync_params(self.model)  # an overlapped all-gather may not have run since the last step
        state = {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "skipped_steps": self.skipped_steps,
            "seq_length": self.seq_length,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "wandb_run_id": _read_text(self.run_dir / ID_FILE),
            "config": OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
        }
        self.checkpoints.save(self.step, [c.module for c in self.model], self.optimizer, state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.consumed_tokens = state["consumed_tokens"]
        self.skipped_steps = state["skipped_steps"]
        self.scheduler.load_state_dict(state["scheduler"])
        for stage in self.cfg.train.stages:  # re-enter the stage the checkpoint was taken in
            if stage.start_step <= self.step:
                self._enter_stage(stage, resuming=True)
        self.loader.load_state_dict(state["data"])
        if state["wandb_run_id"] and self.logging_rank and not (self.run_dir / ID_FILE).exists():
            (self.run_dir / ID_FILE).write_text(state["wandb_run_id"] + "\n")

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._signal_handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._requests["stop"] = True

    def _pending_requests(self) -> tuple[bool, bool]:
        """(stop, save now), agreed by all ranks: a signal may reach only some of them; a SAVE
        file in the run directory asks for a checkpoint without stopping."""
        save_file = self.run_dir / "SAVE"
        flags = torch.tensor(
            [float(self._requests["stop"]), float(self.logging_rank and save_file.exists())],
            device=self.runtime.device,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] and self.logging_rank:
            save_file.unlink(missing_ok=True)
        return bool(flags[0]), bool(flags[1])

    def _apply_stage(self) -> None:
        stage = next((s for s in self.cfg.train.stages if s.start_step == self.step), None)
        if stage is not None:
            self._enter_stage(stage)

    def _enter_stage(self, stage: StageConfig, resuming: bool = False) -> None:
        """Switch sequence length (continuing the same document stream) and RoPE base.

        When resuming, the checkpoint's data state (taken inside the stage) is loaded afterwards.
        """
        if stage.seq_length != self.seq_length:
            state = None if resuming else self.loader.state_dict()
            self.loader.close()
            self.seq_length = stage.seq_length
            self.loader = self._loader(self.cfg.data, self.seq_length)
            if state is not None:
                self.loader.load_state_dict(state, seq_length_changed=True)
                self.metrics.flops_per_token = training_flops_per_token(self.cfg.model, self.seq_length)
        if stage.rope_theta is not None:
            set_rope_base([c.module for c in self.model], stage.rope_theta)
        if self.logging_rank and not resuming:
            print(f"stage at step {self.step}: seq_length {self.seq_length}, rope base "
                  f"{stage.rope_theta or 'unchanged'}", flush=True)

    def _log(self) -> None:
        extra: dict[str, Any] = {
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": self.last_grad_norm,
            "consumed_tokens": self.consumed_tokens,
            "skipped_steps": self.skipped_steps,
            "seq_length": self.seq_length,
        }
        if self.expert_load is not None:
            extra["moe_aux_loss"] = aux_loss(self.cfg.model, num_microbatches(self.cfg, self.runtime.layout.dp))
            extra.update(self.expert_load.report())
        record = self.metrics.emit(self.step, extra)
        if self.wandb is not None:
            self.wandb.log(record, self.step)

    def _log_eval(self) -> None:
        loss = self.evaluate()
        if self.logging_rank:
            record = {"step": self.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
            self.metrics.append(record)
            print(f"eval at step {self.step}: loss {loss:.4f}, perplexity {record['eval_perplexity']:.2f}", flush=True)
            if self.wandb is not None:
                self.wandb.log(record, self.step)

    def evaluate(self) -> float:
        """Mean loss over train.eval_steps global batches of the held-out data."""
        if self.eval_loader is None:
            heldout = replace(self.cfg.data.heldout(), num_lanes=self.runtime.layout.dp)
            self.eval_loader = self._loader(heldout, self.seq_length)
        for chunk in self.model:
            chunk.eval()
        values: list[torch.Tensor] = []
        for _ in range(self.cfg.train.eval_steps):
            out = forward_backward(
                self.model, self._micro_batches(self.eval_loader), forward_only=True, fused_loss=self.fused_loss
            )
            values += [d["lm loss"] for d in out]
        for chunk in self.model:
            chunk.train()
        return float(self._global_mean(values))

    def close(self) -> None:
        """Release what outlives a step: files, loaders, the W&B run; the previous signal
        handlers (the trainer's would keep it and its model alive) and stale autograd graphs."""
        self._restore_signal_handlers()
        self.checkpoints.close()
        drop_stale_graphs(self.model)
        self.metrics.close()
        self.loader.close()
        if self.eval_loader is not None:
            self.eval_loader.close()
        if self.wandb is not None:
            self.wandb.finish()


def _read_text(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _param_precision(cfg: TrainerConfig) -> str:
    return "fp32" if cfg.train.precision == "fp32" else "bf16"
