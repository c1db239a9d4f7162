"""FlatAdamW (optim.flat_adam) in one process: torch's fused AdamW update on flat runs of a gradient
buffer laid out as megatron's DDP lays out its own (parameters one after another, with padding),
its state conventions, and clear errors for layouts it cannot step. The trainer-level checks (every
megatron optimizer, exact resume) are in test_perf_levers.py and test_checkpoint.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from qwen2_megatron.train.flat_adam import MAX_GAP, MOVES_IN_A_ROW, FlatAdamError, FlatAdamW, use_flat_adam

SHAPES = [(48, 32), (32,), (64, 48), (64,), (16, 16)]
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _buffer(params: list[torch.Tensor], gaps: list[int]) -> list[torch.Tensor]:
    """Gradients as views of one flat buffer, parameter after parameter with `gaps` elements of
    padding after each (megatron DDP's layout)."""
    buffer = torch.zeros(sum(p.numel() for p in params) + sum(gaps), dtype=params[0].dtype)
    views, offset = [], 0
    for param, gap in zip(params, gaps):
        views.append(buffer[offset:offset + param.numel()].view(param.shape))
        offset += param.numel() + gap
    return views


def _groups(params: list[torch.Tensor]) -> list[dict]:
    """megatron's default groups: weight decay for matrices, none (and another lr) for vectors."""
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1, **HYPER},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, **HYPER, "lr": 3e-3}]


def _flat(params: list[torch.Tensor]) -> FlatAdamW:
    groups = [{**g, "amsgrad": False, "maximize": False} for g in _groups(params)]
    return FlatAdamW(groups, **HYPER)


def _set_grads(params: list[torch.Tensor], views: list[torch.Tensor] | None, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, param in enumerate(params):
        grad = torch.randn(param.shape, generator=gen).to(param.dtype)
        if views is None:
            param.grad = grad
        else:
            views[i].copy_(grad)
            param.grad = views[i]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], views: list[torch.Tensor] | None,
           steps: range) -> None:
    for step in steps:
        _set_grads(params, views, step)
        if step == 1:  # a clipping factor, as guarded_step hands it over
            optimizer.grad_scale = torch.tensor(1.7)
        optimizer.step()
        optimizer.__dict__.pop("grad_scale", None)


@pytest.mark.parametrize("dtype, tol, moments_tol", [(torch.float32, 2e-6, 1e-6), (torch.bfloat16, 0.0, 4e-3)])
def test_matches_torchs_fused_adamw(dtype: torch.dtype, tol: float, moments_tol: float) -> None:
    """Weights, moments and step counts after 4 steps (two groups with different learning rates and
    weight decay, padding between gradients, a clipping factor on one step) are torch's fused
    AdamW's up to rounding (bf16 moments: where the two roundings of fp32 arithmetic in another
    order differ, by a unit in the last place of the moments' magnitude); bf16 weights round to
    the same values."""
    flat_params, torch_params = _params(dtype), _params(dtype)
    views = _buffer(flat_params, gaps=[0, 8, 64, 0, 16])
    flat = _flat(flat_params)
    reference = torch.optim.AdamW(_groups(torch_params), **HYPER, fused=True)
    _train(flat, flat_params, views, range(4))
    _train(reference, torch_params, None, range(4))
    for mine, theirs in zip(flat_params, torch_params):
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(flat.state[mine][key], reference.state[theirs][key], rtol=2e-6, atol=moments_tol)
        assert flat.state[mine]["step"].item() == reference.state[theirs]["step"].item() == 4
    # what it steps now lives in one flat buffer laid out like the gradients
    storage = {p.untyped_storage().data_ptr() for p in flat_params}
    assert len(storage) == 1
    offsets = [p.storage_offset() for p in flat_params]
    assert offsets == [v.storage_offset() for v in views]


def test_skipped_step_changes_nothing() -> None:
    """found_inf = 1 (a non-finite gradient norm): weights, moments and step counts stay bit for bit."""
    params = _params(torch.float32)
    views = _buffer(params, gaps=[0] * len(SHAPES))
    flat = _flat(params)
    _train(flat, params, views, range(2))
    before = copy.deepcopy(flat.state_dict()), [p.detach().clone() for p in params]
    _set_grads(params, views, 7)
    flat.found_inf = torch.tensor(1.0)
    flat.step()
    after = flat.state_dict()
    for param, old in zip(params, before[1]):
        assert torch.equal(param, old)
    for index, state in before[0]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key


def test_loaded_state_continues_bit_for_bit() -> None:
    """A state loaded with load_state_dict (new tensors, not the flat views) moves into new flat
    buffers at the next step, and the run goes on exactly as an uninterrupted one."""
    whole, halves = _params(torch.float32), _params(torch.float32)
    whole_opt = _flat(whole)
    _train(whole_opt, whole, _buffer(whole, [4] * len(SHAPES)), range(4))

    first = _flat(halves)
    _train(first, halves, _buffer(halves, [4] * len(SHAPES)), range(2))
    saved = copy.deepcopy(first.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in halves]
    resumed = _flat(resumed_params)
    resumed.load_state_dict(saved)
    _train(resumed, resumed_params, _buffer(resumed_params, [4] * len(SHAPES)), range(2, 4))
    for a, b in zip(whole, resumed_params):
        assert torch.equal(a, b)
        assert torch.equal(whole_opt.state[a]["exp_avg_sq"], resumed.state[b]["exp_avg_sq"])


