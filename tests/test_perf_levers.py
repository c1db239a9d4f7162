"""Throughput levers compute the same function as the plain path (CPU, gloo, one 2-rank spawn).

- train.moe_grouped_gemm: GroupedExperts (one grouped_mm per projection) beside megatron's
  SequentialMLP: logits and HF-named gradients in several layouts (fp32 and bf16), model
  checkpoints written by one and read by the other across expert-parallel layouts, the same
  random initialisation and training trajectory, and training checkpoints (distributed optimizer
  state) resumed across the two.
- ddp.*: overlapped gradient reduction (small buckets, several micro-batches, with and without
  the distributed optimizer) and overlapped parameter all-gather give the same trajectory as
  synchronous communication, also after a checkpoint written with the all-gather still pending,
  with compiled layers (kept whole: one graph) and with the fused LM loss (whose bypassed output
  layer must still wait for its gather).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.model.shape import Qwen2Shape
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.train.config import DDPConfig, LogConfig, OptimConfig, RunConfig, TrainConfig, TrainerConfig
from tests.lever_workers import levers_rank

SEQ, VOCAB = 24, 384
SAME = 1e-6  # the same computation up to summation order
LAYOUTS = {  # name: (layout, precisions); grouped_mm where rows are 16-byte aligned, else a loop
    "dp2": (ParallelLayout(), ("fp32", "bf16")),
    "tp2_ep2_etp1": (ParallelLayout(tp=2, ep=2, etp=1, sequence_parallel=True), ("fp32",)),
    # 12 expert ffn columns per rank: bf16 rows of 24 bytes are not 16-byte aligned -> per-expert loop
    "tp2_sp": (ParallelLayout(tp=2, sequence_parallel=True), ("fp32", "bf16")),
}
CASES = [f"{name}_{precision}" for name, (_, precisions) in LAYOUTS.items() for precision in precisions]
CHECKPOINTS = {  # (save as (layout, grouped), load as (layout, grouped))
    "sequential_ep1_to_grouped_ep2": ((ParallelLayout(), False), (ParallelLayout(ep=2), True)),
    "grouped_ep2_tp2_to_sequential_ep1": ((ParallelLayout(tp=2, ep=2, etp=1), True), (ParallelLayout(), False)),
}
DENSE = Qwen2Shape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)
MOE = Qwen2Shape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=64)
PLAIN = DDPConfig(overlap_grad_reduce=False, overlap_param_gather=False)
# Buckets of 20k parameters: the embedding and the untied output layer (64k each) are buckets of
# their own, the layers span several, so the distributed optimizer pads several bucket ends.
OVERLAP = DDPConfig(overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=20_000)


def _cfg(root: Path, name: str, shape: Qwen2Shape, steps: int, ddp: DDPConfig, resume: str | None = None,
         save: bool = False, distributed_optimizer: bool = True, fused_adam: bool = True,
         foreach_kernels: bool = True, clip_in_fused_adam: bool = True, flat_adam: bool = False,
         fp32_master_weights: bool = True, **train: object) -> TrainerConfig:
    """`steps` steps; a checkpoint at step 2 if `save`; resumed from run `resume`'s checkpoint."""
    return TrainerConfig(
        model=shape, ddp=ddp,
        train=TrainConfig(**{"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "seq_length": 32,
                             **train}),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, decay_steps=8, distributed_optimizer=distributed_optimizer,
                          fused_adam=fused_adam, foreach_kernels=foreach_kernels,
                          clip_in_fused_adam=clip_in_fused_adam, flat_adam=flat_adam,
                          fp32_master_weights=fp32_master_weights),
        data=demo_mixture(num_workers=0),  # replaced by seeded random tokens (lever_workers)
        log=LogConfig(interval=100, progress_bar=False),
        run=RunConfig(dir=str(root / name), name=name),
        checkpoint=CheckpointConfig(dir=str(root / (resume or name) / "checkpoints"), interval=2 if save else 0,
                                    resume="auto" if resume else "none", save_at_end=False),
    )


