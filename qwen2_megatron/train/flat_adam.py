"""AdamW as one compiled element-wise pass over each contiguous run of megatron's gradient buffers.

torch's fused AdamW (and TE's or apex's FusedAdam) walks lists of tensors with multi_tensor_apply:
run J's 7B-8L profile has torch's at 20.9 ms per step for 2.95 B bf16 parameters, about 47 GB
moved at 2.3 TB/s, where inductor's element-wise kernels on the same H200 reach 4.4 TB/s.
megatron's DDP already keeps every gradient in contiguous buffers. FlatAdamW moves what it steps
(pure bf16: the model's weights; with master weights: megatron's fp32 copies or shards of them)
and Adam's two moments into flat buffers laid out like those gradients, so that one kernel per
contiguous run of gradients (of parameters with the same step count), compiled by torch.compile,
reads each gradient, weight and moment once and writes weight and moments once. Parameter groups
(learning rate, weight decay) reach the kernel as a one-byte group index per element where a run
spans several groups. The update is torch's fused AdamW's; as there, the clipping factor
(grad_scale) and the skip decision (found_inf) are device tensors, but the unscaled gradients are
not written back. With fp32 weights that are views of the model's (fp32 training with the
distributed optimizer) the flat copy is stepped and megatron copies it back, as it copies its
fp32 master copies in bf16 training: 4 bytes per parameter and data-parallel rank more.

The layout is checked at every step (weights, gradients, moments and step counts where it put
them, no parameter added). When something moved them (a checkpoint load replaces the moments,
megatron re-points gradients), it is rebuilt from the tensors as they are, so the optimizer state
is never lost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Elements between two gradients of one run at most (megatron pads parameters and buckets by
# far less); a larger gap (another data-parallel rank's shard) starts a new run.
MAX_GAP = 1 << 16
_GROUPS_PER_RUN = 256  # the group index is one byte
MOVES_IN_A_ROW = 3  # steps in a row that find the layout moved before FlatAdamW gives up


class FlatAdamError(RuntimeError):
    """The parameters' gradients are not laid out as FlatAdamW needs (megatron DDP's buffers)."""


@dataclass
class _Entry:
    """A parameter while the runs are laid out."""

    grad: torch.Tensor
    param: torch.Tensor
    group: int  # index of its parameter group
    step: float  # Adam steps so far


@dataclass
class _Member:
    param: torch.Tensor
    offset: int  # first element in the run's flat tensors
    grad_ptr: int
    exp_avg: torch.Tensor  # the tensors held in the optimizer state
    exp_avg_sq: torch.Tensor
    step: torch.Tensor


@dataclass
class _Run:
    members: list[_Member]
    grad: torch.Tensor  # the run's span of the gradient buffer (read only)
    weight: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    group: int | None  # the one parameter group of the run, else group_index per element
    group_index: torch.Tensor | None

    def in_place(self, state: dict) -> bool:
        """Whether weights, gradients, moments and step counts are still where the layout put them."""
        size = self.weight.element_size()
        base = self.weight.data_ptr()
        for m in self.members:
            grad = m.param.grad
            s = state.get(m.param)
            if (grad is None or grad.data_ptr() != m.grad_ptr or m.param.data_ptr() != base + m.offset * size
                    or s is None or s.get("exp_avg") is not m.exp_avg or s.get("exp_avg_sq") is not m.exp_avg_sq
                    or s.get("step") is not m.step):
                return False
        return True


def adamw_update(
    weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    settings: torch.Tensor, group_index: torch.Tensor | None, step: torch.Tensor, grad_scale: torch.Tensor,
    found_inf: torch.Tensor, beta1: float, beta2: float, eps: float,
) -> None:
    """torch's fused AdamW arithmetic (fp32) on flat tensors, in place. settings holds (learning
    rate, weight decay) per parameter group, [groups, 2], looked up through group_index per
    element, or [2] for all elements; step counts this update; nothing changes where found_inf
    is nonzero."""
    if group_index is None:
        lr, weight_decay = settings[0], settings[1]
    else:  # a select per group (unrolled: few groups) vectorises where a gather would not
        lr, weight_decay = settings[0, 0], settings[0, 1]
        for group in range(1, settings.shape[0]):
            chosen = group_index == group
            lr = torch.where(chosen, settings[group, 0], lr)
            weight_decay = torch.where(chosen, settings[group, 1], weight_decay)
    g = grad.float() / grad_scale
    p = weight.float()
    p = p - lr * weight_decay * p
    m = beta1 * exp_avg.float() + (g - beta1 * g)
    v = beta2 * exp_avg_sq.float() + (g * g - beta2 * (g * g))
    bias1 = 1 - torch.pow(beta1, step)
    bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
    p = p - (lr / bias1) * m / (torch.sqrt(v) / bias2_sqrt + eps)
    skip = found_inf != 0
    weight.copy_(torch.where(skip, weight, p.to(weight.dtype)))
    exp_avg.copy_(torch.where(skip, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v.to(exp_avg_sq.dtype)))


@functools.cache
def _kernel() -> Callable[..., None]:
    """adamw_update compiled once per process (dynamic sizes: one kernel for all runs)."""
    return torch.compile(adamw_update, dynamic=True, fullgraph=True)


class FlatAdamW(torch.optim.AdamW):
    """torch's AdamW (its parameter groups, state and checkpoint form, with the fused form's fp32
    device step counts) stepping flat runs of megatron's gradient buffers; see the module."""

    def __init__(self, param_groups: list[dict[str, Any]], **defaults: Any) -> None:
        """Takes param_groups as they are, as megatron's optimizers hand theirs to torch's AdamW
        (after construction: their parameters may be views, which torch's checks refuse)."""
        super().__init__([torch.zeros(1, requires_grad=True)], **defaults)
        self.param_groups = param_groups
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise FlatAdamError("FlatAdamW implements AdamW without amsgrad or maximize")
            group.update(fused=True, foreach=False)  # the state's conventions (device step counts)
        self._runs: list[_Run] | None = None
        self._rebuilds_in_a_row = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise FlatAdamError("FlatAdamW takes no closure")
        runs = self._current_runs()
        if not runs:
            return
        device = runs[0].weight.device
        settings = self._settings(device)
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        one = torch.ones((), dtype=torch.float32, device=device)
        found_inf = torch.zeros_like(one) if found_inf is None else found_inf.to(device, torch.float32).reshape(())
        grad_scale = one if grad_scale is None else grad_scale.to(device, torch.float32).reshape(())
        kernel = _kernel()
        beta1, beta2 = self.param_groups[0]["betas"]  # one (betas, eps) for all groups (_build_runs)
        eps = self.param_groups[0]["eps"]
        for run in runs:
            steps = [m.step for m in run.members]
            torch._foreach_add_(steps, 1)
            torch._foreach_sub_(steps, [found_inf] * len(steps))
            table = settings if run.group is None else settings[run.group]
            kernel(run.weight, run.grad, run.exp_avg, run.exp_avg_sq, table, run.group_index, steps[0], grad_scale,
                   found_inf, float(beta1), float(beta2), float(eps))

    def _settings(self, device: torch.device) -> torch.Tensor:
        """[groups, 2]: each group's learning rate and weight decay on the device, copied without
        making the host wait for the device."""
        table = torch.tensor([[float(g["lr"]), float(g["weight_decay"])] for g in self.param_groups],
                             dtype=torch.float32, pin_memory=device.type == "cuda")
        return table.to(device, non_blocking=True)

    def _current_runs(self) -> list[_Run]:
        params = sum(len(group["params"]) for group in self.param_groups)
        if (self._runs is not None and params == sum(len(run.members) for run in self._runs)
                and all(run.in_place(self.state) for run in self._runs)):
            self._rebuilds_in_a_row = 0
            return self._runs
        self._rebuilds_in_a_row += 1
        if self._rebuilds_in_a_row > MOVES_IN_A_ROW:
            raise FlatAdamError(f"the gradients or weights moved before each of the last {MOVES_IN_A_ROW} steps, so "
                                "FlatAdamW copied everything each time: it needs gradients that stay in megatron "
                                "DDP's buffers (fp32 master weights with fp32 gradients); set optim.flat_adam=false")
        self._runs = self._build_runs()
        return self._runs

    def _build_runs(self) -> list[_Run]:
        betas = {(tuple(g["betas"]), g["eps"]) for g in self.param_groups}
        if len(betas) > 1:
            raise FlatAdamError(f"FlatAdamW needs one (betas, eps) for all parameter groups, got {sorted(betas)}")
        params = [(param, index) for index, group in enumerate(self.param_groups) for param in group["params"]]
        steps = self._steps(params)
        entries = [_Entry(_grad_of(param), param, index, step) for (param, index), step in zip(params, steps)]
        entries.sort(key=lambda e: (e.grad.untyped_storage().data_ptr(), str(e.grad.dtype), str(e.param.dtype),
                                    e.grad.storage_offset()))
        runs: list[list[_Entry]] = []
        for entry in entries:
            if runs and _continues(runs[-1][-1], entry):
                runs[-1].append(entry)
            else:
                runs.append([entry])
        return [self._flatten(run) for run in runs]

    def _steps(self, params: list[tuple[torch.Tensor, int]]) -> list[float]:
        """Each parameter's Adam step count so far (0 without state), read with one synchronisation."""
        counts = [self.state[param].get("step") if param in self.state else None for param, _ in params]
        known = [torch.as_tensor(c, dtype=torch.float32).to(p.device).reshape(())
                 for c, (p, _) in zip(counts, params) if c is not None]
        values = iter(torch.stack(known).tolist() if known else [])
        return [0.0 if c is None else next(values) for c in counts]

    def _flatten(self, run: list[_Entry]) -> _Run:
        """Move the run's weights and moments into flat tensors laid out like its gradients."""
        start = run[0].grad.storage_offset()
        numel = run[-1].grad.storage_offset() + run[-1].grad.numel() - start
        device, dtype = run[0].param.device, run[0].param.dtype
        grad = run[0].grad.as_strided((numel,), (1,), start)
        weight = torch.zeros(numel, dtype=dtype, device=device)
        exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
        groups = sorted({entry.group for entry in run})
        group_index = None
        if len(groups) > 1:
            if groups[-1] >= _GROUPS_PER_RUN:
                raise FlatAdamError(f"FlatAdamW supports up to {_GROUPS_PER_RUN} parameter groups")
            group_index = torch.empty(numel, dtype=torch.uint8, device=device)
        members = []
        for entry in run:
            param = entry.param
            offset = entry.grad.storage_offset() - start
            span = slice(offset, offset + param.numel())
            weight[span].copy_(param.detach().reshape(-1))
            param.data = weight[span].view(param.shape)
            state = self.state[param]
            for key, flat in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if key in state:
                    flat[span].copy_(state[key].reshape(-1))
                state[key] = flat[span].view(param.shape)
            state["step"] = torch.full((), entry.step, dtype=torch.float32, device=device)
            members.append(_Member(param, offset, entry.grad.data_ptr(), state["exp_avg"], state["exp_avg_sq"],
                                   state["step"]))
        if group_index is not None:
            # each parameter's group up to the next parameter: the gaps between them (zero weights,
            # gradients and moments, which stay zero) take the group of the one before
            ends = [m.offset for m in members[1:]] + [numel]
            for entry, m, end in zip(run, members, ends):
                group_index[m.offset:end].fill_(entry.group)
        return _Run(members, grad, weight, exp_avg, exp_avg_sq, None if group_index is not None else groups[0],
                    group_index)


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    if grad is None:
        raise FlatAdamError(f"FlatAdamW steps every parameter it holds, and one of shape {tuple(param.shape)} has no "
                            "gradient (megatron's optimizers give each one its main_grad)")
    if grad.shape != param.shape or not grad.is_contiguous():
        raise FlatAdamError(f"FlatAdamW needs each gradient to be a contiguous tensor of its parameter's shape "
                            f"{tuple(param.shape)}, got {tuple(grad.shape)} (megatron DDP's gradient buffers)")
    return grad


