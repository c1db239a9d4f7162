"""RoPE from cos/sin tables (model/rope.py) against megatron-core's unfused RoPE, eager and compiled (CPU)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from torch._inductor.utils import run_and_get_code

from qwen2_megatron.model.rope import rotate_with_tables

S, B, HQ, HK, D = 12, 2, 6, 2, 16


def _inputs(dtype: torch.dtype, rot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query and key as megatron splits them from the fused QKV output (non-contiguous views), and
    freqs [s, 1, 1, rot] as its RotaryEmbedding makes them (angles up to s - 1 radians)."""
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(S, B, (HQ + 2 * HK) * D, generator=gen).to(dtype)
    query = mixed[..., : HQ * D].view(S, B, HQ, D)
    key = mixed[..., HQ * D : (HQ + HK) * D].view(S, B, HK, D)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(S).float(), inv)
    return query, key, torch.cat([angles, angles], -1)[:, None, None, :]


def _megatron(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs)


def _values_and_grads(fn, query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> list[torch.Tensor]:
    q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
    out = fn(q, k, freqs)
    gen = torch.Generator().manual_seed(1)
    torch.autograd.backward(out, [torch.randn(t.shape, generator=gen).to(t.dtype) for t in out])
    return [*out, q.grad, k.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [D, D // 2])  # whole head dimension, and a partial rotary dimension
def test_tables_compute_megatron_rope_exactly(dtype: torch.dtype, rot: int) -> None:
    query, key, freqs = _inputs(dtype, rot)
    ours = _values_and_grads(rotate_with_tables, query, key, freqs)
    theirs = _values_and_grads(_megatron, query, key, freqs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_compiled_rotation_reads_the_tables_instead_of_evaluating_cos_and_sin() -> None:
    """Compiled, megatron's RoPE evaluates cos and sin inside the fused rotation kernel (for every
    element of query and key); with the tables the generated code has neither, and computes the same."""
    query, key, freqs = _inputs(torch.float32, D)
    eager = _values_and_grads(rotate_with_tables, query, key, freqs)
    for fn, evaluates in ((rotate_with_tables, False), (_megatron, True)):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        got, code = run_and_get_code(_values_and_grads, compiled, query, key, freqs)
        kernels = "\n".join(code)
        assert (".cos()" in kernels or "std::cos" in kernels) is evaluates
        assert (".sin()" in kernels or "std::sin" in kernels) is evaluates
        assert ("qwen2_megatron.rope_tables" in kernels) is not evaluates
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
