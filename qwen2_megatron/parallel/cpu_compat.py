"""Run megatron-core 0.19.2 on CPU over the gloo backend.

megatron-core assumes a CUDA device in places that no TransformerConfig or
DistributedDataParallelConfig flag avoids. On a machine without a GPU, ``enable()``
covers each of them; with a GPU it does nothing. Call it before
``torch.distributed.init_process_group(backend="gloo")``,
``parallel_state.initialize_model_parallel(...)`` and
``tensor_parallel.model_parallel_cuda_manual_seed(seed)``.

CUDA assumptions covered, and why:

1. ``torch.cuda.current_device()`` used as a tensor device: rotary embedding
   (``RotaryEmbedding``), DDP grad/param buffers (``_ParamAndGradBuffer``), pipeline
   p2p shape/tensor buffers, the MoE router and all-to-all output buffers, the
   distributed optimizer, dist_checkpointing's failure broadcast. The shim returns
   the CPU device.
2. The CUDA RNG states tracker in ``tensor_parallel.random``: attention forks it even
   with dropout 0, and ``model_parallel_cuda_manual_seed`` must work (it seeds the
   tracker with ``torch.cuda.get_rng_state``). The tracker's named states become CPU
   generator states, forked on the CPU default generator; activation recompute
   (``CheckpointFunction``) saves/restores the "CUDA" state as the CPU state.
3. ``torch.cuda.synchronize()`` in pipeline p2p and dist_checkpointing saves/loads:
   a no-op, CPU work is synchronous.
4. Hard-coded ``device="cuda"`` tensors and ``.cuda()`` calls: the token counter in
   the pipeline schedules (every schedule, PP=1 included); the norm/zero-count
   buffers in grad clipping (``clip_grads``); the scale/flag buffers of the FP32,
   mixed-precision and distributed optimizers; the default causal mask used when
   ``attention_mask`` is None; the tied-embedding all-reduce with PP > 1;
   ``tensor_parallel.broadcast_data``; the fully-parallel checkpoint load exchange;
   the distributed optimizer's gather of its state for fully-reshardable checkpoints.
   Inside those functions they are built on / kept on CPU.
5. ``torch.cuda.Stream``/``current_stream`` (and the event a stream records): DDP's
   grad sync waits on the current stream; the MoE all-to-all dispatcher creates a
   side stream, copies split sizes on it and synchronizes on its event. CPU
   stand-ins whose operations are no-ops.
6. MoE all-to-all split sizes left as tensors: the dispatcher turns them into numpy
   arrays only when they live on a GPU, and gloo's ``all_to_all_single`` needs
   sequences of ints. CPU tensors are converted the same way.
7. ``tensor.type() == 'torch.cuda.FloatTensor'`` (and Half/BFloat16) checks in grad
   clipping, the mixed-precision optimizer and the distributed optimizer: inside
   those functions CPU tensors report the CUDA type name.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch.overrides import TorchFunctionMode

_F = TypeVar("_F", bound=Callable[..., Any])
_CPU = torch.device("cpu")
_active = False


def is_active() -> bool:
    """True once ``enable()`` has applied the CPU patches."""
    return _active


def enable() -> bool:
    """Apply the CPU patches if no GPU is available (idempotent); return ``is_active()``."""
    global _active
    if _active or torch.cuda.is_available():
        return _active
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_cuda_literals()
    _patch_moe_alltoall_splits()
    _active = True
    return True


# --- 1, 3, 5: torch.cuda shim (each replaced call raises without a GPU) ---------------


class _SyncStream:
    """Stands for a ``torch.cuda.Stream`` and the events it records: CPU work is
    synchronous, so waiting, recording and synchronizing are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def wait_stream(self, stream: Any) -> None: ...

    def wait_event(self, event: Any) -> None: ...

    def record_event(self, event: Any = None) -> _SyncStream:
        return self

    def synchronize(self) -> None: ...


def _current_device() -> torch.device:
    # rotary embedding, DDP buffers, p2p, MoE router/all-to-all, dist_checkpointing
    return _CPU


