"""Parameter counts by arithmetic equal the Qwen2 report and transformers' own models."""

from __future__ import annotations

import pytest
import torch

from qwen2_megatron.model.params import count_parameters, rank_memory
from qwen2_megatron.model.presets import PRESETS, get_preset
from qwen2_megatron.parallel.layout import ParallelLayout

# Qwen2 Technical Report, total parameters (billions, 2 decimals). The report lists 7.07B for
# Qwen2-7B, but its own shape (hidden 3584, FFN 18944, 28 layers, untied 152064 vocabulary)
# has 7.62B parameters, which transformers agrees with (checked below): the shape wins.
REPORT_TOTAL = {"qwen2_0.5b": 0.49, "qwen2_1.5b": 1.54, "qwen2_7b": 7.62, "qwen2_72b": 72.71, "qwen2_57b_a14b": 57.41}
REPORT_NON_EMBEDDING = {"qwen2_1.5b": 1.31, "qwen2_72b": 70.21, "qwen2_57b_a14b": 56.32}


@pytest.mark.parametrize("name", REPORT_TOTAL)
def test_preset_totals_match_report(name: str) -> None:
    assert round(count_parameters(get_preset(name)).total / 1e9, 2) == REPORT_TOTAL[name]


@pytest.mark.parametrize("name", REPORT_NON_EMBEDDING)
def test_preset_non_embedding_match_report(name: str) -> None:
    assert round(count_parameters(get_preset(name)).non_embedding / 1e9, 2) == REPORT_NON_EMBEDDING[name]


def test_moe_active_parameters_are_14b() -> None:
    assert round(count_parameters(get_preset("qwen2_57b_a14b")).active / 1e9) == 14


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_equals_transformers_model_on_meta_device(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = get_preset(name)
    config = AutoConfig.for_model(**shape.to_hf_config())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(shape).total


def test_rank_memory_splits_by_layout() -> None:
    shape = get_preset("qwen2_7b")
    whole = rank_memory(shape, ParallelLayout().resolve(1))
    assert whole.params == count_parameters(shape).total
    tp2 = rank_memory(shape, ParallelLayout(tp=2).resolve(2))
    norms = shape.num_hidden_layers * 2 * shape.hidden_size + shape.hidden_size
    assert tp2.params == (whole.params - norms) // 2 + norms
    # bf16 weights, fp32 grads, and Adam m, v + fp32 master weights split over 8 DP ranks
    dp8 = rank_memory(shape, ParallelLayout().resolve(8))
    assert dp8.weight_bytes == 2 * whole.params and dp8.grad_bytes == 4 * whole.params
    assert dp8.optimizer_bytes == 12 * whole.params // 8
    # pure bf16 (optim.fp32_master_weights=false, no distributed optimizer): bf16 grads, m and v
    pure = rank_memory(shape, ParallelLayout().resolve(8), 2, distributed_optimizer=False, fp32_master_weights=False)
    assert (pure.weight_bytes, pure.grad_bytes, pure.optimizer_bytes) == (2 * whole.params, 2 * whole.params,
                                                                         4 * whole.params)
