"""train/multi_tensor.py: torch's foreach kernels compute what megatron-core's per-tensor fallbacks
compute, and are installed only where megatron uses those fallbacks (CPU, no processes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer

from qwen2_megatron.train.multi_tensor import foreach_l2_norm, foreach_scale, foreach_scale_tensor, use_foreach_kernels


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 5), (128, 64), (1,), (3, 4, 5)]
    return [torch.randn(shape, generator=gen).mul(10.0 ** i).to(dtype) for i, shape in enumerate(shapes)]


@pytest.fixture
def restored() -> Iterator[None]:
    """Whatever kernels megatron had before the test, back after it."""
    saved = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, mcore_optimizer.multi_tensor_scale_impl,
             clip_grads.multi_tensor_scale_tensor_impl)
    yield
    (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, mcore_optimizer.multi_tensor_scale_impl,
     clip_grads.multi_tensor_scale_tensor_impl) = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_norm_is_the_norm_of_all_elements(dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    norm, per_tensor = foreach_l2_norm(2048, torch.zeros(1, dtype=torch.int), [tensors], False)
    exact = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert abs(norm.item() - exact.item()) <= 1e-6 * exact.item()
    # megatron's fallback for fp32 gradients: a norm per tensor, then the norm of those
    fallback = torch.stack([t.float().norm() for t in tensors]).norm()
    assert abs(norm.item() - fallback.item()) <= 1e-6 * exact.item()


def test_l2_norm_refuses_per_tensor_norms() -> None:
    with pytest.raises(NotImplementedError, match="per-tensor"):
        foreach_l2_norm(2048, torch.zeros(1), [_tensors(torch.float32)], True)


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("in_place", [True, False])
def test_scale_matches_megatrons_fallback(scale: float, in_place: bool) -> None:
    sources = _tensors(torch.float32)
    expected = [t.clone() for t in (sources if in_place else _tensors(torch.bfloat16))]
    mcore_utils.local_multi_tensor_scale(2048, None, [sources, expected], scale)
    targets = [t.clone() for t in sources] if in_place else _tensors(torch.bfloat16)
    foreach_scale(2048, None, [targets if in_place else sources, targets], scale)
    for got, want in zip(targets, expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [True, False])
def test_scale_by_a_device_factor_is_the_scale_by_its_value(in_place: bool) -> None:
    sources = _tensors(torch.float32)
    expected = [t.clone() for t in sources] if in_place else _tensors(torch.bfloat16)
    foreach_scale(2048, None, [expected if in_place else sources, expected], 0.37)
    targets = [t.clone() for t in sources] if in_place else _tensors(torch.bfloat16)
    foreach_scale_tensor(2048, None, [targets if in_place else sources, targets], torch.tensor([0.37]))
    for got, want in zip(targets, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_installed_only_over_megatrons_fallbacks(restored: None) -> None:
    clip_grads.l2_norm_impl = mcore_utils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = mcore_optimizer.multi_tensor_scale_impl = mcore_utils.local_multi_tensor_scale
    clip_grads.multi_tensor_scale_tensor_impl = None  # megatron without TE
    assert use_foreach_kernels(True)
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale and mcore_optimizer.multi_tensor_scale_impl is foreach_scale
    assert clip_grads.multi_tensor_scale_tensor_impl is foreach_scale_tensor
    assert use_foreach_kernels(False)  # optim.foreach_kernels=false: megatron's own fallbacks again
    assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm
    assert mcore_optimizer.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale
    assert clip_grads.multi_tensor_scale_tensor_impl is None

    def accelerator_kernel(*args: object) -> None:  # stands for TE's or apex's multi-tensor kernel
        raise AssertionError("not called")

    clip_grads.l2_norm_impl = clip_grads.multi_tensor_scale_impl = accelerator_kernel
    mcore_optimizer.multi_tensor_scale_impl = clip_grads.multi_tensor_scale_tensor_impl = accelerator_kernel  # TE
    assert not use_foreach_kernels(True)
    assert clip_grads.l2_norm_impl is accelerator_kernel and mcore_optimizer.multi_tensor_scale_impl is accelerator_kernel
    assert clip_grads.multi_tensor_scale_tensor_impl is accelerator_kernel
