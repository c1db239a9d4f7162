"""The distributed optimizer's parallel checkpoint format (checkpoint/optimizer_shards.py).

Its box decomposition is checked against index arithmetic, and what it writes against megatron's
own fully_reshardable format: saved from the same trained optimizer, both checkpoints must hold
the same global tensors, bit for bit (read back by PyTorch's own DCP reader, without megatron).
Loading it in other layouts is covered by tests/test_checkpoint.py's resharded resumes.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from qwen2_megatron.checkpoint.optimizer_shards import boxes
from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.parallel.local_launch import spawn
from tests.optimizer_shards_workers import save_both_formats


def test_boxes_cover_exactly_the_range_in_order() -> None:
    rng = random.Random(0)
    for _ in range(400):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        numel = math.prod(shape)
        start = rng.randint(0, numel - 1)
        stop = rng.randint(start + 1, numel)
        index = torch.arange(numel).view(shape)
        covered = []
        for offset, size, flat in boxes(shape, start, stop):
            region = index[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1)
            assert region.tolist() == list(range(flat, flat + region.numel())), (shape, start, stop)
            covered += region.tolist()
        assert covered == list(range(start, stop)), (shape, start, stop)
        assert len(boxes(shape, start, stop)) <= 2 * len(shape) - 1


def test_whole_tensor_is_one_box() -> None:
    assert boxes((6, 4, 3), 0, 72) == [((0, 0, 0), (6, 4, 3), 0)]
    assert boxes((6, 4), 8, 16) == [((2, 0), (2, 4), 8)]
    assert boxes((6, 4), 5, 5) == []


def _tensors(directory: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(directory, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if k.startswith("optimizer.state.")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    dense = replace(get_preset("tiny"), hidden_size=64, intermediate_size=96, vocab_size=1000)
    moe = replace(get_preset("tiny_moe"), hidden_size=64, intermediate_size=96, vocab_size=1000,
                  moe_intermediate_size=32, shared_expert_intermediate_size=64)
    cases = [
        ("dp2", dense, {}, "fp32", {}),
        ("dp2_bf16", dense, {}, "bf16", {}),
        ("tp2_sp", dense, {"tp": 2, "sequence_parallel": True}, "fp32", {}),
        ("moe_ep2", moe, {"ep": 2}, "bf16", {}),
        # grouped experts: fc1 [experts, gate+up, hidden], its gate/up pieces cut each box across rows
        ("moe_grouped_dp2", moe, {}, "fp32", {"moe_grouped_gemm": True}),
    ]
    assert spawn(save_both_formats, 2, str(root), cases)[0] == [c[0] for c in cases]
    return root


@pytest.mark.parametrize("case", ["dp2", "dp2_bf16", "tp2_sp", "moe_ep2", "moe_grouped_dp2"])
def test_same_tensors_as_megatrons_fully_reshardable_format(saved: Path, case: str) -> None:
    ours = _tensors(saved / case / "ours", saved / case / "ours.pt")
    theirs = _tensors(saved / case / "megatron", saved / case / "megatron.pt")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert {k.split(".")[2] for k in ours} == {"param", "exp_avg", "exp_avg_sq"}
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
