"""Invalid layouts fail in validation, before any process group or model memory exists."""

from __future__ import annotations

import pytest

from qwen2_megatron.model.presets import get_preset
from qwen2_megatron.parallel.layout import LayoutError, ParallelLayout


def _check(layout: ParallelLayout, world: int, model: str = "qwen2_7b", seq: int | None = 4096) -> ParallelLayout:
    resolved = layout.resolve(world)
    resolved.check_model(get_preset(model), seq_length=seq)
    return resolved


@pytest.mark.parametrize(
    "layout, world, model, seq, message",
    [
        (ParallelLayout(tp=2, pp=2), 6, "qwen2_7b", 4096, "world size 6 is not divisible by tp*pp*cp"),
        (ParallelLayout(tp=2, dp=4), 4, "qwen2_7b", 4096, "parallel.dp=4 but world size 4"),
        (ParallelLayout(tp=8), 8, "qwen2_7b", 4096, "valid tp: [1, 2, 4]"),
        (ParallelLayout(tp=4), 4, "qwen2_0.5b", 4096, "valid tp: [1, 2]"),
        (ParallelLayout(pp=5), 5, "qwen2_0.5b", 4096, "num_hidden_layers=24 is not divisible by pp=5"),
        (ParallelLayout(pp=2, vpp=5), 2, "qwen2_7b", 4096, "pp*vpp = 2*5 = 10 pipeline stages"),
        (ParallelLayout(vpp=2), 1, "qwen2_7b", 4096, "needs pp > 1"),
        (ParallelLayout(ep=3), 3, "qwen2_57b_a14b", 4096, "ep=3 must divide model.num_experts=64"),
        (ParallelLayout(ep=2), 2, "qwen2_7b", 4096, "the model is dense"),
        (ParallelLayout(ep=4), 2, "qwen2_57b_a14b", 4096, "must divide tp*cp*dp = 2"),
        (ParallelLayout(tp=2, ep=2), 4, "qwen2_57b_a14b", 4096, "needs sequence parallelism"),
        (ParallelLayout(sequence_parallel=True), 1, "qwen2_7b", 4096, "needs tensor parallelism"),
        (ParallelLayout(tp=2, sequence_parallel=True), 2, "qwen2_7b", 4095, "divisible by tp=2"),
        (ParallelLayout(cp=2), 2, "qwen2_7b", 4096, "needs Transformer Engine"),
        (ParallelLayout(), 1, "qwen2_7b", 65536, "exceeds model.max_position_embeddings"),
        (ParallelLayout(tp=0), 1, "qwen2_7b", 4096, "parallel.tp=0"),
    ],
)
def test_invalid_layout_is_rejected_with_its_values(layout, world, model, seq, message) -> None:
    with pytest.raises(LayoutError) as err:
        _check(layout, world, model, seq)
    assert message in str(err.value)


def test_vocab_not_divisible_by_tp_suggests_padding() -> None:
    shape = get_preset("qwen2_72b")
    shape.vocab_size = 151646  # the unpadded tokenizer size
    with pytest.raises(LayoutError, match="pad the vocabulary to 152064"):
        ParallelLayout(tp=4).resolve(4).check_model(shape)


@pytest.mark.parametrize(
    "layout, world, model, dp",
    [
        (ParallelLayout(tp=8, pp=4), 64, "qwen2_72b", 2),
        (ParallelLayout(tp=2, pp=2, vpp=7), 8, "qwen2_7b", 2),
        (ParallelLayout(tp=2, ep=4, sequence_parallel=True), 16, "qwen2_57b_a14b", 8),
        (ParallelLayout(tp=2, ep=2, etp=1, sequence_parallel=True), 2, "qwen2_57b_a14b", 1),
        (ParallelLayout(), 8, "qwen2_1.5b", 8),
    ],
)
def test_public_layouts_resolve(layout, world, model, dp) -> None:
    assert _check(layout, world, model).dp == dp


def test_min_world_size_covers_expert_parallel() -> None:
    assert ParallelLayout(tp=2, pp=2).min_world_size() == 4
    assert ParallelLayout(ep=4).min_world_size() == 4
    assert ParallelLayout(tp=2, ep=2, etp=1).min_world_size() == 2
    assert ParallelLayout(tp=2, ep=4).min_world_size() == 8
