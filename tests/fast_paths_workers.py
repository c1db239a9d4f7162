"""Rank function for tests/test_fast_paths.py: the fast paths against the plain path, in one spawn.

Per layout, the plain model's losses and DDP gradients are the reference; each variant (Liger
kernels through Triton's interpreter, compiled layers, both) is built with the same weights
(loaded strictly from the plain model: the parameter names must not change) and measured
against it. Each result also says whether the fast path ran: Liger kernel calls counted, layers
compiled, dynamo graph breaks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tests import liger_interpreter

MICRO, VOCAB = 2, 96


@dataclass(frozen=True)
class Variant:
    name: str
    liger: tuple[str, ...] = ()
    compile: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A layout, a model shape (Qwen2Shape fields over a small base), build_model arguments of the
    plain model and every variant, and sequence length, and the variants measured there."""

    layout: Any
    variants: list[Variant]
    shape: dict[str, Any] = field(default_factory=dict)
    seq: int = 16
    build: dict[str, Any] = field(default_factory=dict)


def _shape(**fields: Any) -> Any:
    from qwen2_megatron.model.shape import Qwen2Shape

    # GQA (6 query heads, 2 groups), head dim 8, awkward MLP width, qkv biases (Qwen2's).
    base = dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True, initializer_range=0.2,
        max_position_embeddings=64,
    )
    return Qwen2Shape(**{**base, **fields})


def _batches(dp_rank: int, seq: int) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(100 + dp_rank)
    out = []
    for _ in range(2):
        window = torch.randint(0, VOCAB, (MICRO, seq + 1), generator=gen)
        out.append({"tokens": window[:, :-1], "labels": window[:, 1:], "loss_mask": torch.ones(MICRO, seq)})
    return out


def _train_pass(chunks: list, batches: list) -> tuple[list[float], dict[str, Tensor]]:
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.parallel.ddp import wrap_ddp

    model = wrap_ddp(chunks)
    losses = [float(d["lm loss"]) for d in forward_backward(model, batches)]
    grads = {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()}
    return losses, grads


