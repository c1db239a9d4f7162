"""The distributed optimizer's state in model space, written and read by every rank in parallel.

megatron-core 0.19 offers the distributed optimizer two checkpoint formats that still work:
"dp_reshardable" (parallel, but its tensors are the optimizer's internal buckets, so only DP may
change) and "fully_reshardable" (one tensor per parameter, so any layout may change, but saving
gathers every DP rank's state onto every rank and DP rank 0 writes all of it: measured 19 of 29 s
of a save on CPU). Its parallel model-space format ("fully_sharded_model_space") fails, as 0.19
dropped the flattened-range shards it is made of.

Each DP rank owns a contiguous range of every gradient bucket, hence a contiguous range of each
parameter's flattened (TP/EP-local) tensor. A contiguous range of a row-major tensor is a union of
a few boxes (a partial row, whole rows, a partial row; recursively for more dimensions), cut again
where megatron builds a parameter's checkpoint tensors from pieces of it (the SwiGLU gate and up
halves of fc1), and each box is a megatron ShardedTensor of the parameter's global tensor with
uneven sharding, which megatron hands to PyTorch's distributed checkpoint as is. The boxes' data
are views of the optimizer's own state: saving sends nothing between ranks, every rank writes only
its own state, and loading reads exactly the boxes of the new layout's ranges out of whatever
boxes were saved, so TP, PP, EP and DP may all change. The tensors are those of megatron's
"fully_reshardable" format
(optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>, the parameter's global shape).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from qwen2_megatron.train.optimizer import inner_optimizers

Box = tuple[tuple[int, ...], tuple[int, ...], int]


def boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The flat range [start, stop) of a row-major tensor of `shape` as boxes: (offset, size, flat
    start of the box), in order. Each box is itself a contiguous flat range."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,), start)] if shape else [((), (), 0)]
    row = math.prod(shape[1:])
    first_full, end_full = -(-start // row), stop // row  # whole rows: [first_full, end_full)

    def in_row(r: int, lo: int, hi: int) -> list[Box]:
        return [((r, *off), (1, *size), flat + r * row) for off, size, flat in boxes(shape[1:], lo, hi)]

    if first_full > end_full:  # inside one row
        r = start // row
        return in_row(r, start - r * row, stop - r * row)
    out = in_row(first_full - 1, start - (first_full - 1) * row, row) if start < first_full * row else []
    if first_full < end_full:
        out.append(((first_full, *(0,) * (len(shape) - 1)), (end_full - first_full, *shape[1:]), first_full * row))
    if end_full * row < stop:
        out += in_row(end_full, 0, stop - end_full * row)
    return out


def sharded_optimizer_state(optimizer: Any, model_state: dict[str, Any], is_loading: bool) -> dict[str, Any]:
    """The optimizer part of a checkpoint's sharded state dict (no communication). Optimizers
    without the distributed one keep their state per parameter already; megatron's own format."""
    metadata = _model_metadata(model_state)
    state = {}
    for index, inner in enumerate(inner_optimizers(optimizer)):
        if isinstance(inner, DistributedOptimizer):
            param_state = [[box for box, _ in entries] for entries in _box_state(inner, metadata)]
            state[str(index)] = {"common": inner.state_dict(), "param_state": param_state}
        else:
            state[str(index)] = inner.sharded_state_dict(model_state, is_loading)  # model space already
    return state


