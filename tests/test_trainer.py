"""The trainer: identical loss trajectories across layouts, gradient accumulation, non-finite
handling and W&B offline records, on the real demo corpus and tokenizer (CPU, gloo)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from qwen2_megatron.convert.convert import import_hf
from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.checkpoint.model_checkpoint import checkpoint_shape
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.model.params import rank_memory
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.train.config import (
    LogConfig, OptimConfig, RunConfig, StageConfig, TrainConfig, TrainerConfig, WandbConfig,
)
from tests.conftest import save_random_hf
from tests.trainer_workers import train_and_measure_state, train_and_release, train_configs
from tests.wandb_reader import read_run

STEPS = 4
TRAJECTORY_TOL = 2e-4
_MODEL = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.02)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random dense and MoE models (real Qwen2 vocabulary) as megatron checkpoints: every run
    starts from the same weights whatever its layout."""
    root = tmp_path_factory.mktemp("init")
    out = {}
    for name, moe in (("dense", False), ("moe", True)):
        hf = save_random_hf(root / f"hf_{name}", moe, seed=5, **_MODEL)
        out[name] = import_hf(hf, root / name, ParallelLayout())
    return out


def _cfg(root: Path, ckpt: Path, name: str, **changes) -> TrainerConfig:
    shape = checkpoint_shape(ckpt)
    train = TrainConfig(steps=STEPS, global_batch_size=4, micro_batch_size=2, seq_length=64,
                        init_from=str(ckpt))
    cfg = TrainerConfig(
        model=shape, train=train, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=demo_mixture(num_workers=0), log=LogConfig(interval=1, progress_bar=False),
        run=RunConfig(dir=str(root / name), name=name),
        checkpoint=CheckpointConfig(dir=str(root / name / "checkpoints"), interval=0, save_at_end=False),
    )
    for key, value in changes.items():  # "section__field" changes one field, "section" all
        section, _, field = key.partition("__")
        setattr(cfg, section, replace(getattr(cfg, section), **{field: value}) if field else value)
    return cfg


