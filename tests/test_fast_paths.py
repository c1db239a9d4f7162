"""The fast paths of the local layers (model/fast_paths.py) compute the plain path's function (fp32, CPU).

One spawn of two gloo ranks (megatron's import dominates start-up), in which:
- Liger's Triton kernels run through Triton's interpreter (tests/liger_interpreter.py): each
  wrapper (model/liger.py) against the plain function, forward and gradients; the model with all
  three kernels at TP2 + sequence parallelism against the plain model with the same weights
  (losses and every DDP gradient); two Trainer steps with train.liger_kernels=[swiglu] (a subset:
  only that kernel runs).
- Compiled layers run on inductor's C++ backend: the model with full recompute at DP2 (TP1)
  against eager (losses and gradients; one no-grad and one grad graph shared by both layers, no
  graph break); an MoE model at EP2 with grouped experts, its layers compiled in parts, against
  eager (one graph per part shared by both layers, no graph break); compiled layers with Liger's
  SwiGLU inside their graph as an operator (interpreted kernels; one graph, no break); two Trainer
  steps with train.compile=layers (megatron DDP, distributed optimizer, the trainer's default
  overlap settings).
Each fast result also proves the fast path ran (kernel calls counted, modules swapped, layers
compiled; compiled layers' attention takes RoPE from cos/sin tables, tests/test_rope.py). In this
process: validation of the settings and the fallbacks.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.model import liger
from qwen2_megatron.model.fast_paths import FastPaths, compile_decoder_layers
from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.train.config import ConfigError, LogConfig, OptimConfig, RunConfig, TrainConfig, TrainerConfig, validate
from tests.fast_paths_workers import Case, Variant, fast_paths_rank
from tests.liger_interpreter import interpreter_env

REL_TOL = 1e-5
ALL = ("rms_norm", "swiglu", "rope")
TRAIN_SEQ = 32
CASES = {
    # small awkward shape (GQA 6/2, head dim 8, MLP width 80)
    "tp2_sp": Case(ParallelLayout(tp=2, sequence_parallel=True), [Variant("liger", ALL)]),
    # the Trainer runs' layer shape and tokens per micro-batch: their compiled layer graph is the
    # grad graph compiled here, which inductor's cache then serves (CPU compilation is slow)
    "dp2": Case(ParallelLayout(), [Variant("compile_full_recompute", compile="layers", overrides={
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1})],
        shape={f: getattr(get_preset("tiny"), f) for f in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")},
        seq=TRAIN_SEQ),
    # compiled layers with Liger's SwiGLU inside their graphs, an operator of its own (odd MLP width 80)
    "dp2_swiglu": Case(ParallelLayout(), [Variant("compile_liger_swiglu", ("swiglu",), compile="layers")]),
    # MoE layers compiled in parts, their routed experts split over two expert-parallel ranks
    "ep2_moe": Case(ParallelLayout(ep=2), [Variant("compile_moe", compile="layers")],
                    shape={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                           "shared_expert_intermediate_size": 64},
                    build={"moe_grouped_gemm": True}),
}


def _trainer_cfg(root: Path, name: str, **train: object) -> TrainerConfig:
    return TrainerConfig(
        model=replace(get_preset("tiny"), num_hidden_layers=2),
        train=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, seq_length=TRAIN_SEQ, **train),
        parallel=ParallelLayout(), optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=demo_mixture(num_workers=0), log=LogConfig(interval=1, progress_bar=False),
        run=RunConfig(dir=str(root / name), name=name),
        checkpoint=CheckpointConfig(dir=str(root / name / "checkpoints"), interval=0, save_at_end=False),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("fast_trainer")
    trainers = {
        "plain": _trainer_cfg(root, "plain"),
        "liger": _trainer_cfg(root, "liger", liger_kernels=["swiglu"]),
        "compile": _trainer_cfg(root, "compile", compile="layers"),
    }
    for cfg in trainers.values():
        validate(cfg, world_size=2)
    with interpreter_env():  # the ranks' triton runs Liger's kernels on CPU tensors
        per_rank = spawn(fast_paths_rank, 2, CASES, trainers)
    for rank, result in enumerate(per_rank):
        print(f"rank {rank} seconds: { {k: round(v, 1) for k, v in result['seconds'].items()} }")
    return per_rank


def _close(diff: float, scale: float) -> bool:
    return diff <= REL_TOL * scale + 1e-12


@pytest.mark.parametrize("kernel", ALL)
def test_liger_kernel_equals_plain_function(runs: list[dict], kernel: str) -> None:
    for rank, result in enumerate(runs):
        diff, scale = result["kernels"][kernel]
        print(f"rank {rank} {kernel}: max diff {diff:.2e} (scale {scale:.2e})")
        assert scale > 0 and _close(diff, scale)


@pytest.mark.parametrize("layout,variant", [(name, v.name) for name, case in CASES.items() for v in case.variants])
def test_fast_model_equals_plain_model(runs: list[dict], layout: str, variant: str) -> None:
    for rank, result in enumerate(runs):
        got = result["layouts"][layout][variant]
        print(f"rank {rank} {layout} {variant}: {got}")
        assert got["same_names"]
        assert _close(got["loss_diff"], got["loss_scale"]) and _close(got["grad_diff"], got["grad_scale"])
        if variant == "liger":  # every norm (4 in layers + final), MLP and attention swapped, and called
            assert got["swapped"] == {"rms_norm": 5, "swiglu": 2, "rope": 2, "tabled_rope": 0} and got["compiled"] == 0
            assert all(got["kernel_calls"][k] > 0 for k in ALL)
        elif variant == "compile_liger_swiglu":
            # both MLPs swapped, both layers compiled into one graph shared by the two, no break, and
            # Liger's kernels run as the graph's operator (forward and backward, 2 layers x 2 micro-batches);
            # compiled layers take RoPE from cos/sin tables
            assert got["swapped"] == {"rms_norm": 0, "swiglu": 2, "rope": 0, "tabled_rope": 2} and got["compiled"] == 2
            assert got["graphs"] == 1 and got["graph_breaks"] == {} and got["swiglu_op_calls"] == 8
        elif layout == "ep2_moe":
            # both layers' four parts compiled, one graph each shared by the layers; the routed
            # activation's token count differs per EP rank and micro-batch: once more, with a dynamic size
            assert got["compiled"] == 2 and got["graphs"] == 5 and got["graph_breaks"] == {}
            assert got["swapped"]["tabled_rope"] == 2
        else:  # both layers compiled, one graph per grad mode shared by the two layers, no break,
            # their RoPE from cos/sin tables and no Liger module
            assert got["compiled"] == 2 and got["graphs"] == 2 and got["graph_breaks"] == {}
            assert got["swapped"] == {"rms_norm": 0, "swiglu": 0, "rope": 0, "tabled_rope": 2}
            assert sum(got["kernel_calls"].values()) == 0
        assert result["layouts"][layout]["plain_after"] == {"fast_modules": 0, "compiled": 0}


@pytest.mark.parametrize("name", ["liger", "compile"])
def test_trainer_with_fast_path_follows_the_plain_trajectory(runs: list[dict], name: str) -> None:
    plain, fast = runs[0]["trainer"]["plain"], runs[0]["trainer"][name]
    print(f"trainer plain {plain['losses']} {name} {fast}")
    assert len(plain["losses"]) == len(fast["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(plain["losses"], fast["losses"])) <= REL_TOL * max(plain["losses"])
    if name == "liger":
        assert fast["kernel_calls"]["swiglu"] > 0 and fast["compiled"] == 0
        assert fast["kernel_calls"]["rms_norm"] == fast["kernel_calls"]["rope"] == 0
    else:
        assert fast["compiled"] == 2 and fast["graph_breaks"] == {} and sum(fast["kernel_calls"].values()) == 0
    assert plain["compiled"] == 0 and sum(plain["kernel_calls"].values()) == 0


# ----- settings and fallbacks (this process) -------------------------------------------------------


@pytest.mark.parametrize("train,layout,match", [
    ({"liger_kernels": ["rms_norm", "fused_attention"]}, ParallelLayout(), "distinct names from"),
    ({"liger_kernels": ["rope", "rope"]}, ParallelLayout(), "distinct names from"),
    ({"compile": "all"}, ParallelLayout(), "train.compile"),
    ({"compile": "layers", "liger_kernels": ["swiglu", "rms_norm"]}, ParallelLayout(), r"\['rms_norm'\] are alternatives"),
    ({"compile": "layers"}, ParallelLayout(tp=2), "tensor parallel size 1"),
    ({"compile": "layers", "recompute": "selective"}, ParallelLayout(), "selective"),
    ({"compile": "layers", "activation_memory_budget": 0.0}, ParallelLayout(), r"must be in \(0, 1\]"),
    ({"compile": "layers", "activation_memory_budget": 1.5}, ParallelLayout(), r"must be in \(0, 1\]"),
    ({"activation_memory_budget": 0.9}, ParallelLayout(), "applies to compiled layers"),
])
def test_invalid_settings_fail_validation(tmp_path: Path, train: dict, layout: ParallelLayout, match: str) -> None:
    cfg = replace(_trainer_cfg(tmp_path, "x", **train), parallel=layout)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=2)


def test_valid_settings_pass_validation(tmp_path: Path) -> None:
    validate(_trainer_cfg(tmp_path, "a", compile="layers", recompute="full"), world_size=2)
    validate(_trainer_cfg(tmp_path, "c", compile="layers", liger_kernels=["swiglu"]), world_size=2)
    validate(_trainer_cfg(tmp_path, "d", compile="layers", activation_memory_budget=0.9), world_size=2)
    validate(replace(_trainer_cfg(tmp_path, "b", liger_kernels=["swiglu", "rope"]),
                     parallel=ParallelLayout(tp=2, sequence_parallel=True)), world_size=2)


def test_missing_liger_is_an_error_when_requested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liger, "available", lambda: False)
    with pytest.raises(ConfigError, match="needs the liger-kernel package: pip install"):
        validate(_trainer_cfg(tmp_path, "x", liger_kernels=["rms_norm"]), world_size=2)
    with pytest.raises(RuntimeError, match="liger-kernel is not installed"):
        FastPaths(("rms_norm",)).resolve(te=False)
    validate(_trainer_cfg(tmp_path, "y"), world_size=2)  # not requested: not needed
    assert FastPaths().resolve(te=False) == FastPaths()


def test_fallbacks_print_one_notice(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(liger, "_notices", set())
    # no GPU here and no interpreter: Liger's kernels cannot run, the plain path is used
    assert FastPaths(ALL).resolve(te=False) == FastPaths()
    assert FastPaths(("rope",)).resolve(te=False) == FastPaths()
    # with Transformer Engine's layers neither fast path applies
    assert FastPaths(compile="layers").resolve(te=True) == FastPaths()
    assert FastPaths(compile="layers").resolve(te=False) == FastPaths(compile="layers")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "need a CUDA device" in lines[0] and "Transformer Engine" in lines[2], lines


def test_fast_paths_refuse_unsupported_combinations() -> None:
    with pytest.raises(ValueError, match="choose from"):
        FastPaths(("layer_norm",))
    with pytest.raises(ValueError, match=r"\['rms_norm'\] and compiled layers are alternatives"):
        FastPaths(("rms_norm", "swiglu"), "layers")
    assert FastPaths(("swiglu",), "layers").liger == ("swiglu",)  # runs inside the compiled layers
    for config, match in (({"tensor_model_parallel_size": 2, "recompute_granularity": None}, "tensor parallel"),
                          ({"tensor_model_parallel_size": 1, "recompute_granularity": "selective"}, "selective")):
        with pytest.raises(ValueError, match=match):
            compile_decoder_layers(SimpleNamespace(config=SimpleNamespace(**config)))


def test_benchmark_overrides_select_the_fast_paths(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from bench_throughput import parse_args, trainer_config

    cfg = trainer_config(parse_args(["--override", "train.liger_kernels=[rms_norm,rope]"]), tmp_path)
    assert cfg.train.liger_kernels == ["rms_norm", "rope"] and cfg.train.compile == "none"
    cfg = trainer_config(parse_args(["--override", "train.compile=layers"]), tmp_path)
    assert cfg.train.compile == "layers" and cfg.train.liger_kernels == []
