"""Checkpoints: exact resume, resharding to other layouts, damaged files, fallback, retention."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from qwen2_megatron.checkpoint.location import remove_tree
from qwen2_megatron.checkpoint.config import CheckpointConfig
from qwen2_megatron.checkpoint.model_checkpoint import CheckpointMismatchError, check_shape
from qwen2_megatron.checkpoint.store import CheckpointStore
from qwen2_megatron.checkpoint.validate import (
    CorruptShardError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
    check_files,
    verify_checksums,
)
from qwen2_megatron.cli import checkpoint as checkpoint_cli
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from qwen2_megatron.train.config import LogConfig, OptimConfig, RunConfig, TrainConfig, TrainerConfig
from tests.conftest import flip_a_weight_byte
from tests.trainer_workers import train_and_list_helpers, train_configs

RESHARD_TOL = 1e-4
_DENSE = replace(get_preset("tiny"), hidden_size=64, intermediate_size=128)
_MOE = replace(get_preset("tiny_moe"), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               shared_expert_intermediate_size=64)


def _cfg(
    root: Path, run: str, steps: int, layout: ParallelLayout, moe: bool = False, precision: str = "fp32",
    pure_bf16: bool = False, flat_adam: bool = False, **ckpt
) -> TrainerConfig:
    """pure_bf16: bf16 without master weights (megatron's FP32Optimizer on the bf16 weights)."""
    return TrainerConfig(
        model=_MOE if moe else _DENSE,
        parallel=layout,
        train=TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=2, seq_length=64,
                          precision="bf16" if pure_bf16 else precision),
        optim=OptimConfig(lr=2e-3, warmup_steps=1, decay_steps=6,  # same schedule for 3 and 6 steps
                          distributed_optimizer=not pure_bf16, fp32_master_weights=not pure_bf16,
                          flat_adam=flat_adam),
        data=demo_mixture(num_workers=0),
        log=LogConfig(interval=1, progress_bar=False),
        run=RunConfig(dir=str(root / run), name=run),
        checkpoint=CheckpointConfig(**{"dir": str(root / run / "checkpoints"), "interval": 0, **ckpt}),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    dp2, tp2, pp2, ep2 = ParallelLayout(), ParallelLayout(tp=2, sequence_parallel=True), ParallelLayout(pp=2), ParallelLayout(ep=2)
    two = {
        "ref": _cfg(root, "ref", 6, dp2, save_at_end=False),
        "ref_moe": _cfg(root, "ref_moe", 6, ep2, moe=True, save_at_end=False),
        "dp2_first": _cfg(root, "dp2", 3, dp2),
        "dp2_resumed": _cfg(root, "dp2", 6, dp2),
        "tp2_first": _cfg(root, "tp2", 3, tp2),
        "moe_ep2_first": _cfg(root, "moe", 3, ep2, moe=True),
        # bf16: the optimizer's fp32 main weights are tensors of their own (in fp32, views of the weights)
        "ref_moe_bf16": _cfg(root, "ref_moe_bf16", 6, ep2, moe=True, precision="bf16", save_at_end=False),
        "moe_bf16_first": _cfg(root, "moe_bf16", 3, ep2, moe=True, precision="bf16"),
        # resumed with checkpoint.fully_parallel_load: the dense weights, alike on both DP ranks,
        # are read half by each and exchanged
        "moe_bf16_resumed": _cfg(root, "moe_bf16", 6, ep2, moe=True, precision="bf16", fully_parallel_load=True),
        # background saves every step (each waits for the one before), then resumed
        "async_first": _cfg(root, "async", 3, dp2, interval=1, async_save=True),
        "async_resumed": _cfg(root, "async", 6, dp2, interval=2, async_save=True),
        # async_copy=overlap: each save's host copy is taken at the save, its writer started after
        # the next step (which changed the state)
        "overlap_first": _cfg(root, "overlap", 3, dp2, interval=1, async_save=True, async_copy="overlap"),
        "overlap_resumed": _cfg(root, "overlap", 6, dp2, interval=2, async_save=True, async_copy="overlap"),
        # async_writer=persistent: one writer process per rank for the run, reading staging buffers
        # in shared memory (on a CPU the copy is taken at the save)
        "persistent_first": _cfg(root, "persistent", 3, dp2, interval=1, async_save=True, async_writer="persistent"),
        "persistent_resumed": _cfg(root, "persistent", 6, dp2, interval=2, async_save=True,
                                   async_writer="persistent"),
        "ref_pure": _cfg(root, "ref_pure", 6, dp2, pure_bf16=True, save_at_end=False),
        "pure_first": _cfg(root, "pure", 3, dp2, pure_bf16=True),
        "pure_resumed": _cfg(root, "pure", 6, dp2, pure_bf16=True),
        "pure_tp2_first": _cfg(root, "pure_tp2", 3, tp2, pure_bf16=True),
        # optim.flat_adam: the loaded state moves into its flat buffers (pure bf16: torch's
        # load_state_dict replaces the moments; distributed optimizer: loaded into them)
        "ref_flat": _cfg(root, "ref_flat", 6, dp2, pure_bf16=True, flat_adam=True, save_at_end=False),
        "flat_first": _cfg(root, "flat", 3, dp2, pure_bf16=True, flat_adam=True),
        "flat_resumed": _cfg(root, "flat", 6, dp2, pure_bf16=True, flat_adam=True),
        "ref_flat_dist": _cfg(root, "ref_flat_dist", 6, dp2, flat_adam=True, save_at_end=False),
        "flat_dist_first": _cfg(root, "flat_dist", 3, dp2, flat_adam=True),
        "flat_dist_resumed": _cfg(root, "flat_dist", 6, dp2, flat_adam=True),
    }
    results = dict(zip(two, spawn(train_configs, 2, list(two.values()))[0]))
    # The step-3 checkpoints resumed in other layouts (separate run dirs holding copies).
    for source, target in (("tp2", "tp2_to_dp2"), ("tp2", "tp2_to_pp2"), ("moe", "ep2_to_ep1"), ("dp2", "dp2_to_dp1"),
                           ("pure", "pure_to_master"), ("pure_tp2", "pure_tp2_to_dp2")):
        step3 = Path("checkpoints") / "step_00000003"
        shutil.copytree(root / source / step3, root / target / step3)
    two = {
        "tp2_to_dp2": _cfg(root, "tp2_to_dp2", 6, dp2, save_at_end=False, fully_parallel_load=True),
        "tp2_to_pp2": _cfg(root, "tp2_to_pp2", 6, pp2, save_at_end=False),
        "ep2_to_ep1": _cfg(root, "ep2_to_ep1", 6, dp2, moe=True, save_at_end=False),
        # a pure-bf16 checkpoint resumed with fp32 master weights (the distributed optimizer)
        "pure_to_master": _cfg(root, "pure_to_master", 6, dp2, precision="bf16", save_at_end=False),
        # pure bf16's per-parameter optimizer state (megatron's model-space form) in another layout
        "pure_tp2_to_dp2": _cfg(root, "pure_tp2_to_dp2", 6, dp2, pure_bf16=True, save_at_end=False),
    }
    results.update(zip(two, spawn(train_configs, 2, list(two.values()))[0]))
    one = {"dp2_to_dp1": _cfg(root, "dp2_to_dp1", 6, ParallelLayout(), save_at_end=False)}
    results.update(zip(one, spawn(train_configs, 1, list(one.values()))[0]))
    results["root"] = root
    return results


def test_interrupted_and_resumed_run_is_bit_identical(runs: dict) -> None:
    """Catches e.g. Adam's step counter not being restored (megatron without TE/apex)."""
    assert runs["dp2_first"] == runs["ref"][:3]
    assert runs["dp2_resumed"] == runs["ref"][3:], (runs["dp2_resumed"], runs["ref"])


def test_bf16_moe_run_resumes_exactly(runs: dict) -> None:
    assert runs["moe_bf16_first"] + runs["moe_bf16_resumed"] == runs["ref_moe_bf16"]


def test_pure_bf16_run_resumes_exactly(runs: dict) -> None:
    """optim.fp32_master_weights=false: the bf16 weights and bf16 Adam states are the whole
    optimizer state; saved and loaded, the run goes on bit for bit."""
    assert runs["pure_first"] + runs["pure_resumed"] == runs["ref_pure"]


@pytest.mark.parametrize("run", ["flat", "flat_dist"])
def test_flat_adam_run_resumes_exactly(runs: dict, run: str) -> None:
    """optim.flat_adam keeps torch's AdamW state form: saved and loaded, the run goes on bit for bit."""
    assert runs[f"{run}_first"] + runs[f"{run}_resumed"] == runs[f"ref_{run}"]


def test_other_optimizer_form_is_refused_by_name(runs: dict) -> None:
    """A checkpoint whose optimizer state has another form than this run keeps is refused before
    any shard is read, naming both optimizers, the settings behind them and the way out."""
    error = runs["pure_to_master"]
    assert isinstance(error, str) and error.startswith("CheckpointMismatchError"), error
    for words in ("written by megatron's FP32Optimizer", "optim.fp32_master_weights=false",
                  "this run's optimizer is DistributedOptimizer (optim.distributed_optimizer=true)",
                  "train.init_from=<checkpoint> checkpoint.resume=none"):
        assert words in error


@pytest.mark.parametrize("run", ["async", "overlap", "persistent"])
def test_asynchronous_saves_resume_exactly(runs: dict, run: str) -> None:
    assert runs[f"{run}_first"] + runs[f"{run}_resumed"] == runs["ref"]
    store = CheckpointStore(runs["root"] / run / "checkpoints")
    assert [p.name for p in store.listing().complete] == ["step_00000003", "step_00000004", "step_00000006"]
    assert store.listing().incomplete == [] and store.latest() == store.path(6)
    check_files(store.path(6))


@pytest.mark.parametrize("run, reference, tol", [
    ("tp2_to_dp2", "ref", RESHARD_TOL), ("tp2_to_pp2", "ref", RESHARD_TOL), ("dp2_to_dp1", "ref", RESHARD_TOL),
    ("ep2_to_ep1", "ref_moe", RESHARD_TOL),
    # bf16 weights updated in bf16: another layout's summation order moves losses by bf16 rounding
    ("pure_tp2_to_dp2", "ref_pure", 2e-3),
])
def test_resharded_resume_continues_the_original_run(runs: dict, run: str, reference: str, tol: float) -> None:
    resumed, original = runs[run], runs[reference][3:]
    assert isinstance(resumed, list) and len(resumed) == 3, resumed
    worst = max(abs(a - b) for a, b in zip(resumed, original))
    print(f"{run}: max |loss diff| vs the uninterrupted run = {worst:.2e}")
    assert worst <= tol


def test_checkpoint_contents_and_inspection(runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = runs["root"] / "dp2" / "checkpoints" / "step_00000003"
    state = json.loads((path / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_tokens"] == 3 * 4 * 64
    assert state["data"]["consumed"] == 12 and "lanes" in state["data"]
    assert state["scheduler"]["num_steps"] == 3 and state["adam_step"] == 3
    assert "hidden_size: 64" in state["config"]
    assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (runs["root"] / "dp2" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert checkpoint_cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "complete         True" in out and "step             3" in out and "'dp': 2" in out


def test_damaged_files_are_named(runs: dict, tmp_path: Path) -> None:
    good = runs["root"] / "dp2" / "checkpoints" / "step_00000003"
    check_files(good)
    shard = tmp_path / "truncated"
    shutil.copytree(good, shard)
    victim = sorted(shard.glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(IncompleteCheckpointError, match=f"shard {victim} is truncated"):
        check_files(shard)
    verify_checksums(good)
    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    victim = flip_a_weight_byte(flipped)
    check_files(flipped)  # same sizes: only the checksums tell
    with pytest.raises(CorruptShardError, match=f"shard {victim} is corrupt: the record of .* fails its checksum"):
        verify_checksums(flipped)
    assert checkpoint_cli.main(["inspect", str(flipped)]) == 0
    assert checkpoint_cli.main(["inspect", "--checksums", str(flipped)]) == 1
    assert checkpoint_cli.main(["inspect", "--checksums", str(good)]) == 0
    no_index = tmp_path / "no_index"
    shutil.copytree(good, no_index)
    (no_index / ".metadata").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"\.metadata is missing"):
        check_files(no_index)
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    (evil / ".metadata").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")  # os.system('echo owned')
    with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
        check_files(evil)


def test_other_model_shape_or_vocabulary_is_refused(runs: dict) -> None:
    path = runs["root"] / "dp2" / "checkpoints" / "step_00000003"
    with pytest.raises(CheckpointMismatchError, match=r"'vocab_size': \(151936, 152064\)"):
        check_shape(path, replace(_DENSE, vocab_size=152064))
    with pytest.raises(CheckpointMismatchError, match=r"'hidden_size': \(64, 128\)"):
        check_shape(path, get_preset("tiny"))


def test_resume_falls_back_past_a_damaged_newest_checkpoint(runs: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "fallback"
    shutil.copytree(runs["root"] / "dp2" / "checkpoints", run_dir / "checkpoints")
    store = CheckpointStore(run_dir / "checkpoints")
    newest = store.latest()
    assert newest is not None and newest.name == "step_00000006"
    victim = flip_a_weight_byte(newest)  # bit rot: the size is intact, only the checksums notice
    check_files(newest)
    (run_dir / "checkpoints" / ".step_00000009.partial").mkdir()  # an interrupted save
    cfg = _cfg(tmp_path, "fallback", 6, ParallelLayout(), save_at_end=False)
    (losses,) = spawn(train_configs, 1, [cfg])[0]
    assert losses == pytest.approx(runs["ref"][3:], abs=RESHARD_TOL)  # resumed at step 3 again
    strict = replace(cfg, checkpoint=replace(cfg.checkpoint, fallback=False))
    no_index = tmp_path / "no_index"  # loaded as weights only: the error keeps its own class
    shutil.copytree(store.path(3), no_index)
    (no_index / ".metadata").unlink()
    weights = _cfg(tmp_path, "weights", 1, ParallelLayout(), save_at_end=False)
    weights = replace(weights, train=replace(weights.train, init_from=str(no_index)))
    message, missing = spawn(train_configs, 1, [strict, weights])[0]
    assert isinstance(message, str) and "cannot resume from" in message
    assert f"shard {victim} is corrupt" in message and "fails its checksum" in message, message
    assert isinstance(missing, str) and missing.startswith("IncompleteCheckpointError: ") and ".metadata" in missing, missing


def test_retention_keeps_last_k_and_every_mth(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in range(1, 11):
        store.prepare(step)
        (store.partial_path(step) / "train_state.json").write_text("{}")
        store.publish(step)
        for old in store.retire(keep_last=2, keep_every=4):
            assert old in store.listing().incomplete  # unpublished at once, deleted afterwards
            remove_tree(old)
    assert [p.name for p in store.listing().complete] == ["step_00000004", "step_00000008", "step_00000009", "step_00000010"]
    assert not store.listing().incomplete
    assert store.latest().name == "step_00000010"


def test_saving_starts_no_program_of_its_own(tmp_path: Path) -> None:
    """megatron-core serves its shard writers' results queue from a helper process, started at the
    first save with 'spawn' unless the manager forked it first: a spawned helper imports the whole
    program again (9 s of the first save here) and keeps it loaded beside every rank."""
    cfg = _cfg(tmp_path, "run", 1, ParallelLayout())  # saves at the end
    forked = spawn(train_and_list_helpers, 1, [cfg])[0]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()
    assert forked and all(forked), forked  # the helper exists, and is a fork of the rank


def test_package_versions_of_a_source_tree() -> None:
    """A package used from a source tree (PYTHONPATH, no pip install) has no metadata; the
    checkpoint description records that instead of failing the save (seen on a GPU machine)."""
    import torch

    from qwen2_megatron.checkpoint.model_checkpoint import package_versions

    versions = package_versions(("torch", "qwen2-megatron-not-installed"))
    assert torch.__version__.startswith(versions["torch"])
    assert "not installed" in versions["qwen2-megatron-not-installed"]
