"""Checks a checkpoint's files before anything loads them, so loading never executes its code.

torch.distributed.checkpoint reads the `.metadata` index with an unrestricted pickle.load. Here
that file is first unpickled with an allow-list of the classes torch writes there (anything else,
such as a callable smuggled into a crafted file, is refused), and the index is then used to
check that every shard file exists and is long enough: truncated and missing files are found
before any rank starts a collective load that would otherwise fail on one rank and hang others.
Other files are JSON or are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from qwen2_megatron.checkpoint.location import Location
from qwen2_megatron.checkpoint.store import TRAIN_STATE

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_ALLOWED_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would run code or reference unexpected classes when loaded."""


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint with missing or truncated files."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed = (
            (module, name) in _ALLOWED
            or (module, name) in _ALLOWED_NAMES
            or module in _ALLOWED_MODULES
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return super().find_class(module, name)


def read_index(path: Location) -> Any:
    """The torch_dist index of a checkpoint, unpickled with the allow-list."""
    index = path / ".metadata"
    if not index.is_file():
        raise IncompleteCheckpointError(f"{index} is missing: {path} is not a complete torch_dist checkpoint")
    try:
        return _IndexUnpickler(io.BytesIO(index.read_bytes())).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"{index} references {err}, which a torch_dist index never holds; refusing to load it "
            "(it could run code): was the checkpoint tampered with?"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise IncompleteCheckpointError(f"{index} is corrupt ({err})") from None


def check_files(path: Location, training: bool = True) -> None:
    """Raise if a file the checkpoint needs is missing, truncated or unsafe to unpickle."""
    needed = ["metadata.json", "qwen2_megatron.json"] + ([TRAIN_STATE] if training else [])
    for name in needed:
        if not (path / name).is_file():
            raise IncompleteCheckpointError(f"{path / name} is missing")
    ends: dict[str, int] = {}
    for info in read_index(path).storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            raise IncompleteCheckpointError(f"shard {shard} is missing")
        size = shard.stat().st_size
        if size < end:
            raise IncompleteCheckpointError(
                f"shard {shard} is truncated: {size} bytes, the index needs {end}"
            )