def _continues(previous: _Entry, entry: _Entry) -> bool:
    """Whether entry's gradient follows previous's in the same buffer, close enough for one run, and
    both have the same step count (one bias correction per run)."""
    if (entry.grad.untyped_storage().data_ptr() != previous.grad.untyped_storage().data_ptr()
            or entry.grad.dtype != previous.grad.dtype or entry.param.dtype != previous.param.dtype
            or entry.param.device != previous.param.device or entry.step != previous.step):
        return False
    gap = entry.grad.storage_offset() - (previous.grad.storage_offset() + previous.grad.numel())
    if gap < 0:
        raise FlatAdamError(f"two parameters' gradients overlap in one buffer (shapes {tuple(previous.param.shape)} "
                            f"and {tuple(entry.param.shape)}): FlatAdamW would apply both updates to the same elements")
    return gap <= MAX_GAP


def use_flat_adam(inner: Any) -> None:
    """Replace the torch AdamW inside one megatron optimizer by a FlatAdamW on its parameter groups
    (before any step: state is created flat on the first one)."""
    adam = inner.optimizer
    if not isinstance(adam, torch.optim.AdamW) or isinstance(adam, FlatAdamW):
        raise FlatAdamError(f"optim.flat_adam replaces torch's AdamW, but megatron-core chose {type(adam).__module__}."
                            f"{type(adam).__name__} (Transformer Engine's or apex's FusedAdam): set optim.flat_adam=false")
    if adam.state:
        raise FlatAdamError("optim.flat_adam must replace the AdamW before its first step")
    defaults = {key: adam.defaults[key] for key in ("lr", "betas", "eps", "weight_decay")}
    inner.optimizer = FlatAdamW(adam.param_groups, **defaults)
