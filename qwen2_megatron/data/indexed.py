"""Pre-tokenised megatron indexed datasets (.bin/.idx): checked opening, and one lane's view.

The files are megatron-core's own format (written by qwen2-prepare-data through megatron's
IndexedDatasetBuilder), so megatron's IndexedDataset and GPTDataset read them too. Documents are
stored without the separator; packing appends it, as for streamed text. Opening checks what
megatron does not: that the index matches its data file (a truncated or mismatched pair would read
garbage) and that the selected document range is not empty (megatron's GPTDataset loops forever
on a split with zero documents). Random access makes a full per-epoch shuffle cheap here.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np

from qwen2_megatron.data.config import SourceConfig, is_heldout
from qwen2_megatron.data.sources import DataSourceError


def metadata_path(prefix: str) -> str:
    return prefix + ".json"


def open_indexed(prefix: str, tokenizer_fingerprint: str | None = None):
    """megatron's IndexedDataset for `prefix`, after checking the pair and its tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # deferred: imports torch

    fix = f"re-create it with `qwen2-prepare-data --output-prefix {prefix} ...`"
    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise DataSourceError(f"indexed dataset {prefix}: {prefix}{suffix} is missing; {fix}")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as error:  # noqa: BLE001 - a bad header is an AssertionError deep in megatron
        raise DataSourceError(f"indexed dataset {prefix}: {prefix}.idx is not a valid index ({error}); {fix}") from error
    index = dataset.index
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if len(index) else 0
    actual = os.path.getsize(prefix + ".bin")
    if expected != actual:
        raise DataSourceError(
            f"indexed dataset {prefix}: the index describes {expected} bytes of tokens but "
            f"{prefix}.bin has {actual}: the pair is truncated or from different runs; {fix}"
        )
    if tokenizer_fingerprint is not None and os.path.isfile(metadata_path(prefix)):
        with open(metadata_path(prefix), encoding="utf-8") as stream:
            written_with = json.load(stream).get("tokenizer_fingerprint")
        if written_with != tokenizer_fingerprint:
            raise DataSourceError(
                f"indexed dataset {prefix} was tokenised with tokenizer {written_with}, not the "
                f"configured one ({tokenizer_fingerprint}); {fix} using this tokenizer"
            )
    return dataset


@lru_cache(maxsize=8)
def _split_ids(name: str, lo: int, hi: int, heldout: tuple[bool, float]) -> np.ndarray:
    """Document ids of [lo, hi) in this split (int32 when it fits)."""
    ids = np.arange(lo, hi, dtype=np.int64 if hi >= 2**31 else np.int32)
    want, fraction = heldout
    if not fraction:
        return ids
    return ids[np.fromiter((is_heldout(f"{name}:{j}", fraction) == want for j in ids), dtype=bool, count=len(ids))]


@lru_cache(maxsize=8)
def _epoch_order(ids_key: tuple, seed: int, index: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Document ids of one epoch, shared by all lanes of a process."""
    ids = _split_ids(*ids_key)
    return np.random.default_rng([seed, index, epoch]).permutation(ids) if shuffle else ids


class IndexedSource:
    """One lane's view of indexed datasets (their documents concatenated in `paths` order)."""

    def __init__(
        self, source: SourceConfig, index: int, tokenizer_fingerprint: str,
        lane: int, num_lanes: int, seed: int, shuffle: bool, heldout: tuple[bool, float],
    ) -> None:
        self.source, self.index, self.lane, self.num_lanes = source, index, lane, num_lanes
        self.seed, self.shuffle, self.ended = seed, shuffle, False
        self.datasets = [open_indexed(p, tokenizer_fingerprint) for p in source.paths]
        self.offsets = np.cumsum([0] + [len(d.document_indices) - 1 for d in self.datasets])
        total = int(self.offsets[-1])
        lo, hi = int(source.doc_range[0] * total), int(source.doc_range[1] * total)
        self.ids_key = (source.name, lo, hi, heldout)
        selected = len(_split_ids(*self.ids_key))
        if selected == 0 and heldout[0]:  # a source may hold out no document
            self.ended = True
        elif selected < num_lanes:
            raise DataSourceError(
                f"data source {source.name!r}: doc_range {source.doc_range} of {total} documents "
                f"selects {selected} for this split, fewer than data.num_lanes={num_lanes} (a split "
                f"with no documents for some lanes); widen doc_range, add data or lower data.num_lanes"
            )
        self.load_cursor({"epoch": 0, "pos": 0, "empty": 0})

    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "empty": self.empty}

    def load_cursor(self, cursor: dict[str, int]) -> None:
        self.epoch, self.pos, self.empty = cursor["epoch"], cursor["pos"], cursor["empty"]

    def _document(self, doc_id: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, doc_id, side="right")) - 1
        dataset = self.datasets[part]
        local = doc_id - int(self.offsets[part])
        first, last = dataset.document_indices[local], dataset.document_indices[local + 1]
        return np.concatenate([dataset[i] for i in range(first, last)]) if last - first != 1 else dataset[first]

    def next_doc(self) -> np.ndarray | None:
        while not self.ended:
            lane_docs = _epoch_order(self.ids_key, self.seed, self.index, self.epoch, self.shuffle)[self.lane :: self.num_lanes]
            if self.pos == len(lane_docs):
                if self.empty >= len(lane_docs) * (self.epoch + 1):
                    raise DataSourceError(f"data source {self.source.name!r}: every selected document is empty")
                if self.source.on_exhaustion == "end":
                    self.ended = True
                else:
                    self.epoch, self.pos = self.epoch + 1, 0
                continue
            doc = self._document(int(lane_docs[self.pos]))
            self.pos += 1
            if len(doc):
                return doc
            self.empty += 1
        return None
