"""Streamed document sources (jsonl, parquet, plain text; local paths or fsspec URLs) read through
Hugging Face `datasets` streaming, split over lanes, shuffled resumably and tokenised in blocks.

Why not `IterableDataset.shuffle`: its buffer is not part of its state_dict, so a resumed run
loses and repeats documents. The shuffle here is deterministic and addressable instead:
 - each epoch visits the files in a seeded permutation;
 - documents are read in blocks of `shuffle_block_docs` and emitted in a permutation seeded by
   (seed, source, epoch, lane, block start).
A cursor is therefore a handful of integers (epoch, file, row and lane-document index of the
block start, documents consumed from the block, empty documents skipped); resuming re-reads and
re-tokenises one block. Files are opened one at a time so every error names its file.

Lanes: a source's documents are dealt to `num_lanes` lanes. With at least as many files as lanes
each lane reads whole files (files l, l + L, ... of the epoch's order: no wasted reads, lanes
differ by at most one file); with fewer files every lane reads all rows and keeps every L-th
(reading is cheap, tokenising is not: each document is still tokenised by exactly one lane, but a
process running n lanes reads such a source n times, so shard large sources into >= L files).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from qwen2_megatron.data.config import SourceConfig, is_heldout
from qwen2_megatron.data.tokenizer import QwenTokenizer
from qwen2_megatron.parallel.lifetime import end_with_parent

_BUILDERS = {"jsonl": ("json", {}), "parquet": ("parquet", {}), "text": ("text", {"sample_by": "document"})}
_GLOB_CHARS = set("*?[")


class DataSourceError(ValueError):
    """A data file that cannot be read as configured; the message names the file and the fix."""


def setup_worker_process() -> None:
    """For background reader processes: they never need torch, which `datasets` would otherwise
    import (seconds per process), and they die with the process that started them, even one killed
    with SIGKILL (a worker blocked on its full queue would otherwise outlive a killed rank)."""
    os.environ["USE_TORCH"] = "0"
    end_with_parent(signal.SIGKILL)


def resolve_files(source: SourceConfig) -> list[str]:
    """Expand globs and directories into a sorted list of readable files; missing ones are errors."""
    files: list[str] = []
    for path in source.paths:
        fs, fs_path = fsspec.core.url_to_fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if _GLOB_CHARS & set(fs_path):
            matches = sorted(m for m in fs.glob(fs_path) if fs.isfile(m))
        elif fs.isdir(fs_path):
            matches = sorted(m for m in fs.find(fs_path) if not os.path.basename(m).startswith("."))
        elif fs.isfile(fs_path):
            matches = [fs_path]
        else:
            raise DataSourceError(f"data source {source.name!r}: {path} does not exist; fix the path in its paths list")
        if not matches:
            raise DataSourceError(f"data source {source.name!r}: {path} matches no files")
        for match in matches:
            if not prefix and not os.access(match, os.R_OK):
                raise DataSourceError(f"data source {source.name!r}: {match} is not readable (check its permissions)")
        files.extend(prefix + m for m in matches)
    return sorted(dict.fromkeys(files))


def _fix_hint(source: SourceConfig, error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "the file is not UTF-8 text; re-encode it (e.g. iconv -f LATIN1 -t UTF-8) or remove it"
    if source.format == "parquet":
        return "the parquet file is corrupt or truncated; rewrite it or remove it from the source"
    if source.format == "jsonl":
        return "the JSON lines are corrupt or truncated; repair the file or remove it from the source"
    return "check that the file is readable text"


def read_rows(source: SourceConfig, path: str, start_row: int) -> Iterator[str | None]:
    """The document texts of one file from row `start_row` on (None for an empty document)."""
    import datasets  # deferred: 1.5 s import, needed only by streamed sources

    builder, options = _BUILDERS[source.format]
    try:
        rows = datasets.load_dataset(builder, data_files=[path], streaming=True, split="train", **options)
        if start_row:
            rows = rows.skip(start_row)
        for row in rows:
            yield _text_of(source, path, row)
    except DataSourceError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise DataSourceError(
            f"data source {source.name!r}: cannot read {path}: {type(error).__name__}: {error}. "
            f"Fix: {_fix_hint(source, error)}"
        ) from error


def _text_of(source: SourceConfig, path: str, row: dict[str, Any]) -> str | None:
    key = "text" if source.format == "text" else source.text_key
    if key not in row:
        raise DataSourceError(
            f"data source {source.name!r}: {path} has no column {key!r} (columns: {sorted(row)}); "
            f"set text_key to the column holding the document text"
        )
    text = row[key]
    if text is not None and not isinstance(text, str):
        raise DataSourceError(
            f"data source {source.name!r}: column {key!r} of {path} holds {type(text).__name__}, "
            f"not text; point text_key at a string column"
        )
    return text or None


def _permutation(n: int, shuffle: bool, *key: int) -> np.ndarray:
    return np.random.default_rng(list(key)).permutation(n) if shuffle else np.arange(n)


class StreamedSource:
    """One lane's view of a streamed source: tokenised documents in the lane's resumable order."""

    def __init__(
        self, source: SourceConfig, index: int, files: list[str], tokenizer: QwenTokenizer,
        lane: int, num_lanes: int, seed: int, shuffle: bool, block_docs: int, heldout: tuple[bool, float],
    ) -> None:
        self.source, self.index, self.files, self.tokenizer = source, index, files, tokenizer
        self.heldout = heldout  # (this is the held-out split, the held-out fraction)
        self.lane, self.num_lanes, self.seed, self.shuffle, self.block_docs = lane, num_lanes, seed, shuffle, block_docs
        self.ended = False
        self.load_cursor({"epoch": 0, "file": 0, "row": 0, "k": 0, "skip": 0, "empty": 0})

    def cursor(self) -> dict[str, int]:
        """Where the next document comes from (JSON-serialisable)."""
        return {"epoch": self.epoch, "file": self.start[0], "row": self.start[1], "k": self.start[2],
                "skip": self.skip, "empty": self.empty}

    def load_cursor(self, cursor: dict[str, int]) -> None:
        self.epoch, self.skip, self.empty = cursor["epoch"], cursor["skip"], cursor["empty"]
        self.start = (cursor["file"], cursor["row"], cursor["k"])
        self._block: list[np.ndarray | None] | None = None
        self._rows: Iterator[tuple[int, int, int, str | None]] | None = None
        self._epoch_has_docs = self.start != (0, 0, 0)

    def _lane_files(self) -> tuple[list[str], int, int]:
        """(files this lane reads in this epoch, keep every `stride`-th row, starting at `phase`)."""
        order = _permutation(len(self.files), self.shuffle, self.seed, self.index, self.epoch)
        files = [self.files[i] for i in order]
        if len(files) >= self.num_lanes:
            return files[self.lane :: self.num_lanes], 1, 0
        return files, self.num_lanes, self.lane

    def _lane_rows(self) -> Iterator[tuple[int, int, int, str | None]]:
        """(file, row, lane-row index k, text) of this lane's rows of its split from the block start on."""
        files, stride, phase = self._lane_files()
        file, row, k = self.start
        want_heldout, fraction = self.heldout
        for f in range(file, len(files)):
            name = os.path.basename(files[f])
            for r, text in enumerate(read_rows(self.source, files[f], row if f == file else 0), row if f == file else 0):
                if fraction and is_heldout(f"{name}:{r}", fraction) != want_heldout:
                    continue
                if k % stride == phase:
                    yield f, r, k, text
                k += 1

    def _read_block(self) -> bool:
        """Load the block at self.start; False at the end of the epoch."""
        if self._rows is None:
            self._rows = self._lane_rows()
        texts: list[str | None] = []
        for f, r, k, text in self._rows:
            texts.append(text)
            self._next_start = (f, r + 1, k + 1)
            if len(texts) == self.block_docs:
                break
        if not texts:
            return False
        encoded = iter(self.tokenizer.encode_batch([t for t in texts if t is not None]))
        docs = [None if t is None else next(encoded) for t in texts]
        order = _permutation(len(docs), self.shuffle, self.seed, self.index, self.epoch, self.lane, self.start[2])
        self._block = [docs[i] for i in order]
        return True

    def _next_epoch(self) -> None:
        if not self._epoch_has_docs and self.heldout[0]:  # a source may hold out no document
            self.ended = True
            return
        if not self._epoch_has_docs:
            raise DataSourceError(
                f"data source {self.source.name!r} has no non-empty documents for lane {self.lane} of "
                f"{self.num_lanes} (files: {self.files[:3]}{'...' if len(self.files) > 3 else ''}); a "
                f"source needs at least data.num_lanes documents: add data or lower data.num_lanes"
            )
        if self.source.on_exhaustion == "end":
            self.ended = True
            return
        self.epoch, self.start, self.skip, self._rows, self._epoch_has_docs = self.epoch + 1, (0, 0, 0), 0, None, False

    def next_doc(self) -> np.ndarray | None:
        """The next non-empty document's tokens, or None once the source has ended."""
        while not self.ended:
            if self._block is not None and self.skip == len(self._block):
                self.start, self.skip, self._block = self._next_start, 0, None
            if self._block is None and not self._read_block():
                self._next_epoch()
                continue
            doc = self._block[self.skip]
            self.skip += 1
            if doc is None or len(doc) == 0:
                self.empty += 1
                continue
            self._epoch_has_docs = True
            return doc
        return None