def test_far_apart_gradients_make_separate_runs() -> None:
    """Gradients further apart than MAX_GAP (another data-parallel rank's shard between them) are
    stepped as separate runs: no flat buffer spans the gap."""
    params = _params(torch.float32)
    views = _buffer(params, gaps=[0, MAX_GAP + 1, 0, 0, 0])
    flat = _flat(params)
    _train(flat, params, views, range(1))
    storages = [p.untyped_storage().data_ptr() for p in params]
    assert storages[0] == storages[1] != storages[2] == storages[3] == storages[4]
    assert sum(p.untyped_storage().nbytes() for p in {id(p): p for p in params[:2]}.values()) < MAX_GAP


def test_layouts_it_cannot_step_are_refused() -> None:
    params = _params(torch.float32)
    views = _buffer(params, gaps=[0] * len(SHAPES))
    flat = _flat(params)
    _set_grads(params, views, 0)
    params[2].grad = None
    with pytest.raises(FlatAdamError, match=r"shape \(64, 48\) has no gradient"):
        flat.step()
    params[2].grad = views[1].new_zeros(64 * 48)[: 64 * 48].view(48, 64).t()  # not contiguous
    with pytest.raises(FlatAdamError, match="contiguous"):
        flat.step()
    overlapping = _buffer(params, gaps=[0] * len(SHAPES))
    for param, view in zip(params, overlapping):
        param.grad = view
    params[1].grad = overlapping[0].view(-1)[:32]  # the first gradient's elements again
    with pytest.raises(FlatAdamError, match="overlap"):
        flat.step()


def test_parameters_at_other_step_counts_get_their_own_bias_correction() -> None:
    """A state whose parameters have different step counts (a group added later; a state loaded so)
    is stepped as torch's fused AdamW steps it, each parameter with its own count."""
    flat_params, torch_params = _params(torch.float32), _params(torch.float32)
    views = _buffer(flat_params, gaps=[0] * len(SHAPES))
    flat = _flat(flat_params)
    reference = torch.optim.AdamW(_groups(torch_params), **HYPER, fused=True)
    _train(flat, flat_params, views, range(1))
    _train(reference, torch_params, None, range(1))
    state = flat.state_dict()
    state["state"][0]["step"] = torch.tensor(5.0)
    flat.load_state_dict(state)
    reference.state[torch_params[0]]["step"].fill_(5.0)
    _train(flat, flat_params, views, range(1, 3))
    _train(reference, torch_params, None, range(1, 3))
    for mine, theirs in zip(flat_params, torch_params):
        torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=2e-6)
    assert [flat.state[p]["step"].item() for p in flat_params] == [7.0, 3.0, 3.0, 3.0, 3.0]


def test_only_torchs_adamw_is_replaced() -> None:
    """Transformer Engine's or apex's FusedAdam (not a torch AdamW) is named, not replaced."""
    params = _params(torch.float32)
    other = SimpleNamespace(optimizer=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(FlatAdamError, match="torch.optim.sgd.SGD.*optim.flat_adam=false"):
        use_flat_adam(other)
    inner = SimpleNamespace(optimizer=torch.optim.AdamW(_groups(params), **HYPER))
    use_flat_adam(inner)
    assert isinstance(inner.optimizer, FlatAdamW)
    assert [g["weight_decay"] for g in inner.optimizer.param_groups] == [0.1, 0.0]


def test_a_parameter_group_added_later_is_stepped() -> None:
    params = _params(torch.float32)
    views = _buffer(params, gaps=[0] * len(SHAPES))
    flat = _flat(params[:3])
    _train(flat, params[:3], views[:3], range(1))
    flat.add_param_group({"params": params[3:], "weight_decay": 0.0, "amsgrad": False, "maximize": False, **HYPER})
    before = [p.detach().clone() for p in params]
    _set_grads(params, views, 1)
    flat.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert flat.state[params[4]]["step"].item() == 1 and flat.state[params[0]]["step"].item() == 2


def test_gradients_that_move_every_step_are_refused() -> None:
    """Gradients copied anew before every step (not DDP's buffers) would make FlatAdamW copy
    everything every step: after MOVES_IN_A_ROW such steps it stops with the setting to change."""
    params = _params(torch.float32)
    flat = _flat(params)
    for step in range(MOVES_IN_A_ROW):
        _train(flat, params, _buffer(params, [0] * len(SHAPES)), range(step, step + 1))
    with pytest.raises(FlatAdamError, match="moved before each of the last 3 steps.*optim.flat_adam=false"):
        _train(flat, params, _buffer(params, [0] * len(SHAPES)), range(3, 4))
    flat = _flat(params)  # once moved (a load), then in place: fine
    views = _buffer(params, [0] * len(SHAPES))
    _train(flat, params, _buffer(params, [0] * len(SHAPES)), range(2))
    _train(flat, params, views, range(2, 8))
