"""Reading Hugging Face Qwen2 checkpoints into megatron model chunks, and gathering them back out.

Tensors are read one at a time from the safetensors files (sharded or not) and copied into this
rank's parameter shard; nothing holds a second full copy of the model. The reverse direction
gathers each parameter over its tensor-parallel group onto one rank, which then owns the HF
tensors it produced; every (pipeline stage, expert shard) is owned by exactly one rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from qwen2_megatron.convert.mapping import ParamMapping, hf_tensor_shapes, param_mappings, to_hf, to_megatron
from qwen2_megatron.model.shape import Qwen2Shape

SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointFormatError(ValueError):
    """A checkpoint directory that is missing files or holds tensors of the wrong shape."""


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus safetensors (single file or sharded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointFormatError(
                f"{config_file} not found: a Hugging Face model directory needs config.json "
                "and model.safetensors (or model-*.safetensors with model.safetensors.index.json)"
            )
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointFormatError(f"{config_file} is not valid JSON: {err}") from None
        self.shape = Qwen2Shape.from_hf_config(self.config)
        self._handles: dict[str, Any] = {}
        self._files = self._weight_files()

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        if name not in _DTYPE_NAMES:
            raise CheckpointFormatError(f"{self.path}/config.json: unsupported dtype {name!r}")
        return _DTYPE_NAMES[name]

    def _weight_files(self) -> dict[str, str]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in self.path.iterdir())
            raise CheckpointFormatError(
                f"{self.path} holds no model.safetensors or {SAFETENSORS_INDEX} (found {found}); "
                "PyTorch .bin checkpoints are not read (they unpickle code): convert them with "
                "transformers' save_pretrained(safe_serialization=True)"
            )
        for name in set(weight_map.values()):
            if not (self.path / name).is_file():
                raise CheckpointFormatError(f"{self.path / name} (listed in {SAFETENSORS_INDEX}) is missing")
        expected = hf_tensor_shapes(self.shape)
        missing = [n for n in expected if n not in weight_map]
        if missing:
            raise CheckpointFormatError(
                f"{self.path} lacks {len(missing)} tensors that config.json implies, e.g. "
                f"{missing[:3]}; is the checkpoint complete and does config.json belong to it?"
            )
        for name, dims in expected.items():
            found = tuple(self._handle(weight_map[name]).get_slice(name).get_shape())
            if found != dims:
                raise CheckpointFormatError(
                    f"{self.path / weight_map[name]}: tensor {name} has shape {found} but "
                    f"config.json implies {dims}; the weights and config.json disagree"
                )
        return weight_map

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, "pt")
        return self._handles[file]

    def get(self, name: str) -> Tensor:
        return self._handle(self._files[name]).get_tensor(name)


def load_hf_weights(chunks: list[torch.nn.Module], ckpt: HFCheckpoint) -> None:
    """Fill this rank's parameters of every model chunk from a Hugging Face checkpoint."""
    for chunk in chunks:
        for m in param_mappings(chunk, ckpt.shape):
            local = to_megatron(m, [ckpt.get(n) for n in m.hf_names], ckpt.shape)
            with torch.no_grad():
                m.local(m.param).copy_(local)


def gather_hf_state(
    chunks: list[torch.nn.Module], shape: Qwen2Shape, grads: bool = False
) -> dict[str, Tensor]:
    """HF-named tensors (weights, or gradients with grads=True) owned by this rank.

    A collective: every rank of the job must call it. Returns an empty dict on ranks that own
    nothing (TP ranks > 0 and data-parallel replicas).
    """
    owned: dict[str, Tensor] = {}
    dense_owner = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_owner = parallel_state.get_expert_data_parallel_rank() == 0
    for chunk in chunks:
        for m in param_mappings(chunk, shape):
            if m.name == "output_layer.weight" and shape.tie_word_embeddings:
                continue  # HF stores a tied output layer once, as the embedding
            local = _local_value(m, grads)
            shards = _gather_tp(local, m)
            if m.tp_rank == 0 and (expert_owner if m.expert else dense_owner):
                owned.update(zip(m.hf_names, (t.contiguous() for t in to_hf(m, shards, shape))))
    return owned


def _local_value(m: ParamMapping, grads: bool) -> Tensor:
    if not grads:
        return m.local(m.param.detach())
    grad = getattr(m.param, "main_grad", None)
    grad = m.param.grad if grad is None else grad
    return m.local(torch.zeros_like(m.param) if grad is None else grad.detach())


def _gather_tp(local: Tensor, m: ParamMapping) -> list[Tensor]:
    if m.tp_size == 1 or m.kind == "replicated":
        return [local]
    group = (
        parallel_state.get_expert_tensor_parallel_group()
        if m.expert
        else parallel_state.get_tensor_model_parallel_group()
    )
    shards = [torch.empty_like(local) for _ in range(m.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return shards


def write_hf_shards(owned: dict[str, Tensor], out: Path, shape: Qwen2Shape, dtype: torch.dtype) -> None:
    """Collective: each owning rank writes one safetensors shard; rank 0 writes config and index."""
    names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(names, sorted(owned))
    writers = [rank for rank, keys in enumerate(names) if keys]
    files = {rank: f"model-{i + 1:05d}-of-{len(writers):05d}.safetensors" for i, rank in enumerate(writers)}
    rank = dist.get_rank()
    if owned:
        save_file({k: v.to(dtype) for k, v in owned.items()}, out / files[rank], metadata={"format": "pt"})
    sizes: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, sum(v.numel() * v.element_size() for v in owned.values()))
    if rank == 0:
        weight_map = {key: files[r] for r in writers for key in names[r]}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        dtype_name = {v: k for k, v in _DTYPE_NAMES.items()}[dtype]
        (out / "config.json").write_text(json.dumps(shape.to_hf_config(dtype_name), indent=2) + "\n")
    dist.barrier()