class _Counting:
    """Counts the calls of qwen2_megatron.model.liger's kernel wrappers."""

    def __init__(self) -> None:
        from qwen2_megatron.model import liger

        self.calls = {name: 0 for name in liger.KERNELS}
        self.originals = {name: getattr(liger, name) for name in liger.KERNELS}
        for name, fn in self.originals.items():
            setattr(liger, name, self._wrap(name, fn))
        # runs of Liger's fused gate-up SwiGLU kernels themselves (inside a compiled graph the
        # wrapper above is traced, not called, while the qwen2_megatron::swiglu operator runs them)
        from liger_kernel.ops import swiglu

        self.swiglu_op_calls = 0
        for name in ("swiglu_fused_gate_up_forward", "swiglu_fused_gate_up_backward"):
            setattr(swiglu, name, self._count_op(getattr(swiglu, name)))

    @contextlib.contextmanager
    def wrappers_off(self) -> Iterator[None]:
        """liger's own functions while compiled layers are traced: the counting wrappers' side
        effect (a Python counter that dynamo guards on) would make dynamo recompile at every call."""
        from qwen2_megatron.model import liger

        counted = {name: getattr(liger, name) for name in liger.KERNELS}
        for name, fn in self.originals.items():
            setattr(liger, name, fn)
        try:
            yield
        finally:
            for name, fn in counted.items():
                setattr(liger, name, fn)

    def _count_op(self, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.swiglu_op_calls += 1
            return fn(*args, **kwargs)

        return counted

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted


def compiled_layers(layers: Any) -> int:
    """Decoder layers compiled whole (dense) or in all their compiled parts (MoE: the attention
    block, the pre-MLP norm, the shared expert and the grouped experts' activation)."""

    def compiled(layer: Any) -> bool:
        if not getattr(layer, "is_moe_layer", False):
            return getattr(layer, "_compiled_call_impl", None) is not None
        own, mlp = vars(layer), layer.mlp
        return ("_forward_attention" in own and "_forward_pre_mlp_layernorm" in own and "activation" in vars(mlp.experts)
                and mlp.shared_experts._compiled_call_impl is not None)

    return sum(compiled(layer) for layer in layers)


def _variant(shape: Any, layout: Any, reference: dict[str, Tensor], batches: list, variant: Variant,
             counting: _Counting, build: dict[str, Any]) -> dict[str, Any]:
    from qwen2_megatron.model import local_modules
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.fast_paths import FastPaths

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    before, op_before = dict(counting.calls), counting.swiglu_op_calls
    chunks = build_model(shape, layout, fast=FastPaths(variant.liger, variant.compile), **build, **variant.overrides)
    chunks[0].load_state_dict(reference, strict=True)
    modules = list(chunks[0].modules())
    swapped = {
        "rms_norm": sum(isinstance(m, local_modules.LigerRMSNorm) for m in modules),
        "swiglu": sum(isinstance(m, local_modules.LigerSwiGLUMLP) for m in modules),
        "rope": sum(isinstance(m, local_modules.LigerRopeSelfAttention) for m in modules),
        "tabled_rope": sum(isinstance(m, local_modules.TabledRopeSelfAttention) for m in modules),
    }
    compiled = compiled_layers(chunks[0].decoder.layers)
    with counting.wrappers_off() if compiled else contextlib.nullcontext():
        losses, grads = _train_pass(chunks, batches)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return {
        "losses": losses, "grads": grads, "swapped": swapped, "compiled": compiled,
        "kernel_calls": {k: counting.calls[k] - before[k] for k in counting.calls},
        "swiglu_op_calls": counting.swiglu_op_calls - op_before,
        "graph_breaks": {str(k)[:200]: v for k, v in breaks.items()},
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


def _kernel_level() -> dict[str, tuple[float, float]]:
    """Each Liger wrapper against the plain function (forward, input and weight gradients)."""
    import torch.nn.functional as F

    from qwen2_megatron.model import liger
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(3)
    out: dict[str, tuple[float, float]] = {}

    def compare(name: str, fast: Any, plain: Any, *inputs: Tensor) -> None:
        a = [t.clone().requires_grad_() for t in inputs]
        b = [t.clone().requires_grad_() for t in inputs]
        ya, yb = fast(*a), plain(*b)
        ya, yb = (ya if isinstance(ya, tuple) else (ya,)), (yb if isinstance(yb, tuple) else (yb,))
        grads_out = [torch.randn(y.shape, generator=gen) for y in yb]
        torch.autograd.backward(ya, grads_out)
        torch.autograd.backward(yb, grads_out)
        pairs = list(zip(ya, yb)) + [(ta.grad, tb.grad) for ta, tb in zip(a, b)]
        out[name] = (max((x - y).abs().max().item() for x, y in pairs), max(y.abs().max().item() for _, y in pairs))

    # RMSNorm: rows of odd width, non-unit weight
    x, w = torch.randn(7, 3, 33, generator=gen) * 3, torch.randn(33, generator=gen)
    compare("rms_norm", lambda x, w: liger.rms_norm(x, w, 1e-6),
            lambda x, w: w * F.rms_norm(x.float(), (33,), eps=1e-6).to(x.dtype), x, w)
    # SwiGLU on megatron's [s, b, 2 * ffn] = [gate | up]
    y = torch.randn(5, 2, 2 * 21, generator=gen) * 2
    compare("swiglu", liger.swiglu, lambda y: F.silu(y.chunk(2, -1)[0]) * y.chunk(2, -1)[1], y)
    # RoPE: megatron's [s, b, h, d] query / key from a split (non-contiguous), freqs [s, 1, 1, d]
    s, b, hq, hk, d = 9, 2, 6, 2, 8
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat([angles, angles], -1)[:, None, None, :]
    mixed = torch.randn(s, b, hq * d + 2 * hk * d, generator=gen)
    q, k = mixed[..., : hq * d].view(s, b, hq, d), mixed[..., hq * d : (hq + hk) * d].view(s, b, hk, d)
    compare("rope", lambda q, k: liger.rope(q, k, freqs),
            lambda q, k: (_apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)), q, k)
    return out


def _trainer_run(cfg: Any, counting: _Counting) -> dict[str, Any]:
    from qwen2_megatron.train.trainer import Trainer

    before = dict(counting.calls)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = Trainer(cfg)
    compiled = compiled_layers(trainer.model[0].module.decoder.layers)
    losses = [r["loss"] for r in trainer.train()]
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return {"losses": losses, "compiled": compiled, "graph_breaks": {str(k)[:300]: v for k, v in breaks.items()},
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "kernel_calls": {k: counting.calls[k] - before[k] for k in counting.calls}}


def fast_paths_rank(cases: dict[str, Case], trainer_cfgs: dict[str, Any]) -> dict[str, Any]:
    """The cases' results by name, then the Trainer runs (trainer_cfgs: name -> TrainerConfig)."""
    liger_interpreter.enable()  # before anything imports liger_kernel
    from megatron.core import parallel_state

    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    t0 = time.perf_counter()
    counting = _Counting()
    results: dict[str, Any] = {"kernels": _kernel_level(), "layouts": {}, "seconds": {}}
    results["seconds"]["kernels"] = time.perf_counter() - t0
    for name, case in cases.items():
        shape = _shape(**case.shape)
        runtime = init_runtime(case.layout)
        batches = _batches(parallel_state.get_data_parallel_rank(), case.seq)
        chunks = build_model(shape, runtime.layout, **case.build)
        gen = torch.Generator().manual_seed(5)  # the same on every rank: replicated norms stay equal
        with torch.no_grad():
            for pname, param in chunks[0].named_parameters():
                if "layernorm" in pname:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.2)
        reference = {k: v.clone() if torch.is_tensor(v) else v for k, v in chunks[0].state_dict().items()}
        plain_losses, plain_grads = _train_pass(chunks, batches)
        per_variant = {}
        for variant in case.variants:
            t0 = time.perf_counter()
            got = _variant(shape, runtime.layout, reference, batches, variant, counting, case.build)
            results["seconds"][f"{name}/{variant.name}"] = time.perf_counter() - t0
            grad_diff = max((got["grads"][n] - g).abs().max().item() for n, g in plain_grads.items())
            per_variant[variant.name] = {
                **{k: v for k, v in got.items() if k not in ("grads", "losses")},
                "loss_diff": max(abs(a - b) for a, b in zip(got["losses"], plain_losses)),
                "loss_scale": max(abs(x) for x in plain_losses),
                "grad_diff": grad_diff,
                "grad_scale": max(g.abs().max().item() for g in plain_grads.values()),
                "same_names": sorted(got["grads"]) == sorted(plain_grads),
            }
        # the spec of a plain build after fast ones: nothing left over from them
        modules = list(build_model(shape, runtime.layout, **case.build)[0].modules())
        per_variant["plain_after"] = {
            "fast_modules": sum(type(m).__name__.startswith(("Liger", "Tabled")) for m in modules),
            "compiled": sum(getattr(m, "_compiled_call_impl", None) is not None for m in modules),
        }
        results["layouts"][name] = per_variant
        shutdown_runtime(keep_process_group=True)
    results["trainer"] = {}
    for name, cfg in trainer_cfgs.items():
        t0 = time.perf_counter()
        results["trainer"][name] = _trainer_run(cfg, counting)
        results["seconds"][f"trainer/{name}"] = time.perf_counter() - t0
        shutdown_runtime(keep_process_group=True)
    shutdown_runtime()
    return results
