"""Rank function for test_perf_levers.py: grouped-GEMM experts beside megatron's SequentialMLP
(logits, gradients, model checkpoints across layouts) and training runs, all in one spawn
(megatron's import dominates start-up). The training runs read seeded random tokens instead of
the data pipeline (whose tokenizer would need the 152k vocabulary), so their models are tiny."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from qwen2_megatron.checkpoint.model_checkpoint import load_model, save_model
from qwen2_megatron.convert.hf_io import HFCheckpoint, gather_hf_state, load_hf_weights
from qwen2_megatron.model.builder import build_model
from qwen2_megatron.model.forward import forward_backward, forward_logits
from qwen2_megatron.parallel.ddp import wrap_ddp
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
from qwen2_megatron.train.config import TrainerConfig
from qwen2_megatron.train.flat_adam import FlatAdamW
from qwen2_megatron.train.optimizer import _clip_in_fused_adam, guarded_step, inner_optimizers, stepping_optimizers
from qwen2_megatron.train import trainer as trainer_module
from qwen2_megatron.train.trainer import Trainer


def _experts_function(ckpt: HFCheckpoint, layout: ParallelLayout, precision: str, tokens: Tensor,
                      labels: Tensor) -> dict[bool, dict[str, Any]]:
    """Logits and HF-named gradients with sequential (False) and grouped (True) experts, the
    samples split over data parallel."""
    mine = slice(parallel_state.get_data_parallel_rank(), None, parallel_state.get_data_parallel_world_size())
    first_tp = parallel_state.get_tensor_model_parallel_rank() == 0
    batches = [{"tokens": t[None], "labels": l[None], "loss_mask": torch.ones_like(l[None])}
               for t, l in zip(tokens[mine], labels[mine])]
    out = {}
    for grouped in (False, True):
        chunks = build_model(ckpt.shape, layout, precision, parallel_output=False, moe_grouped_gemm=grouped)
        kinds = {type(m).__name__ for c in chunks for m in c.modules()}
        load_hf_weights(chunks, ckpt)
        logits = forward_logits(chunks, tokens[mine])
        model = wrap_ddp(build_model(ckpt.shape, layout, precision, moe_grouped_gemm=grouped))
        load_hf_weights([c.module for c in model], ckpt)
        forward_backward(model, batches)
        out[grouped] = {
            "logits": logits if first_tp else None,
            "grads": gather_hf_state([c.module for c in model], ckpt.shape, grads=True),
            "grouped_module": "GroupedExperts" in kinds, "sequential_module": "SequentialMLP" in kinds,
        }
    return out


def _checkpoint_roundtrip(ckpt: HFCheckpoint, root: Path, save_as: tuple[ParallelLayout, bool],
                          load_as: tuple[ParallelLayout, bool]) -> dict[str, Tensor]:
    """HF weights -> model (save_as layout, grouped?) -> dist checkpoint -> model (load_as) -> HF tensors."""
    path = root / f"ckpt-{save_as[0].ep}-{save_as[1]}"
    runtime = init_runtime(save_as[0])
    chunks = build_model(ckpt.shape, runtime.layout, moe_grouped_gemm=save_as[1], perform_initialization=False)
    load_hf_weights(chunks, ckpt)
    save_model(chunks, path, ckpt.shape, runtime.layout, "fp32")
    shutdown_runtime(keep_process_group=True)
    runtime = init_runtime(load_as[0])
    chunks = build_model(ckpt.shape, runtime.layout, moe_grouped_gemm=load_as[1])
    load_model(chunks, path, ckpt.shape)
    state = gather_hf_state(chunks, ckpt.shape)
    shutdown_runtime(keep_process_group=True)
    return state


class _RandomTokens:
    """Stands in for the trainer's data loader: seeded random micro-batches per data-parallel
    rank, numbered, so that a resumed run reads what the uninterrupted run read."""

    def __init__(self, vocab: int, seq_length: int, micro_batch_size: int, dp_rank: int) -> None:
        self.vocab, self.shape, self.dp_rank, self.consumed = vocab, (micro_batch_size, seq_length + 1), dp_rank, 0

    def __iter__(self) -> "_RandomTokens":
        return self

    def __next__(self) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(1000 * self.consumed + self.dp_rank)
        self.consumed += 1
        window = torch.randint(0, self.vocab, self.shape, generator=gen)
        mask = torch.ones(self.shape[0], self.shape[1] - 1)
        return {"tokens": window[:, :-1], "labels": window[:, 1:], "loss_mask": mask}

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int], seq_length_changed: bool = False) -> None:
        self.consumed = state["consumed"]

    def close(self) -> None:
        pass


def _random_tokens(_mixture: Any, _tokenizer: Any, seq_length: int, micro_batch_size: int, *, dp_rank: int,
                   model_vocab_size: int, **_: Any) -> _RandomTokens:
    return _RandomTokens(model_vocab_size, seq_length, micro_batch_size, dp_rank)


def _megatron_step(optimizer: Any, _clip_in_fused_adam: bool = False) -> tuple[bool, float]:
    """megatron-core's own optimizer step (prepare, norm and clip, update), for comparison with
    the trainer's guarded_step."""
    stepped, norm, _ = optimizer.step()
    return bool(stepped), float(norm)


