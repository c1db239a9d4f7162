"""Reads W&B offline run files (.wandb) back with wandb's own protobuf classes.

The file is a LevelDB-style record log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type: full/first/middle/last).
wandb 0.31 ships no public reader, so the tests parse it here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:
            pos += room  # block trailer padding
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:
            break
        body = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        pending = body if kind in (_FULL, _FIRST) else pending + body
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(path: Path) -> dict[str, Any]:
    """run id, config and history rows of one .wandb file."""
    run: dict[str, Any] = {"id": None, "config": {}, "history": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return run