def _train_runs(root: Path) -> dict[str, TrainerConfig]:
    grouped = {"moe_grouped_gemm": True}
    return {
        # ddp: 3 steps overlapped vs synchronous (checkpoints at step 2); step 3 again from the
        # overlapped run's checkpoint, written with the all-gather still pending
        "a_plain": _cfg(root, "a_plain", DENSE, 3, PLAIN),
        "a_overlap": _cfg(root, "a_overlap", DENSE, 3, OVERLAP, save=True),
        # optim.fused_adam=false: megatron's torch AdamW as it builds it (torch's default form)
        "a_default_adam": _cfg(root, "a_default", DENSE, 3, PLAIN, fused_adam=False),
        "c_default_adam_allreduce": _cfg(root, "c3", DENSE, 2, PLAIN, distributed_optimizer=False,
                                         fused_adam=False, micro_batch_size=1),
        # optim.flat_adam: one compiled AdamW pass per contiguous gradient run; with the distributed
        # optimizer (fp32 master shards), megatron's bf16 optimizer (fp32 master copies), pure bf16
        # (the weights themselves) and MoE (a ChainedOptimizer; padded buckets: several runs)
        "a_flat_adam": _cfg(root, "a_flat", DENSE, 3, PLAIN, flat_adam=True),
        "c_bf16_allreduce_flat_adam": _cfg(root, "c7", DENSE, 3, PLAIN, distributed_optimizer=False,
                                           precision="bf16", flat_adam=True),
        "p_pure_bf16": _cfg(root, "p1", DENSE, 3, PLAIN, distributed_optimizer=False, precision="bf16",
                            fp32_master_weights=False),
        "p_pure_bf16_flat_adam": _cfg(root, "p2", DENSE, 3, PLAIN, distributed_optimizer=False, precision="bf16",
                                      fp32_master_weights=False, flat_adam=True),
        "m_sequential_flat_adam": _cfg(root, "m_flat", MOE, 3, OVERLAP, flat_adam=True),
        # optim.foreach_kernels=false: megatron's per-tensor norm and scaling fallbacks; with the
        # distributed optimizer (fp32) and without it (bf16: megatron's fp16-optimizer copies)
        "a_default_kernels": _cfg(root, "a_kernels", DENSE, 3, PLAIN, foreach_kernels=False),
        "c_bf16_allreduce": _cfg(root, "c4", DENSE, 3, PLAIN, distributed_optimizer=False, precision="bf16"),
        "c_bf16_allreduce_default_kernels": _cfg(root, "c5", DENSE, 3, PLAIN, distributed_optimizer=False,
                                                 precision="bf16", foreach_kernels=False),
        # train.grad_accum_fusion: weight gradients accumulated into main_grad by the layers
        # (megatron's local linears, the fused LM loss), not by DDP's hooks
        "a_wgrad_fusion": _cfg(root, "a_wgrad", DENSE, 3, PLAIN, grad_accum_fusion=True),
        "c_bf16_allreduce_wgrad_fusion": _cfg(root, "c6", DENSE, 3, PLAIN, distributed_optimizer=False,
                                              precision="bf16", grad_accum_fusion=True),
        "e_overlap_compiled_wgrad_fusion": _cfg(root, "e2", DENSE, 3, OVERLAP, compile="layers",
                                                grad_accum_fusion=True),
        # optim.clip_in_fused_adam=false: megatron's separate clipping pass; and megatron's own
        # optimizer.step() in place of the trainer's guarded_step (lever_workers)
        "a_clip_by_megatron": _cfg(root, "a_clip", DENSE, 3, PLAIN, clip_in_fused_adam=False),
        "a_megatron_step": _cfg(root, "a_mstep", DENSE, 3, PLAIN),
        "b_plain_from_overlap": _cfg(root, "b", DENSE, 3, PLAIN, resume="a_overlap"),
        # compiled layers: one eager wait per compiled layer instead of megatron's per-module hooks
        "e_overlap_compiled": _cfg(root, "e", DENSE, 3, OVERLAP, compile="layers"),
        # all-reduce (no distributed optimizer) with 2 micro-batches per rank
        "c_plain_allreduce": _cfg(root, "c1", DENSE, 2, PLAIN, distributed_optimizer=False, micro_batch_size=1),
        "c_overlap_allreduce": _cfg(root, "c2", DENSE, 2, replace(OVERLAP, bucket_size=10_000),
                                    distributed_optimizer=False, micro_batch_size=1),
        # moe: grouped vs sequential experts (the same random initialisation), then step 3 again
        # from the other one's checkpoint
        "m_sequential": _cfg(root, "m_sequential", MOE, 3, OVERLAP, save=True),
        "m_grouped": _cfg(root, "m_grouped", MOE, 3, OVERLAP, save=True, **grouped),
        "m_sequential_megatron_step": _cfg(root, "m_mstep", MOE, 3, OVERLAP),
        "m_sequential_fused_loss_wgrad_fusion": _cfg(root, "m_wgrad", MOE, 3, OVERLAP, fused_lm_loss=True,
                                                     grad_accum_fusion=True),
        # compiled in parts: attention and shared-expert linears accumulate inside their graphs
        "m_sequential_compiled_wgrad_fusion": _cfg(root, "m_cwgrad", MOE, 3, OVERLAP, compile="layers",
                                                   grad_accum_fusion=True),
        "n_grouped_from_sequential": _cfg(root, "n1", MOE, 3, OVERLAP, resume="m_sequential", **grouped),
        "n_sequential_from_grouped": _cfg(root, "n2", MOE, 3, OVERLAP, resume="m_grouped"),
        # fused LM loss: the untied output layer is a bucket of its own, gathered in a bypassed forward
        "m_grouped_fused_loss": _cfg(root, "m_fused", MOE, 3, OVERLAP, fused_lm_loss=True, **grouped),
    }