def restore_optimizer_state(optimizer: Any, model_state: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Puts a loaded `sharded_optimizer_state` into the optimizer (`model_state`: the model's
    sharded state dict, as given to `sharded_optimizer_state`)."""
    metadata = _model_metadata(model_state)
    for index, inner in enumerate(inner_optimizers(optimizer)):
        part = loaded[str(index)]
        if not isinstance(inner, DistributedOptimizer):
            inner.load_state_dict(part)
            continue
        inner.load_state_dict(part["common"])  # param groups and, without apex/TE, Adam's step
        # The boxes were read into views of the state; copy only where megatron handed back others.
        for want, got in zip(_box_state(inner, metadata), part["param_state"], strict=True):
            for (_, view), data in zip(want, got, strict=True):
                if data.data_ptr() != view.data_ptr():
                    view.copy_(data.reshape(view.shape))


def _model_metadata(model_state: dict[str, Any]) -> dict[torch.Tensor, Any]:
    tensors, _ = extract_sharded_tensors_and_factories(model_state)
    return {sh.data: sh for sh in nested_values(tensors)}


def _states(inner: DistributedOptimizer, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """This rank's flat range of the fp32 main parameter and of each optimizer state."""
    return {k: t for k, t in inner._get_main_param_and_optimizer_states(param).items() if k != "step"}


Boxed = list[list[tuple[ShardedTensor, torch.Tensor]]]


def _box_state(inner: DistributedOptimizer, metadata: dict[torch.Tensor, Any]) -> Boxed:
    """Per local parameter, in the distributed optimizer's order, the boxes of all its states,
    each with the view of the state it stands for (its data is that view, or a contiguous copy
    of it where a piece cuts a box across its rows)."""
    state = []
    for param, ranges in _param_ranges(inner):
        start = ranges["param"].start
        regions = boxes(tuple(param.shape), start, ranges["param"].end)
        pieces = _pieces(metadata[param])
        entries = []
        for key, flat in _states(inner, param).items():
            for offset, size, flat_start in regions:
                block = flat[flat_start - start : flat_start - start + math.prod(size)].view(size)
                for piece, piece_offset in pieces:
                    lo = [max(a, b) for a, b in zip(offset, piece_offset)]
                    hi = [min(a + n, b + m) for a, n, b, m in zip(offset, size, piece_offset, piece.local_shape)]
                    if any(low >= high for low, high in zip(lo, hi)):
                        continue
                    view = block[tuple(slice(low - a, high - a) for low, high, a in zip(lo, hi, offset))]
                    within = tuple(low - b for low, b in zip(lo, piece_offset))
                    box = _box_tensor(piece, key, view.contiguous(), within, inner.distributed_optimizer_instance_id)
                    entries.append((box, view))
        state.append(entries)
    return state


def _param_ranges(inner: DistributedOptimizer) -> Iterator[tuple[torch.nn.Parameter, dict[str, Any]]]:
    for gbuf_range_maps in inner.gbuf_ranges:
        for bucket_maps in gbuf_range_maps.values():
            for bucket_map in bucket_maps:
                yield from bucket_map["param_map"].items()


def _pieces(meta: Any) -> list[tuple[ShardedTensor, tuple[int, ...]]]:
    """The model parameter's ShardedTensor(s), each with its offset in the parameter's local
    tensor. A factory (SwiGLU's fused fc1 halves, grouped experts) is built over a meta tensor of
    the parameter's shape, so that each piece it builds tells by its storage offset where it lies."""
    if not isinstance(meta, ShardedTensorFactory):
        return [(meta, (0,) * meta.data.dim())]
    base = torch.empty(meta.data.shape, device="meta", dtype=meta.data.dtype)
    built = [sh for sh in nested_values(replace(meta, data=base).build()) if isinstance(sh, ShardedTensor)]
    pieces = []
    for sh in built:
        if sh.data._base is not base or sh.data.stride() != base.stride():
            raise NotImplementedError(
                f"{meta.key}: megatron's sharded-state factory builds pieces of this parameter that are "
                "not sub-blocks of it; its optimizer state cannot be saved in boxes"
            )
        offset, rest = [], sh.data.storage_offset()
        for stride in base.stride():
            offset.append(rest // stride)
            rest %= stride
        pieces.append((sh, tuple(offset)))
    return pieces
def _box_tensor(
    piece: ShardedTensor, key: str, data: torch.Tensor, offset: tuple[int, ...], instance: int
) -> ShardedTensor:
    """A box of the piece's tensor; axes the piece prepends (an expert's index) become leading
    axes of size 1, as megatron's uneven-sharding path has no prepended axes."""
    if len(piece.replica_id) != 3:
        raise NotImplementedError(f"{piece.key}: replica id {piece.replica_id} is not (PP, TP, DP)")
    prepend = piece.global_offset[: piece.prepend_axis_num]
    inner = piece.global_offset[piece.prepend_axis_num :]
    data = data.view((1,) * len(prepend) + tuple(data.shape))
    return ShardedTensor(
        key=f"optimizer.state.{key}.{piece.key}",
        data=data,
        dtype=data.dtype,
        local_shape=tuple(data.shape),
        global_shape=piece.global_shape,
        global_offset=(*prepend, *(a + b for a, b in zip(inner, offset))),
        axis_fragmentations=None,
        replica_id=(*piece.replica_id[:2], instance),  # the DP ranks' boxes are disjoint
    )
