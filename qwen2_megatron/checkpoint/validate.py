"""Checks a checkpoint's files before anything loads them, so loading never executes its code.

torch.distributed.checkpoint reads the `.metadata` index with an unrestricted pickle.load. Here
that file is first unpickled with an allow-list of the classes torch writes there (anything else,
such as a callable smuggled into a crafted file, is refused), and the index is then used to
check that every shard file exists and is long enough: truncated and missing files are found
before any rank starts a collective load that would otherwise fail on one rank and hang others.
Other files are JSON or are read with torch.load(weights_only=True).

A shard whose bytes changed after it was written (bit rot, a partly overwritten file) keeps its
length, and torch.load never checks the CRC-32 that torch.save stores for every record, so such a
file would load silently as wrong weights. `verify_checksums` reads the records back and checks
those CRCs; the manager runs it on every rank for its share of the files before a resume.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
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
# _StoragePrefix (a file-name prefix): megatron-core records every rank's save plan in the index
# (`all_local_plans`), and a plan reused from an earlier save (save_strategy.RunSaveStrategy)
# carries the prefix of its files.
_ALLOWED_NAMES = {("torch.distributed.checkpoint.filesystem", n) for n in ("_StorageInfo", "_StoragePrefix")}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would run code or reference unexpected classes when loaded."""


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint with missing or truncated files."""


class CorruptShardError(RuntimeError):
    """A shard file whose contents no longer match the checksums written with them."""


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


def verify_checksums(path: Location, weights_only: bool = False, share: tuple[int, int] = (0, 1)) -> None:
    """Raise CorruptShardError if a record of the checkpoint's shard files fails its CRC-32.
    weights_only: skip the optimizer's records (a load of the weights alone does not read them);
    share=(i, n): only the i-th of every n shard files (sorted), so that n ranks split the work.

    torch_dist stores every item as a torch.save archive (an uncompressed zip) at an offset of a
    shard; zipfile reads each archive's directory in place, and the members are checksummed here
    in large reads (zipfile's own reader takes 3x as long).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = read_index(path)
    wanted = set(sorted({info.relative_path for info in index.storage_data.values()})[share[0]::share[1]])
    items: dict[str, list[tuple[int, int, str, bool]]] = {}
    for key, info in index.storage_data.items():
        skipped = weights_only and key.fqn.startswith(OPTIMIZER_PREFIX)
        if info.relative_path in wanted and not info.transform_descriptors and not skipped:
            # byte items hold whatever was serialised; tensors are always torch.save archives
            is_bytes = isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata)
            items.setdefault(info.relative_path, []).append((info.offset, info.length, key.fqn, is_bytes))
    buffer = memoryview(bytearray(_CHUNK))
    for name, records in sorted(items.items()):
        shard = path / name
        with shard.open("rb") as stream:
            for offset, length, fqn, is_bytes in sorted(records):
                stream.seek(offset)
                if is_bytes and stream.read(len(_ZIP_SIGNATURE)) != _ZIP_SIGNATURE:
                    continue  # not an archive: nothing to check it against
                problem = _record_problem(stream, offset, length, buffer)
                if problem is not None:
                    raise CorruptShardError(
                        f"shard {shard} is corrupt: the record of {fqn!r} (bytes {offset}-{offset + length}) "
                        f"{problem}; its contents changed after it was written (a disk or copy error). "
                        "Use an earlier checkpoint (on resume, checkpoint.fallback=true skips to the one "
                        "before)"
                    )


def verify_checksums_collectively(path: Location, weights_only: bool = False) -> Exception | None:
    """Collective: every rank verifies the checksums of its share of the shard files; returns the
    first problem any rank found, as the error it raised there (the same on every rank), or None.
    A rank's failure to read is a problem too, so that no rank is left waiting for the others."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        verify_checksums(path, weights_only, share=(rank, world))
        mine = None
    except (CorruptShardError, IncompleteCheckpointError, UnsafeCheckpointError, OSError) as err:
        mine = err
    found: list[Exception | None] = [None] * world
    dist.all_gather_object(found, mine)
    return next((problem for problem in found if problem is not None), None)


OPTIMIZER_PREFIX = "optimizer."  # the key prefix of every optimizer tensor in a training checkpoint
_CHUNK = 16 << 20
_ZIP_SIGNATURE = b"PK\x03\x04"  # of a zip file's (local) entry header
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


def _record_problem(stream: Any, offset: int, length: int, buffer: memoryview) -> str | None:
    """What is wrong with the zip archive at [offset, offset + length) of stream, or None."""
    try:
        with zipfile.ZipFile(_Slice(stream, offset, length)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as err:
        return f"is not a readable archive ({err})"
    for member in members:
        stream.seek(offset + member.header_offset)
        header = stream.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or member.compress_type != zipfile.ZIP_STORED:
            return f"has a damaged entry {member.filename}"
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _ZIP_SIGNATURE:
            return f"has a damaged entry {member.filename}"
        stream.seek(name_length + extra_length, io.SEEK_CUR)
        crc, remaining = 0, member.compress_size
        while remaining:
            count = stream.readinto(buffer[: min(remaining, _CHUNK)])
            if not count:
                return f"ends inside {member.filename}"
            crc = zlib.crc32(buffer[:count], crc)
            remaining -= count
        if crc != member.CRC:
            return f"fails its checksum in {member.filename}"
    return None


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary file, as a seekable file of their own."""

    def __init__(self, stream: Any, offset: int, length: int) -> None:
        self._stream, self._offset, self._length, self._pos = stream, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._stream.seek(self._offset + self._pos)
        data = self._stream.read(count)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