def _synchronize(device: Any = None) -> None:
    # pipeline p2p_communication, dist_checkpointing saves and loads
    return None


def _current_stream(device: Any = None) -> _SyncStream:
    # DDP start_grad_sync, MoE all-to-all dispatcher
    return _SyncStream()


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize
    torch.cuda.current_stream = _current_stream
    torch.cuda.Stream = _SyncStream  # type: ignore[misc, assignment]


# --- 2: RNG states tracker backed by the CPU generator --------------------------------


def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # tensor_parallel.random._get_cuda_rng_state (CheckpointFunction, tracker)
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = None, graph_safe: bool = False) -> None:
    # tensor_parallel.random._set_cuda_rng_state (CheckpointFunction, tracker)
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        """megatron's RNG tracker with its named states held as CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            # model_parallel_cuda_manual_seed: seeds each named state
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            # attention/dropout and GPU-style weight init fork the named state; on CPU the
            # base class's "CPU RNG state changed" check would fire on every dropout
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    random.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    if random._CUDA_RNG_STATE_TRACKER_INITIALIZED and not isinstance(
        random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker
    ):
        random.initialize_rng_tracker(force_reset=True)


# --- 4, 7: device="cuda" literals and tensor.type() checks ----------------------------


def _is_cuda(device: Any) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CudaAsCpu(TorchFunctionMode):
    """Inside megatron code written for CUDA tensors: ``device="cuda"`` builds CPU
    tensors, ``Tensor.cuda()`` keeps them on CPU, and ``Tensor.type()`` names CPU
    tensors as their CUDA type."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


def _under_cuda_as_cpu(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaAsCpu():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _wrap(owner: Any, name: str) -> None:
    """Run the function or method ``owner.name`` under ``_CudaAsCpu``."""
    setattr(owner, name, _under_cuda_as_cpu(getattr(owner, name)))


class _TorchWithCpuZeros(types.ModuleType):
    """``torch`` as the pipeline schedules see it: ``torch.zeros(device="cuda")`` is CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return torch.zeros(*args, **kwargs)


def _patch_cuda_literals() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.strategies import fully_parallel
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import data

    # schedules: total_num_tokens = torch.zeros([], device="cuda") in every schedule
    schedules.torch = _TorchWithCpuZeros("torch")
    # clip_grads: device='cuda' buffers, param.grad.type() == 'torch.cuda.FloatTensor';
    # megatron.core.optimizer.optimizer imports the three functions by name
    for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
        _wrap(clip_grads, name)
        _wrap(optimizer, name)
    for owner, name in (
        # default causal / sliding-window masks (attention_mask=None): device="cuda"
        (fused_softmax, "get_default_causal_mask"),
        (fused_softmax, "get_sliding_window_causal_mask"),
        # tied embeddings with PP > 1: weight.data.cuda() before the embedding all-reduce
        (LanguageModule, "setup_embeddings_and_output_layer"),
        # FP32Optimizer._scale and the grad-norm-group flag: device='cuda'
        (optimizer.FP32Optimizer, "__init__"),
        (optimizer.MegatronOptimizer, "has_grad_norm_group"),
        # the two MixedPrecisionOptimizer subclasses: its found_inf/_scale_one on
        # device='cuda'; their param.type() in ['torch.cuda.HalfTensor', ...] checks
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        # distributed-optimizer checkpoints (fully_reshardable, dp_zero): send_tensor.cuda()
        (distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero"),
        # broadcast_data (TP batch broadcast): device='cuda' sizes, data[key].cuda()
        (data, "broadcast_data"),
        (tensor_parallel, "broadcast_data"),
        # fully-parallel checkpoint load: exchange buffers on device="cuda" / .cuda()
        (fully_parallel, "exchange_by_distribution"),
    ):
        _wrap(owner, name)


# --- 6: MoE all-to-all split sizes as int sequences -----------------------------------


def _patch_moe_alltoall_splits() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        # MoEAlltoAllTokenDispatcher: split sizes must reach gloo's all_to_all_single as ints
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
