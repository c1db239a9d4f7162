"""Qwen2Shape reads and writes Hugging Face config.json the way transformers does."""

from __future__ import annotations

import pytest

from qwen2_megatron.model.presets import PRESETS, get_preset
from qwen2_megatron.model.shape import Qwen2Shape, ShapeError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip_through_transformers(name: str) -> None:
    from transformers import AutoConfig

    shape = get_preset(name)
    config = AutoConfig.for_model(**shape.to_hf_config())
    assert Qwen2Shape.from_hf_config(config.to_dict()) == shape


def test_moe_layer_pattern_follows_transformers() -> None:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    import torch

    shape = get_preset("tiny_moe")
    shape.decoder_sparse_step, shape.mlp_only_layers = 2, [3]
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{
            k: v for k, v in shape.to_hf_config().items() if k not in ("architectures", "model_type")
        }))
    actual = [isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in model.model.layers]
    assert actual == shape.moe_layer_pattern() == [False, True, False, False]


def test_other_architectures_are_refused() -> None:
    with pytest.raises(ShapeError, match="not a Qwen2 model: model_type='llama'"):
        Qwen2Shape.from_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 5}, "not a multiple of model.num_key_value_heads=5"),
        ({"hidden_size": 0}, "model.hidden_size=0"),
        ({"num_experts": 8, "num_experts_per_tok": 9, "moe_intermediate_size": 8,
          "shared_expert_intermediate_size": 8}, "num_experts_per_tok=9"),
        ({"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 8}, "shared_expert_intermediate_size"),
    ],
)
def test_impossible_shapes_are_refused(change: dict, message: str) -> None:
    fields = get_preset("tiny").to_dict() | change
    with pytest.raises(ShapeError, match=message):
        Qwen2Shape(**fields)


def test_missing_config_field_is_named() -> None:
    config = get_preset("tiny").to_hf_config()
    del config["intermediate_size"]
    with pytest.raises(ShapeError, match="lacks the required field 'intermediate_size'"):
        Qwen2Shape.from_hf_config(config)
