"""What a decoder layer keeps for its backward (bf16, CPU): the value heads alone instead of the
fused QKV output, and, with train.activation_memory_budget below 1, compiled layers recompute their
element-wise results (normalised inputs, SwiGLU output) in backward, computing the same gradients."""

from __future__ import annotations

import pytest
import torch

from qwen2_megatron.parallel.local_launch import spawn
from tests.activation_workers import FFN, GROUPS, HEADS, HIDDEN, TOKENS, activations_rank

BF16 = 2
QKV_BYTES = TOKENS * (HIDDEN + 2 * GROUPS * HIDDEN // HEADS) * BF16
VARIANTS = {"eager": ("none", 1.0), "compiled": ("layers", 1.0), "compiled_budget": ("layers", 0.9)}


@pytest.fixture(scope="module")
def layers() -> dict:
    return spawn(activations_rank, 1, VARIANTS)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_keeps_the_value_heads_not_the_fused_qkv_output(layers: dict, variant: str) -> None:
    saved = layers[variant]["saved"]
    print(f"{variant}: saved storages (bytes, shape) {saved}")
    assert QKV_BYTES not in [nbytes for nbytes, _ in saved]
    value = (1, GROUPS, TOKENS, HIDDEN // HEADS)  # [b, groups, s, d], as attention takes it
    assert (TOKENS * GROUPS * (HIDDEN // HEADS) * BF16, value) in saved  # over memory of its own


def test_budget_recomputes_the_elementwise_results_for_the_same_gradients(layers: dict) -> None:
    full, low = layers["compiled"], layers["compiled_budget"]
    full_bytes, low_bytes = ([nbytes for nbytes, _ in v["saved"]] for v in (full, low))
    print(f"saved bytes per token: compiled {sum(full_bytes) / TOKENS}, budget 0.9 {sum(low_bytes) / TOKENS}")
    # the SwiGLU output [T, FFN] and the two normalised inputs [T, HIDDEN] are no longer kept
    assert sum(full_bytes) - sum(low_bytes) == TOKENS * (FFN + 2 * HIDDEN) * BF16
    assert TOKENS * FFN * BF16 in full_bytes and TOKENS * FFN * BF16 not in low_bytes
    assert torch.equal(full["out"], low["out"])
    for name, grad in full["grads"].items():
        torch.testing.assert_close(low["grads"][name], grad, rtol=0, atol=0, msg=name)