@pytest.fixture(scope="module")
def results(hf_moe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("levers")
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    per_rank = spawn(levers_rank, 2, str(hf_moe), LAYOUTS, tokens, labels, CHECKPOINTS, str(root), _train_runs(root))
    return {"ranks": per_rank, "hf": hf_moe}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


@pytest.mark.parametrize("layout", CASES)
def test_grouped_experts_match_sequential(results: dict, layout: str) -> None:
    for rank in results["ranks"]:
        sequential, grouped = rank["function"][layout][False], rank["function"][layout][True]
        assert sequential["sequential_module"] and not sequential["grouped_module"]
        assert grouped["grouped_module"] and not grouped["sequential_module"]
        if sequential["logits"] is not None:
            logits = (grouped["logits"] - sequential["logits"]).abs().max().item()
            print(f"{layout}: max |logit diff| = {logits:.2e}")
            assert logits <= SAME
        grads = _max_diff(grouped["grads"], sequential["grads"])
        print(f"{layout}: max |grad diff| = {grads:.2e} over {len(grouped['grads'])} tensors")
        assert grads <= SAME


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_checkpoints_move_between_grouped_and_sequential(results: dict, case: str) -> None:
    from safetensors.torch import load_file

    hf = load_file(results["hf"] / "model.safetensors")
    loaded = {k: v for rank in results["ranks"] for k, v in rank["checkpoint"][case].items()}
    assert _max_diff(loaded, hf) == 0.0


def _runs(results: dict) -> list[dict]:
    return [rank["train"] for rank in results["ranks"]]


def _losses(results: dict, name: str) -> list[float]:
    run = _runs(results)[0][name]
    assert isinstance(run, dict), run
    return run["losses"]


@pytest.mark.parametrize("plain, other", [
    ("a_plain", "a_overlap"),
    ("a_plain", "b_plain_from_overlap"),  # the overlapped run's checkpoint was complete and right
    ("a_plain", "e_overlap_compiled"),
    ("c_plain_allreduce", "c_overlap_allreduce"),
    ("m_sequential", "m_grouped"),
    ("m_sequential", "n_grouped_from_sequential"),
    ("m_grouped", "n_sequential_from_grouped"),
])
def test_trajectories_match(results: dict, plain: str, other: str) -> None:
    reference, losses = _losses(results, plain), _losses(results, other)
    reference = reference[len(reference) - len(losses):]  # a resumed run continues at step 3
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    worst = max(abs(a - b) for a, b in zip(reference, losses))
    print(f"{other} vs {plain}: losses {losses}, max |diff| = {worst:.2e}")
    assert worst <= SAME
    for rank in _runs(results):  # parameters after training: whole, and the same, on every rank
        a, b = rank[plain]["digest"], rank[other]["digest"]
        assert abs(a - b) <= SAME * a, (a, b)


@pytest.mark.parametrize("fused, default", [("a_plain", "a_default_adam"),
                                            ("c_plain_allreduce", "c_default_adam_allreduce")])
def test_fused_adam_follows_the_default_trajectory(results: dict, fused: str, default: str) -> None:
    """torch's fused AdamW (optim.fused_adam, the default) is the same update as the AdamW
    megatron builds (torch's default form: foreach on GPU, a loop on CPU), up to rounding; with
    the distributed optimizer and without."""
    for rank in _runs(results):
        assert rank[fused]["adam"] == "fused" and rank[default]["adam"] == "default"
        # optim.clip_in_fused_adam needs torch's fused AdamW: taken with it, megatron's pass without
        assert rank[fused]["clip_in_adam"] and not rank[default]["clip_in_adam"]
    reference, losses = _losses(results, default), _losses(results, fused)
    worst = max(abs(a - b) for a, b in zip(reference, losses))
    print(f"fused vs default AdamW: losses {losses}, max |diff| = {worst:.2e}")
    assert worst <= 1e-5
    for rank in _runs(results):
        a, b = rank[default]["digest"], rank[fused]["digest"]
        assert abs(a - b) <= 1e-5 * a, (a, b)


@pytest.mark.parametrize("flat, fused, tolerance", [("a_flat_adam", "a_plain", 1e-5),
                                                    ("c_bf16_allreduce_flat_adam", "c_bf16_allreduce", 1e-4),
                                                    ("p_pure_bf16_flat_adam", "p_pure_bf16", 1e-4),
                                                    ("m_sequential_flat_adam", "m_sequential", 1e-5)])
def test_flat_adam_follows_torchs_fused_adamw(results: dict, flat: str, fused: str, tolerance: float) -> None:
    """optim.flat_adam: FlatAdamW (one compiled pass per gradient run) makes torch's fused AdamW
    update up to rounding, in every optimizer megatron builds, with clipping at work. With bf16
    weights a last-bit difference of an fp32 update can round a weight to the neighbouring bf16
    value, so the bf16 runs agree to 1e-4 (weight decay applied to the norms and biases as well
    moves the bf16-with-master-weights run's sum of squares of the weights by 5e-4 in these 3
    steps; pure bf16 loses such small updates altogether)."""
    for rank in _runs(results):
        assert rank[flat]["adam"] == "flat" and rank[fused]["adam"] == "fused", (rank[flat], rank[fused])
    _assert_same_clipped_steps(results, flat, fused, tolerance)


@pytest.mark.parametrize("guarded, megatron, tolerance", [("a_clip_by_megatron", "a_megatron_step", 0.0),
                                                          ("a_plain", "a_megatron_step", SAME),
                                                          ("m_sequential", "m_sequential_megatron_step", SAME)])
def test_guarded_step_is_megatrons_step(results: dict, guarded: str, megatron: str, tolerance: float) -> None:
    """The trainer's guarded_step (one gradient norm, then clip and update) makes exactly the
    update of megatron's optimizer.step() when it clips as megatron does; with the clipping
    factor inside the fused AdamW kernel (optim.clip_in_fused_adam, the default: a division by
    its inverse instead of a multiply) the same up to rounding; with one optimizer and with a
    ChainedOptimizer (MoE: dense and expert parameters clipped by their combined norm), with
    clipping at work."""
    _assert_same_clipped_steps(results, guarded, megatron, tolerance)


@pytest.mark.parametrize("foreach, default", [("a_plain", "a_default_kernels"),
                                              ("c_bf16_allreduce", "c_bf16_allreduce_default_kernels")])
def test_foreach_kernels_follow_megatrons_fallbacks(results: dict, foreach: str, default: str) -> None:
    """optim.foreach_kernels (the default): torch's foreach norm and scaling give the gradient
    norms, clipped updates and parameters of megatron's per-tensor fallbacks, up to summation
    order; with the distributed optimizer in fp32 and with megatron's bf16 optimizer."""
    _assert_same_clipped_steps(results, foreach, default, SAME)


def _assert_same_clipped_steps(results: dict, run: str, reference: str, tolerance: float) -> None:
    """On every rank: run's per-step losses and gradient norms and its final parameters (digest)
    are reference's within tolerance (relative, absolute below 1), with clipping at work."""
    for rank in _runs(results):
        a, b = rank[run], rank[reference]
        assert isinstance(a, dict) and isinstance(b, dict), (a, b)
        print(f"{run}: grad norms {a['grad_norms']}, {reference}: {b['grad_norms']}")
        assert max(a["grad_norms"]) > 1.0  # optim.clip_grad: at least one step was clipped
        for x, y in zip(a["losses"] + a["grad_norms"], b["losses"] + b["grad_norms"], strict=True):
            assert abs(x - y) <= tolerance * max(1.0, abs(y)), (x, y)
        assert abs(a["digest"] - b["digest"]) <= tolerance * b["digest"]


@pytest.mark.parametrize("unfused, fused", [("a_plain", "a_wgrad_fusion"),
                                             ("e_overlap_compiled", "e_overlap_compiled_wgrad_fusion"),
                                             ("m_sequential", "m_sequential_fused_loss_wgrad_fusion"),
                                             ("m_sequential", "m_sequential_compiled_wgrad_fusion")])
def test_grad_accum_fusion_follows_the_unfused_trajectory(results: dict, unfused: str, fused: str) -> None:
    """fp32: the layers' in-place accumulation (megatron's linears with the torch stand-in for
    apex's kernel, the fused LM loss, compiled layers' own linears, MoE experts) is the same
    update, and compiled layers stay one graph each."""
    reference, losses = _losses(results, unfused), _losses(results, fused)
    worst = max(abs(a - b) for a, b in zip(reference, losses, strict=True))
    print(f"{fused} vs {unfused}: losses {losses}, max |diff| = {worst:.2e}")
    assert worst <= 1e-5
    for rank in _runs(results):
        a, b = rank[unfused]["digest"], rank[fused]["digest"]
        assert abs(a - b) <= 1e-5 * a, (a, b)
    for rank in _runs(results):  # the layers did add them: all linear weights (and the fused loss's)
        assert rank[unfused]["fused_wgrads"] == 0 and rank[fused]["fused_wgrads"] >= 4 * DENSE.num_hidden_layers
    if "compiled" in unfused:  # the compiled layers' linears accumulate inside their graphs: no split
        graphs = _runs(results)[0][fused]["graphs"]
        print(f"dynamo graphs with compiled layers and fused accumulation: {graphs}")
        assert graphs == _runs(results)[0][unfused]["graphs"] <= 2


def test_grad_accum_fusion_in_bf16(results: dict) -> None:
    """bf16: the fused path adds each weight gradient unrounded (megatron's unfused path rounds it
    to bf16 first), so losses agree to bf16 precision only (Adam's first update, lr x sign, hides
    the difference: it shows from step 3 on)."""
    reference, losses = _losses(results, "c_bf16_allreduce"), _losses(results, "c_bf16_allreduce_wgrad_fusion")
    worst = max(abs(a - b) for a, b in zip(reference, losses, strict=True))
    print(f"bf16 fused vs unfused weight-gradient accumulation: losses {losses}, max |diff| = {worst:.2e}")
    assert worst <= 1e-3
    for rank in _runs(results):
        assert rank["c_bf16_allreduce"]["fused_wgrads"] == 0
        assert rank["c_bf16_allreduce_wgrad_fusion"]["fused_wgrads"] >= 4 * DENSE.num_hidden_layers


def test_fused_loss_with_overlapped_param_gather(results: dict) -> None:
    reference, losses = _losses(results, "m_grouped"), _losses(results, "m_grouped_fused_loss")
    worst = max(abs(a - b) for a, b in zip(reference, losses))
    print(f"fused loss vs plain loss, overlapped gather: max |diff| = {worst:.2e}")
    assert worst <= 1e-5


def test_overlapped_param_gather_keeps_compiled_layers_whole(results: dict) -> None:
    graphs = _runs(results)[0]["e_overlap_compiled"]["graphs"]
    print(f"dynamo graphs with compiled layers and overlapped param gather: {graphs}")
    assert 1 <= graphs <= 2  # megatron's hook on every submodule would break each layer into ~13
