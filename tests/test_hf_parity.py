"""Logits and gradients of our megatron-core Qwen2 equal transformers' in every layout (fp32, CPU).

Two gloo ranks run all layouts of all models in one spawn (megatron's import dominates
start-up). DP2 runs one TP1/PP1 replica per rank, each on its own samples: it is the TP1 check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from tests.conftest import save_random_hf
from tests.parity_workers import parity_rank

LOGIT_TOL = 1e-4
GRAD_TOL = 1e-5
SEQ = 24
VOCAB = 384

DENSE = {
    "tp2": ParallelLayout(tp=2),
    "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
    "pp2": ParallelLayout(pp=2),
    "pp2_vpp2": ParallelLayout(pp=2, vpp=2),
    "dp2": ParallelLayout(),
}
MOE = {
    "ep2": ParallelLayout(ep=2),
    "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
    "tp2_ep2_etp1_sp": ParallelLayout(tp=2, ep=2, etp=1, sequence_parallel=True),
    "pp2": ParallelLayout(pp=2),
    "dp2": ParallelLayout(),
}
# Further shapes: (name, moe, config overrides, layouts)
VARIANTS = [
    ("mha_untied", False, dict(num_key_value_heads=6, tie_word_embeddings=False), {"tp2": ParallelLayout(tp=2)}),
    ("odd_heads_mqa", False, dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=36), {"dp2": ParallelLayout()}),
    ("head_dim_override", False, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16), {"tp2": ParallelLayout(tp=2)}),
    ("moe_renorm_sparse_step", True, dict(norm_topk_prob=True, num_experts=6, num_experts_per_tok=3,
                                          decoder_sparse_step=2, mlp_only_layers=[3]), {"ep2": ParallelLayout(ep=2)}),
    ("moe_top1", True, dict(num_experts=3, num_experts_per_tok=1), {"dp2": ParallelLayout()}),
]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    return tokens, labels


def _hf_reference(hf_dir: Path, moe: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokens, labels = _batch()
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    # transformers 5 keeps MoE experts fused in memory (not the checkpoint's names): compare
    # gradients for dense models only.
    grads = {} if moe else {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), grads


def _merge(per_rank: list[dict], layouts: dict) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for name in layouts:
        logits = {r[name]["dp_rank"]: r[name]["logits"] for r in per_rank if r[name]["logits"] is not None}
        full = torch.empty(2, SEQ, VOCAB)
        for dp_rank, value in logits.items():
            full[dp_rank :: len(logits)] = value
        merged[name] = {"logits": full, "grads": {k: v for r in per_rank for k, v in r[name]["grads"].items()}}
    return merged


def _run(cases: list[tuple[Path, dict]], grads: bool) -> list[dict[str, dict]]:
    tokens, labels = _batch()
    per_rank = spawn(parity_rank, 2, [(str(d), lay) for d, lay in cases], tokens, labels, grads)
    return [_merge([rank[i] for rank in per_rank], layouts) for i, (_, layouts) in enumerate(cases)]


@pytest.fixture(scope="module")
def dense_runs(hf_dense: Path) -> tuple[dict, tuple]:
    return _run([(hf_dense, DENSE)], grads=True)[0], _hf_reference(hf_dense, moe=False)


@pytest.fixture(scope="module")
def moe_runs(hf_moe: Path) -> tuple[dict, tuple]:
    return _run([(hf_moe, MOE)], grads=False)[0], _hf_reference(hf_moe, moe=True)


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, tuple]]:
    root = tmp_path_factory.mktemp("variants")
    dirs = {name: save_random_hf(root / name, moe, seed=11, **cfg) for name, moe, cfg, _ in VARIANTS}
    runs = _run([(dirs[name], layouts) for name, _, _, layouts in VARIANTS], grads=True)
    return {
        name: (run, _hf_reference(dirs[name], moe)) for (name, moe, _, _), run in zip(VARIANTS, runs)
    }


def _logit_diff(run: dict, reference: torch.Tensor, label: str) -> float:
    diff = (run["logits"] - reference).abs().max().item()
    print(f"{label}: max |logit diff| = {diff:.2e}")
    return diff


def _grad_diff(run: dict, reference: dict[str, torch.Tensor], label: str) -> float:
    grads = run["grads"]
    assert sorted(grads) == sorted(reference)
    worst = max((grads[n] - g).abs().max().item() for n, g in reference.items())
    scale = max(g.abs().max().item() for g in reference.values())
    print(f"{label}: max |grad diff| = {worst:.2e} (largest grad {scale:.2e})")
    return worst


@pytest.mark.parametrize("layout", DENSE)
def test_dense_logits_match_transformers(dense_runs: tuple, layout: str) -> None:
    runs, (ref_logits, _) = dense_runs
    assert _logit_diff(runs[layout], ref_logits, f"dense {layout}") <= LOGIT_TOL


@pytest.mark.parametrize("layout", DENSE)
def test_dense_gradients_match_transformers(dense_runs: tuple, layout: str) -> None:
    runs, (_, ref_grads) = dense_runs
    assert _grad_diff(runs[layout], ref_grads, f"dense {layout}") <= GRAD_TOL


@pytest.mark.parametrize("layout", MOE)
def test_moe_logits_match_transformers(moe_runs: tuple, layout: str) -> None:
    runs, (ref_logits, _) = moe_runs
    assert _logit_diff(runs[layout], ref_logits, f"moe {layout}") <= LOGIT_TOL


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_other_shapes_match_transformers(variant_runs: dict, variant: str) -> None:
    runs, (ref_logits, ref_grads) = variant_runs[variant]
    for layout, run in runs.items():
        assert _logit_diff(run, ref_logits, f"{variant} {layout}") <= LOGIT_TOL
        if ref_grads:
            assert _grad_diff(run, ref_grads, f"{variant} {layout}") <= GRAD_TOL
