"""Shared fixtures: small random Hugging Face Qwen2 / Qwen2-MoE models saved as safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def save_random_hf(path: Path, moe: bool, seed: int = 0, **overrides) -> Path:
    """A randomly initialised transformers Qwen2(-MoE) model with awkward small dimensions."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=384, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6, initializer_range=0.1,
    )
    if moe:
        moe_defaults = dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, tie_word_embeddings=False,
        )
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common | moe_defaults | overrides))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common | {"tie_word_embeddings": True} | overrides))
    with torch.no_grad():  # non-trivial norm weights and biases, so a mix-up cannot hide
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return path


def flip_a_weight_byte(checkpoint: Path) -> Path:
    """Invert one byte in the middle of the largest tensor record of a torch_dist checkpoint (its
    data, which the record's checksum covers, not zip padding); returns the shard file."""
    from qwen2_megatron.checkpoint.validate import read_index

    info = max(read_index(checkpoint).storage_data.values(), key=lambda i: i.length)
    shard = checkpoint / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0xFF
    shard.write_bytes(data)
    return shard


@pytest.fixture(scope="session")
def hf_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hf(tmp_path_factory.mktemp("hf") / "dense", moe=False)


@pytest.fixture(scope="session")
def hf_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hf(tmp_path_factory.mktemp("hf") / "moe", moe=True)