@pytest.fixture(scope="module")
def runs(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("runs")
    dense, moe = checkpoints["dense"], checkpoints["moe"]
    wandb = WandbConfig(mode="offline", project="tests", tags=["ci"])
    one = {
        "dp1": _cfg(root, dense, "dp1"),
        "accumulate_mbs4": _cfg(root, dense, "mbs4", train__micro_batch_size=4),
        "wandb_first": _cfg(root, dense, "wandb", log__wandb=wandb, train__steps=3, checkpoint__save_at_end=True),
        "wandb_restart": _cfg(root, dense, "wandb", log__wandb=wandb, train__steps=5),
        "nonfinite_skip": _cfg(root, dense, "skip", optim__lr=1e30, optim__clip_grad=0.0,
                               train__steps=8, train__max_consecutive_skips=2),
        "nonfinite_stop": _cfg(root, dense, "stop", optim__lr=1e30, optim__clip_grad=0.0,
                               train__steps=8, train__on_nonfinite="stop"),
        "stages_eval": _cfg(root, dense, "stages", train__eval_interval=2, train__eval_steps=1,
                            train__stages=[StageConfig(start_step=2, seq_length=32, rope_theta=1e4)]),
    }
    two = {
        "dp2": _cfg(root, dense, "dp2"),
        "tp2": _cfg(root, dense, "tp2", parallel=ParallelLayout(tp=2, sequence_parallel=True)),
        "pp2": _cfg(root, dense, "pp2", parallel=ParallelLayout(pp=2)),
        "moe_dp2": _cfg(root, moe, "moe_dp2"),
        "moe_ep2": _cfg(root, moe, "moe_ep2", parallel=ParallelLayout(ep=2)),
    }
    results = dict(zip(one, spawn(train_configs, 1, list(one.values()))[0]))
    results.update(zip(two, spawn(train_configs, 2, list(two.values()))[0]))
    results["root"] = root
    return results


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_dense_trajectory_is_layout_independent(runs: dict, layout: str) -> None:
    reference, losses = runs["dp1"], runs[layout]
    assert isinstance(losses, list) and len(losses) == STEPS, losses
    worst = max(abs(a - b) for a, b in zip(reference, losses))
    print(f"{layout} vs dp1: max |loss diff| = {worst:.2e} over {STEPS} steps")
    assert worst <= TRAJECTORY_TOL
    assert losses[-1] < losses[0]


def test_moe_trajectory_ep2_equals_ep1(runs: dict) -> None:
    reference, losses = runs["moe_dp2"], runs["moe_ep2"]
    assert isinstance(losses, list) and len(losses) == STEPS, losses
    worst = max(abs(a - b) for a, b in zip(reference, losses))
    print(f"moe ep2 vs ep1: max |loss diff| = {worst:.2e}")
    assert worst <= TRAJECTORY_TOL


def test_gradient_accumulation_equals_larger_micro_batch(runs: dict) -> None:
    worst = max(abs(a - b) for a, b in zip(runs["dp1"], runs["accumulate_mbs4"]))
    print(f"2 x mbs2 vs 1 x mbs4: max |loss diff| = {worst:.2e}")
    assert worst <= TRAJECTORY_TOL


def test_metrics_are_recorded_every_interval(runs: dict) -> None:
    records = [json.loads(line) for line in (runs["root"] / "dp1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device",
                "step_time_s", "peak_memory_gib", "consumed_tokens", "skipped_steps"):
        assert all(r[key] is not None for r in records), key
    assert records[-1]["consumed_tokens"] == STEPS * 4 * 64
    assert (runs["root"] / "dp1" / "config.yaml").read_text().count("hidden_size: 64") == 1
    moe = [json.loads(line) for line in (runs["root"] / "moe_ep2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["moe_aux_loss"] > 0 and r["moe_load_imbalance"] >= 1.0 for r in moe)


def test_nonfinite_steps_are_skipped_then_the_run_stops(runs: dict) -> None:
    message = runs["nonfinite_skip"]
    assert isinstance(message, str) and "NonFiniteError: 2 consecutive non-finite steps" in message
    records = [json.loads(line) for line in (runs["root"] / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] >= 1


def test_nonfinite_stop_names_the_step(runs: dict) -> None:
    message = runs["nonfinite_stop"]
    assert isinstance(message, str) and "NonFiniteError: non-finite step" in message
    assert "train.on_nonfinite=stop" in message


def test_wandb_offline_run_is_continued_after_restart(runs: dict) -> None:
    run_dir = runs["root"] / "wandb"
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    first, second = (read_run(f) for f in files)
    assert first["id"] == second["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert first["config"]["model"]["hidden_size"] == 64
    assert first["config"]["log"]["wandb"]["tags"] == ["ci"]
    steps = [row["_step"] for row in first["history"]]
    assert steps == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["lr"] > 0 and "tokens_per_s" in row for row in first["history"])
    assert [row["_step"] for row in second["history"]] == [4, 5]  # resumed from the step-3 checkpoint


def test_stages_switch_sequence_length_and_evaluation_runs(runs: dict) -> None:
    losses = runs["stages_eval"]
    assert isinstance(losses, list) and len(losses) == STEPS, losses
    records = [json.loads(line) for line in (runs["root"] / "stages" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "eval_loss" not in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["seq_length"] for r in train] == [64, 64, 32, 32]
    assert [r["consumed_tokens"] for r in train] == [256, 512, 640, 768]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)


def test_a_finished_trainer_is_freed(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Nothing keeps a trainer, its model or its optimizer alive once it is done (a long-lived
    process, a benchmark or a notebook running several, would otherwise keep their memory): not
    its signal handlers, and not megatron's MoE dispatcher holding the last forward's graph,
    which reaches DDP's gradient hooks (a cycle the garbage collector cannot see). A trainer that
    fails to start gives the signal handlers back too. A runtime torn down for another layout
    destroys its process groups with their gloo threads."""
    configs = [_cfg(tmp_path, checkpoints[name], name, train__steps=2) for name in ("dense", "moe")]
    invalid = _cfg(tmp_path, checkpoints["dense"], "invalid", train__steps=1)  # warm-up 1 of 1 step
    survivors, threads = spawn(train_and_release, 1, [*configs, invalid])[0]
    assert survivors == [[], [], ["ConfigError"]]
    # The second layout's groups are destroyed as the first's were. Kept, its 20-odd gloo groups
    # would add 67 threads; a few stay, held by megatron-core until its next initialisation.
    assert threads[1] - threads[0] < 12, threads


def test_pure_bf16_holds_8_bytes_per_parameter(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """optim.fp32_master_weights=false: the optimizer steps the model's own bf16 weights (no
    master copy) with bf16 gradients and bf16 Adam states, 8 bytes per parameter as transformers'
    pure-bf16 training, against 18 with fp32 master weights; dense and MoE (dense and expert
    optimizers), as qwen2-model-info's rank_memory says, and the runs train; with the weight
    gradients of the layers and of the fused LM loss accumulated straight into the bf16 main_grad
    (train.grad_accum_fusion) too, on the same trajectory up to bf16 rounding."""
    pure = {"train__precision": "bf16", "optim__distributed_optimizer": False, "optim__fp32_master_weights": False,
            "train__steps": 3}
    configs = [
        _cfg(tmp_path, checkpoints["dense"], "pure", **pure),
        _cfg(tmp_path, checkpoints["moe"], "pure_moe", **pure),
        _cfg(tmp_path, checkpoints["dense"], "master", train__precision="bf16", train__steps=3),
        _cfg(tmp_path, checkpoints["dense"], "pure_fusion", **pure, train__grad_accum_fusion=True,
             train__fused_lm_loss=True),
    ]
    layout = ParallelLayout().resolve(1)
    results = spawn(train_and_measure_state, 1, configs)[0]
    for cfg, got, master in zip(configs, results, (False, False, True, False), strict=True):
        want = rank_memory(cfg.model, layout, 2, distributed_optimizer=master, fp32_master_weights=master)
        print(f"{cfg.run.name}: {got}")
        assert got["params"] == want.params
        assert got["weights"] == want.weight_bytes == 2 * want.params
        assert got["grads"] == want.grad_bytes == (4 if master else 2) * want.params
        assert got["master"] + got["states"] == want.optimizer_bytes == (12 if master else 4) * want.params
        assert got["dtypes"] == (["torch.float32"] if master else ["torch.bfloat16"])
        assert len(got["losses"]) == 3 and all(math.isfinite(x) for x in got["losses"])
    fused, plain = results[3]["losses"], results[0]["losses"]
    assert max(abs(a - b) for a, b in zip(fused, plain)) <= 1e-2, (fused, plain)
