"""The trainer's optimizer step with its decision on the device (train/optimizer.py, _step_on_device):
the update it makes is the host-decided one's, and a non-finite gradient changes nothing, weights,
Adam states and step counts included. One rank, megatron-core's optimizers over the tiny preset."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from qwen2_megatron.parallel.local_launch import spawn

# (precision, optim settings): pure bf16 (megatron's FP32Optimizer over bf16 weights), bf16 with
# fp32 master weights (distributed optimizer), fp32
CASES = {
    "pure_bf16": ("bf16", {"distributed_optimizer": False, "fp32_master_weights": False}),
    "bf16_master": ("bf16", {}),
    "fp32": ("fp32", {}),
}


def step_both_ways(precision: str, optim: dict[str, Any]) -> dict[str, Any]:
    """Two identical models take one clipped step from the same batch, one deciding on the device
    and one on the host; then the device path meets a NaN gradient."""
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
    from qwen2_megatron.train import optimizer as optimizer_module
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import adam_tensors, build_optimizer, guarded_step

    shape = get_preset("tiny")
    runtime = init_runtime(ParallelLayout())
    calls = []
    on_device = optimizer_module._step_on_device

    def counted(*args: Any) -> Any:
        calls.append(1)
        return on_device(*args)

    optimizer_module._step_on_device = counted
    try:
        tokens = torch.randint(0, shape.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32)}
        out: dict[str, Any] = {}
        for way in ("device", "host"):
            torch.manual_seed(0)
            chunks = wrap_ddp(build_model(shape, runtime.layout, precision),
                              use_distributed_optimizer=optim.get("distributed_optimizer", True),
                              fp32_grads=optim.get("fp32_master_weights", True))
            # clip_grad far below the norm: the clipping factor is at work
            optimizer = build_optimizer(OptimConfig(lr=1e-2, clip_grad=1e-3, **optim), precision, chunks)
            if way == "host":  # the same norm, read on the host first: the host decides (megatron without TE)
                norm_on_device = optimizer.get_grad_norm
                optimizer.get_grad_norm = lambda: float(norm_on_device())

            def step() -> tuple[bool, float]:
                for chunk in chunks:
                    chunk.zero_grad_buffer()
                optimizer.zero_grad()
                forward_backward(chunks, [batch])
                return guarded_step(optimizer, clip_in_fused_adam=True)

            if way == "device":
                out["initial"] = [p.detach().float().clone() for c in chunks for p in c.module.parameters()]
            before = len(calls)
            stepped, norm = step()
            out[way] = {"stepped": stepped, "norm": norm, "device_steps": len(calls) - before,
                        "params": [p.detach().float().clone() for c in chunks for p in c.module.parameters()]}
            if way == "device":
                # a NaN in one gradient: the step is refused on the device and nothing changes
                state = [t.detach().clone() for t in _everything(chunks, optimizer, adam_tensors)]
                first = next(p for c in chunks for p in c.module.parameters())

                def poisoned_step() -> tuple[bool, float]:
                    for chunk in chunks:
                        chunk.zero_grad_buffer()
                    optimizer.zero_grad()
                    forward_backward(chunks, [batch])
                    first.main_grad.view(-1)[0] = float("nan")
                    return guarded_step(optimizer, clip_in_fused_adam=True)

                stepped_nan, norm_nan = poisoned_step()
                after = list(_everything(chunks, optimizer, adam_tensors))
                out["nan"] = {"stepped": stepped_nan, "norm": norm_nan, "device_steps": len(calls) - before - 1,
                              "changed": sum(not torch.equal(a, b) for a, b in zip(state, after, strict=True)),
                              "tensors": len(state)}
        return out
    finally:
        optimizer_module._step_on_device = on_device
        shutdown_runtime()


def _everything(chunks: list, optimizer: Any, adam_tensors: Any) -> list[torch.Tensor]:
    """Model weights, the tensors the torch optimizers step and their states, and the step counts."""
    from qwen2_megatron.train.optimizer import inner_optimizers

    stepped, states = adam_tensors(optimizer)
    steps = [s["step"] for inner in inner_optimizers(optimizer) for s in inner.optimizer.state.values()]
    return [*(p.detach() for c in chunks for p in c.module.parameters()), *stepped, *states, *steps]


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: spawn(step_both_ways, 1, precision, optim)[0] for name, (precision, optim) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_device_decision_makes_the_host_decided_update(results: dict, case: str) -> None:
    device, host = results[case]["device"], results[case]["host"]
    # the default settings (foreach kernels, fused AdamW with the clipping in it) decide on the device:
    # megatron's norm came as a device tensor
    assert device["device_steps"] == 1 and host["device_steps"] == 0
    assert device["stepped"] and host["stepped"]
    assert device["norm"] > 1e-3 * 10  # clipped
    assert device["norm"] == host["norm"]
    # one AdamW step of lr 1e-2 from the same gradients and norm; the two differ only by the rounding
    # of the clipping factor (fp32 on the device, float64 on the host): far inside Adam's eps in fp32,
    # at most one unit in the last place of a bf16 weight
    ulps = 2.0 ** -7 if CASES[case][0] == "bf16" else 0.0
    for a, b in zip(device["params"], host["params"], strict=True):
        assert bool(((a - b).abs() <= b.abs() * ulps + 1e-6).all()), (a - b).abs().max().item()
    assert any(not torch.equal(a, b) for a, b in zip(device["params"], results[case]["initial"], strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_a_nonfinite_gradient_changes_nothing(results: dict, case: str) -> None:
    nan = results[case]["nan"]
    assert nan["device_steps"] == 1  # decided on the device
    assert not nan["stepped"] and not math.isfinite(nan["norm"])
    assert nan["tensors"] > 10
    assert nan["changed"] == 0, f"{nan['changed']} of {nan['tensors']} tensors changed by a refused step"
