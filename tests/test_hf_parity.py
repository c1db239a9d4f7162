"""Logits and gradients of our megatron-core Qwen2 equal transformers' in every layout (fp32, CPU).

Two gloo ranks run all layouts of a model in one spawn (megatron's import dominates start-up).
DP2 runs one TP1/PP1 replica per rank, each on its own samples: it is the TP1 check as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from tests.parity_workers import parity_rank

LOGIT_TOL = 1e-4
GRAD_TOL = 1e-5
SEQ = 24

DENSE = {
    "tp2": ParallelLayout(tp=2),
    "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
    "pp2": ParallelLayout(pp=2),
    "dp2": ParallelLayout(),
}
MOE = {
    "ep2": ParallelLayout(ep=2),
    "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
    "tp2_ep2_etp1_sp": ParallelLayout(tp=2, ep=2, etp=1, sequence_parallel=True),
    "pp2": ParallelLayout(pp=2),
    "dp2": ParallelLayout(),
}


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (2, SEQ), generator=gen)
    return tokens, labels


def _hf_reference(hf_dir: Path, moe: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokens, labels = _batch(model.config.vocab_size)
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {} if moe else {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), grads


def _run(hf_dir: Path, layouts: dict, grads: bool) -> dict[str, dict]:
    tokens, labels = _batch(384)
    per_rank = spawn(parity_rank, 2, str(hf_dir), layouts, tokens, labels, grads)
    merged: dict[str, dict] = {}
    for name in layouts:
        logits = {r[name]["dp_rank"]: r[name]["logits"] for r in per_rank if r[name]["logits"] is not None}
        full = torch.empty(len(tokens), SEQ, 384)
        dp = len(logits)
        for dp_rank, value in logits.items():
            full[dp_rank::dp] = value
        merged[name] = {"logits": full, "grads": {k: v for r in per_rank for k, v in r[name]["grads"].items()}}
    return merged


@pytest.fixture(scope="module")
def dense_runs(hf_dense: Path) -> tuple[dict, tuple]:
    return _run(hf_dense, DENSE, grads=True), _hf_reference(hf_dense, moe=False)


@pytest.fixture(scope="module")
def moe_runs(hf_moe: Path) -> tuple[dict, tuple]:
    return _run(hf_moe, MOE, grads=False), _hf_reference(hf_moe, moe=True)


@pytest.mark.parametrize("layout", DENSE)
def test_dense_logits_match_transformers(dense_runs: tuple, layout: str) -> None:
    runs, (ref_logits, _) = dense_runs
    diff = (runs[layout]["logits"] - ref_logits).abs().max().item()
    print(f"dense {layout}: max |logit diff| = {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("layout", DENSE)
def test_dense_gradients_match_transformers(dense_runs: tuple, layout: str) -> None:
    runs, (_, ref_grads) = dense_runs
    grads = runs[layout]["grads"]
    assert sorted(grads) == sorted(ref_grads)
    worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    print(f"dense {layout}: max |grad diff| = {worst:.2e} (largest grad {scale:.2e})")
    assert worst <= GRAD_TOL


@pytest.mark.parametrize("layout", MOE)
def test_moe_logits_match_transformers(moe_runs: tuple, layout: str) -> None:
    runs, (ref_logits, _) = moe_runs
    diff = (runs[layout]["logits"] - ref_logits).abs().max().item()
    print(f"moe {layout}: max |logit diff| = {diff:.2e}")
    assert diff <= LOGIT_TOL
