"""Where a checkpoint lives: a local directory, or an object-store URL (s3://bucket/prefix, msc://).

URLs go through megatron-core's own object-storage support, multi-storage-client (the `s3`
extra), which megatron's dist_checkpointing uses once it is enabled in the process; small files
use the same library's pathlib-compatible MultiStoragePath, so the checkpoint code reads the same
for both kinds. `s3://bucket/...` needs no configuration file: boto3's usual settings apply
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws); a
MSC_CONFIG file may define msc:// profiles (caching, other providers).

The operations that differ between the two (atomic publication, deletion, torch files) are here
and only here.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

# Path or multistorageclient.pathlib.MultiStoragePath (same interface for what we use)
Location = Any


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def location(path: str | os.PathLike) -> Location:
    """A local Path, or for a URL a MultiStoragePath (enabling megatron's object-storage support)."""
    if not is_remote(path):
        return Path(str(path).removeprefix("file://"))
    try:
        from multistorageclient.pathlib import MultiStoragePath
    except ImportError:
        raise ImportError(
            f"{path}: object-storage checkpoints need multi-storage-client; install it with "
            "pip install 'qwen2-megatron[s3]' (or use a local/shared file-system path)"
        ) from None
    from megatron.core.msc_utils import MultiStorageClientFeature

    MultiStorageClientFeature.enable()
    return MultiStoragePath(str(path))


def remove_tree(path: Location, first: str | None = None) -> None:
    """Delete a checkpoint directory or prefix; `first` (its completeness marker) goes first, so
    a deletion that is interrupted never leaves something that looks complete."""
    if first is not None:
        (path / first).unlink(missing_ok=True)
    if isinstance(path, Path):
        if path.exists():
            shutil.rmtree(path)
        return
    import multistorageclient as msc

    client, prefix = msc.resolve_storage_client(str(path))
    client.delete_many([entry.key for entry in client.list(path=prefix.rstrip("/") + "/")])


def write_text_atomic(path: Location, text: str) -> None:
    """Readers see the old content or the new one, never a mix: a temporary file renamed over
    the target locally, one PUT (atomic by itself) on an object store."""
    if not isinstance(path, Path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save(obj: Any, path: Location) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)


def torch_load_weights(path: Location) -> Any:
    """torch.load(weights_only=True): tensors and plain values only, nothing executed."""
    with path.open("rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)
