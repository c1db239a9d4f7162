"""The fused output layer + cross-entropy (model/fused_loss.py) equals megatron's plain path (fp32, CPU).

Single-process: gradcheck in float64, a pure-torch reference, megatron's gradient-accumulation-
fusion convention; gradients computed in forward (train.fused_lm_loss_grad_in_forward) against
recomputed ones, their fallback, and none computed under no_grad. Two gloo ranks (one spawn, all
cases): TP1 (as DP2), TP2, TP2+SP and PP2, each with tied and untied embeddings, masked tokens and
out-of-vocabulary labels; per-token losses, hidden-state and weight gradients against
ColumnParallelLinear + vocab_parallel_cross_entropy, and every parameter's DDP gradient after a
full forward_backward against the plain path's (also with the gradients computed in forward,
recomputing refused); then the trainer with train.fused_lm_loss off, on, and on with gradients in
forward (tiny model, real 152k vocabulary, TP2+SP): the same loss trajectory and evaluation loss.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.model import fused_loss as fused_loss_module
from qwen2_megatron.model.fused_loss import fused_linear_cross_entropy
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.train.config import ConfigError, LogConfig, OptimConfig, RunConfig, TrainConfig, TrainerConfig, validate
from tests.fused_loss_workers import Case, fused_loss_rank

REL_TOL = 1e-5

CASES = [
    Case(f"{name}_{'tied' if tied else 'untied'}", layout, tied)
    for name, layout in {
        "tp1": ParallelLayout(),
        "tp2": ParallelLayout(tp=2),
        "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
        "pp2": ParallelLayout(pp=2),
    }.items()
    for tied in (True, False)
]


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def _tiny(dtype: torch.dtype, s: int = 6, b: int = 2, h: int = 5, v: int = 11) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(s, b, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype)
    labels = torch.randint(0, v, (s, b), generator=gen)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_gradcheck_float64(chunk: int) -> None:
    hidden, weight, labels = _tiny(torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_tokens=chunk),
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


@pytest.mark.parametrize("chunk", [3, 1000])
def test_matches_torch_cross_entropy_fp32(chunk: int) -> None:
    hidden, weight, labels = _tiny(torch.float32, s=9, b=3, h=16, v=50)
    grad_out = torch.randn(labels.shape) * (torch.rand(labels.shape) > 0.3)  # masked tokens: 0
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _reference(h1, w1, labels)
    ref.backward(grad_out)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_cross_entropy(h2, w2, labels, chunk_tokens=chunk)
    out.backward(grad_out)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    for got, want in ((out, ref), (h2.grad, h1.grad), (w2.grad, w1.grad)):
        assert (got - want).abs().max() <= REL_TOL * want.abs().max()


def test_bf16_close_to_fp32() -> None:
    hidden, weight, labels = _tiny(torch.float32, s=16, b=2, h=32, v=64)
    out = fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_tokens=5)
    assert out.dtype == torch.float32
    assert (out - _reference(hidden, weight, labels)).abs().max() < 0.1


@pytest.mark.parametrize("zero_out_wgrad", [False, True])
def test_gradient_accumulation_fusion_adds_into_main_grad(zero_out_wgrad: bool) -> None:
    """megatron's convention: the weight gradient goes into main_grad, a dummy is returned."""
    hidden, weight, labels = _tiny(torch.float32)
    w_ref = weight.clone().requires_grad_()
    _reference(hidden, w_ref, labels).sum().backward()
    w = weight.clone().requires_grad_()
    w.main_grad = torch.ones_like(weight)  # earlier micro-batches' gradients stay
    w.grad_added_to_main_grad = False
    w.zero_out_wgrad = zero_out_wgrad
    fused_linear_cross_entropy(hidden, w, labels, chunk_tokens=4, gradient_accumulation_fusion=True).sum().backward()
    assert torch.allclose(w.main_grad, 1 + w_ref.grad, rtol=REL_TOL, atol=1e-6)
    assert w.grad_added_to_main_grad
    assert w.grad is not None and w.grad.shape == weight.shape
    if zero_out_wgrad:
        assert not w.grad.any()


