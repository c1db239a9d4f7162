"""The shape of a Qwen2 or Qwen2-MoE model, and its translation to and from Hugging Face config.json.

One dataclass describes every model this framework builds: the presets, the tiny CPU models and any
custom shape. It is a plain (Hydra structured-config friendly) dataclass whose field names follow
Hugging Face's Qwen2Config, so a user reading a released config.json recognises every knob.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

QWEN2_ARCH = "Qwen2ForCausalLM"
QWEN2_MOE_ARCH = "Qwen2MoeForCausalLM"
_MODEL_TYPES = {QWEN2_ARCH: "qwen2", QWEN2_MOE_ARCH: "qwen2_moe"}


class ShapeError(ValueError):
    """A model shape that no Qwen2 model can have (or that this framework cannot build)."""


@dataclass
class Qwen2Shape:
    """Model hyper-parameters; num_experts > 0 makes it a Qwen2-MoE model."""

    hidden_size: int
    intermediate_size: int  # FFN size of the dense layers (all layers of a dense model)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # padded embedding rows, as in config.json
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as in HF
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    # Mixture of experts (Qwen2-MoE); zero experts means a dense Qwen2.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def architecture(self) -> str:
        return QWEN2_MOE_ARCH if self.is_moe else QWEN2_ARCH

    def moe_layer_pattern(self) -> list[bool]:
        """Which layers are MoE layers, by Hugging Face Qwen2-MoE's rule."""
        return [
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        ]

    def validate(self) -> None:
        positive = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ShapeError(f"model.{name}={value!r}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ShapeError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}: grouped-query attention "
                f"needs whole groups; use a divisor of {self.num_attention_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ShapeError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim explicitly"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ShapeError("model.rms_norm_eps and model.rope_theta must be positive")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ShapeError(
                    f"model.num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"1..model.num_experts={self.num_experts}"
                )
            if self.moe_intermediate_size <= 0:
                raise ShapeError("model.moe_intermediate_size must be positive for an MoE model")
            if self.shared_expert_intermediate_size <= 0:
                raise ShapeError(
                    "model.shared_expert_intermediate_size must be positive: every Qwen2-MoE "
                    "layer has a gated shared expert"
                )
            if self.decoder_sparse_step <= 0:
                raise ShapeError("model.decoder_sparse_step must be positive")
            if not any(self.moe_layer_pattern()):
                raise ShapeError(
                    "no layer is an MoE layer (check model.decoder_sparse_step and "
                    "model.mlp_only_layers), so set model.num_experts=0 for a dense model"
                )

    # ----- Hugging Face config.json -----------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "Qwen2Shape":
        """Read a Qwen2 / Qwen2-MoE config.json dict; any other architecture is an error."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in _MODEL_TYPES.values() and not set(archs) & set(_MODEL_TYPES):
            raise ShapeError(
                f"not a Qwen2 model: model_type={model_type!r}, architectures={archs}; "
                f"qwen2-megatron converts {QWEN2_ARCH} and {QWEN2_MOE_ARCH} checkpoints only"
            )
        if cfg.get("use_sliding_window"):
            raise ShapeError("sliding-window attention (use_sliding_window=true) is not supported")
        is_moe = model_type == "qwen2_moe" or QWEN2_MOE_ARCH in archs
        if is_moe and not cfg.get("qkv_bias", True):
            raise ShapeError("Qwen2-MoE with qkv_bias=false is not supported")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling")
        if (rope.get("rope_type") or "default") != "default" or scaling:
            raise ShapeError(
                f"RoPE scaling {rope or scaling} is not supported for pre-training; "
                "remove it from config.json (it is an inference-time extension)"
            )
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        try:
            return cls(
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=kv,
                vocab_size=cfg["vocab_size"],
                head_dim=cfg.get("head_dim"),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                initializer_range=cfg.get("initializer_range", 0.02),
                num_experts=cfg.get("num_experts", 0) if is_moe else 0,
                num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if is_moe else 0,
                moe_intermediate_size=cfg.get("moe_intermediate_size", 0) if is_moe else 0,
                shared_expert_intermediate_size=(
                    cfg.get("shared_expert_intermediate_size", 0) if is_moe else 0
                ),
                norm_topk_prob=cfg.get("norm_topk_prob", False),
                decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
                mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
                router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001),
            )
        except KeyError as missing:
            raise ShapeError(f"config.json lacks the required field {missing}") from None

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers' AutoConfig reads back to this shape."""
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "dtype": dtype,
        }
        if self.head_dim is not None:
            cfg["head_dim"] = self.head_dim
        if self.is_moe:
            cfg.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                qkv_bias=True,
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """The smallest size >= vocab_size that shards evenly over `tensor_parallel` ranks."""
    step = multiple * tensor_parallel
    return math.ceil(vocab_size / step) * step