def _train(cfg: TrainerConfig, megatron_step: bool) -> dict[str, Any] | str:
    """Per-step losses and gradient norms, the sum of squares of this rank's parameters after
    training and, with compiled layers (dynamo's eager backend: the graphs, not inductor's code),
    how many graphs dynamo made. megatron_step: megatron's optimizer.step() instead of the
    trainer's guarded_step. Errors come back as text."""
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda module, *a, **k: compile_module(module, backend="eager")
    trainer_module.guarded_step = _megatron_step if megatron_step else guarded_step
    torch._dynamo.reset()
    counters.clear()
    try:
        trainer = Trainer(cfg)
        records = trainer.train()
        losses, norms = [r["loss"] for r in records], [r["grad_norm"] for r in records]
        params = [p for chunk in trainer.model for p in chunk.module.parameters()]
        digest = sum(float(p.detach().double().square().sum()) for p in params)
        groups = [g for inner in inner_optimizers(trainer.optimizer) for g in inner.optimizer.param_groups]
        adams = [inner.optimizer for inner in inner_optimizers(trainer.optimizer)]
        adam = ("flat" if all(isinstance(a, FlatAdamW) for a in adams) else "fused" if all(g["fused"] for g in groups)
                else "default" if not any(g["fused"] for g in groups) else "?")
        # would guarded_step hand a clipping factor to the fused AdamW kernels of this optimizer?
        clip_in_adam = bool(scaled := _clip_in_fused_adam(stepping_optimizers(trainer.optimizer), norm=1e9))
        for torch_adam in scaled:
            del torch_adam.grad_scale
        # weights whose last gradient the layer itself added into main_grad (train.grad_accum_fusion)
        fused_wgrads = sum(bool(getattr(p, "grad_added_to_main_grad", False)) for p in params)
        return {"losses": losses, "grad_norms": norms, "digest": digest, "fused_wgrads": fused_wgrads,
                "clip_in_adam": clip_in_adam, "graphs": counters["stats"]["unique_graphs"], "adam": adam}
    except (RuntimeError, AssertionError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        torch.nn.Module.compile = compile_module
        trainer_module.guarded_step = guarded_step
        shutdown_runtime(keep_process_group=True)


def levers_rank(hf_dir: str, function_cases: dict[str, tuple[ParallelLayout, tuple[str, ...]]],
                tokens: Tensor, labels: Tensor, checkpoint_cases: dict[str, tuple], root: str,
                train_runs: dict[str, TrainerConfig]) -> dict[str, Any]:
    ckpt = HFCheckpoint(hf_dir)
    out: dict[str, Any] = {"function": {}, "checkpoint": {}, "train": {}}
    trainer_module.build_data_loader = _random_tokens
    trainer_module.QwenTokenizer = lambda *_: None
    for name, (layout, precisions) in function_cases.items():
        runtime = init_runtime(layout)
        for precision in precisions:
            case = _experts_function(ckpt, runtime.layout, precision, tokens, labels)
            out["function"][f"{name}_{precision}"] = case
        shutdown_runtime(keep_process_group=True)
    for name, (save_as, load_as) in checkpoint_cases.items():
        out["checkpoint"][name] = _checkpoint_roundtrip(ckpt, Path(root) / name, save_as, load_as)
    for name, cfg in train_runs.items():  # in order: later runs resume from earlier ones
        out["train"][name] = _train(cfg, megatron_step=name.endswith("_megatron_step"))
        dist.barrier()
    shutdown_runtime()
    return out