def test_out_of_vocabulary_labels_follow_megatron() -> None:
    """megatron's vocab_parallel_cross_entropy gives such a token log(sum exp(logits - max))."""
    hidden, weight, labels = _tiny(torch.float64)
    labels[0, 0] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    logits = hidden[0, 0] @ weight.t()
    assert torch.allclose(loss[0, 0], torch.logsumexp(logits - logits.max(), 0))
    assert torch.allclose(loss[1:], _reference(hidden, weight, labels)[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_math_equals_eager(dtype: torch.dtype) -> None:
    """train.fused_lm_loss_compile: the chunk arithmetic through torch.compile (inductor's CPU
    backend here, Triton on a GPU) gives the eager losses and gradients, uneven last chunks (token
    and vocabulary) and an out-of-vocabulary label included."""
    hidden, weight, labels = _tiny(torch.float32, s=13, b=3, h=16, v=70)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels[2, 1] = -100
    grad_out = torch.randn(labels.shape)
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_cross_entropy(h, w, labels, chunk_tokens=8, compiled=compiled)
        out.backward(grad_out)
        results.append((out, h.grad, w.grad))
    # fp32: the same up to summation order; bf16: the gradients are rounded to bf16 at the end
    tol = REL_TOL if dtype == torch.float32 else 1e-2
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def _early_and_recomputed(
    dtype: torch.dtype, grad_out: torch.Tensor, mask: torch.Tensor, monkeypatch: pytest.MonkeyPatch, fusion: bool = False
) -> tuple[list[tuple[torch.Tensor, ...]], list[str]]:
    """(losses, hidden and weight gradients) with the gradients computed in forward for `mask` and
    by recomputing in backward, for the incoming gradient `grad_out`; and which backward ran."""
    hidden, weight, labels = _tiny(torch.float32, s=13, b=3, h=16, v=70)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels[2, 1] = -100
    ran: list[str] = []
    recompute = fused_loss_module._recompute_grads
    monkeypatch.setattr(fused_loss_module, "_recompute_grads", lambda *a: ran.append("recompute") or recompute(*a))
    results = []
    for loss_mask in (mask, None):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fusion:  # megatron's gradient_accumulation_fusion: the weight gradient goes into main_grad
            w.main_grad, w.grad_added_to_main_grad = torch.full(weight.shape, 0.5, dtype=torch.float32), False
        out = fused_linear_cross_entropy(h, w, labels, chunk_tokens=8, loss_mask=loss_mask,
                                         gradient_accumulation_fusion=fusion)
        out.backward(grad_out)
        results.append((out, h.grad, w.main_grad if fusion else w.grad))
        ran.append(f"done mask={loss_mask is not None}")
    return results, ran


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_in_forward_equal_recomputed_ones(
    dtype: torch.dtype, fusion: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.fused_lm_loss_grad_in_forward: for a loss gradient proportional to the loss mask (the
    trainer's masked mean), the gradients computed from each chunk's logits in forward and scaled
    in backward equal those of recomputing the logits in backward (masked tokens, uneven chunks,
    an out-of-vocabulary label, megatron's main_grad accumulation), and backward recomputes nothing."""
    mask = (torch.rand(13, 3, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    results, ran = _early_and_recomputed(dtype, mask * 0.37, mask, monkeypatch, fusion)
    assert ran == ["done mask=True", "recompute", "done mask=False"]
    tol = REL_TOL if dtype == torch.float32 else 1e-2  # bf16: rounded at different points
    for got, want in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_declared_mask_proportional_gradient_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """mask_proportional (the trainer's masked mean, forward.py): backward scales the gradients
    computed in forward without the check that reads a boolean back from the device; the same
    gradients as the checked path."""
    hidden, weight, labels = _tiny(torch.float32, s=13, b=3, h=16, v=70)
    mask = (torch.rand(13, 3, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    results = []
    for declared in (False, True):
        if declared:
            monkeypatch.setattr(fused_loss_module, "_is_mask_proportional", lambda *a: pytest.fail("checked"))
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_cross_entropy(h, w, labels, chunk_tokens=8, loss_mask=mask, mask_proportional=declared)
        out.backward(mask * 0.21)
        results.append((out, h.grad, w.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_evaluation_computes_no_gradients_in_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad (evaluation) the weight still requires a gradient, yet none is computed."""
    hidden, weight, labels = _tiny(torch.float32)
    calls: list[int] = []
    accumulate = fused_loss_module._accumulate_wgrad
    monkeypatch.setattr(fused_loss_module, "_accumulate_wgrad", lambda *a: calls.append(1) or accumulate(*a))
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        fused_linear_cross_entropy(hidden, w, labels, chunk_tokens=4, loss_mask=torch.ones(labels.shape))
    assert calls == []
    fused_linear_cross_entropy(hidden, w, labels, chunk_tokens=4, loss_mask=torch.ones(labels.shape))
    assert len(calls) == 3  # 12 tokens in chunks of 4


def test_gradients_in_forward_fall_back_for_other_loss_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss gradient that is not proportional to the mask is not the one the forward assumed:
    backward recomputes, and the gradients are exactly the recomputing path's."""
    mask = torch.ones(13, 3)
    results, ran = _early_and_recomputed(torch.float32, torch.randn(13, 3), mask, monkeypatch)
    assert ran == ["recompute", "done mask=True", "recompute", "done mask=False"]
    for got, want in zip(*results):
        assert torch.equal(got, want)


def _trainer_cfg(root: Path, fused: bool, grad_in_forward: bool = False) -> TrainerConfig:
    name = ("fused_early" if grad_in_forward else "fused") if fused else "plain"
    train = TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, seq_length=32, eval_interval=2,
                        eval_steps=1, fused_lm_loss=fused, fused_lm_loss_chunk=16,
                        fused_lm_loss_grad_in_forward=grad_in_forward)
    return TrainerConfig(
        model=replace(get_preset("tiny"), num_hidden_layers=2), train=train,
        parallel=ParallelLayout(tp=2, sequence_parallel=True), optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=demo_mixture(num_workers=0), log=LogConfig(interval=1, progress_bar=False),
        run=RunConfig(dir=str(root / name), name=name),
        checkpoint=CheckpointConfig(dir=str(root / name / "checkpoints"), interval=0, save_at_end=False),
    )


def test_chunk_size_is_validated(tmp_path: Path) -> None:
    cfg = _trainer_cfg(tmp_path, fused=True)
    cfg.train.fused_lm_loss_chunk = 0
    with pytest.raises(ConfigError, match="fused_lm_loss_chunk"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize("key", ["fused_lm_loss_compile", "fused_lm_loss_grad_in_forward"])
def test_changing_an_absent_fused_loss_is_an_error(tmp_path: Path, key: str) -> None:
    cfg = _trainer_cfg(tmp_path, fused=False)
    setattr(cfg.train, key, True)
    with pytest.raises(ConfigError, match=f"train.{key}=true .*train.fused_lm_loss=true"):
        validate(cfg, world_size=2)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, Path]:
    root = tmp_path_factory.mktemp("fused_trainer")
    cfgs = [_trainer_cfg(root, fused=False), _trainer_cfg(root, fused=True), _trainer_cfg(root, True, True)]
    per_rank = spawn(fused_loss_rank, 2, CASES, cfgs)
    losses = dict(zip(("plain", "fused", "fused_early"), per_rank[0][1]))
    return [r[0] for r in per_rank], losses, root


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_fused_matches_plain_in_parallel(parallel_runs: tuple, case: str) -> None:
    checked = 0
    for rank, per_case in enumerate(parallel_runs[0]):
        for what, (diff, scale) in per_case[case].items():
            print(f"rank {rank} {case} {what}: max diff {diff:.2e} (scale {scale:.2e})")
            assert diff <= REL_TOL * scale + 1e-12, f"rank {rank} {case} {what}: {diff:.3e} vs {scale:.3e}"
            checked += 1
    names = {what for per_case in parallel_runs[0] for what in per_case[case]}
    assert any(n.startswith("step_grad:") for n in names) and any(n.startswith("step_loss") for n in names)
    assert checked > 0


@pytest.mark.parametrize("name", ["fused", "fused_early"])
def test_trainer_with_fused_loss_follows_the_plain_trajectory(parallel_runs: tuple, name: str) -> None:
    _, losses, root = parallel_runs
    plain, fused = losses["plain"], losses[name]
    assert len(plain) == len(fused) == 2
    worst = max(abs(a - b) for a, b in zip(plain, fused))
    evals = [
        [json.loads(line)["eval_loss"] for line in (root / run / "metrics.jsonl").read_text().splitlines()
         if "eval_loss" in line]
        for run in ("plain", name)
    ]
    print(f"trainer plain {plain} {name} {fused}: max |loss diff| {worst:.2e}; eval {evals}")
    assert worst <= 1e-5 * max(plain)
    assert len(evals[0]) == len(evals[1]) == 1 and abs(evals[0][0] - evals[1][0]) <= 1e-5 * evals[0][0]
