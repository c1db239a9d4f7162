"""Plain typed dataclasses describing a data mixture (Hydra structured-config friendly).

Validation runs on the values alone, before any file is opened, so a bad weight or an empty
mixture fails in milliseconds with the field named.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

FORMATS = ("jsonl", "parquet", "text", "indexed")
SPLITS = ("train", "heldout")
ON_EXHAUSTION = ("repeat", "end")


class DataConfigError(ValueError):
    """A data configuration that cannot describe a mixture."""


@dataclass
class SourceConfig:
    """One named source. `paths` are files, globs or fsspec URLs; for "indexed" the path prefixes
    of .bin/.idx pairs written by qwen2-prepare-data."""

    name: str
    paths: list[str]
    format: str = "jsonl"  # jsonl | parquet | text | indexed
    weight: float = 1.0  # share of training tokens, relative to the other sources
    text_key: str = "text"  # column holding the document (jsonl, parquet)
    on_exhaustion: str = "repeat"  # repeat: start another epoch; end: drop out of the mixture
    # Fraction range of an indexed source's documents to use, e.g. [0.0, 0.99] for training and
    # [0.99, 1.0] for validation.
    doc_range: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def validate(self) -> None:
        where = f"data source {self.name!r}"
        if not self.name:
            raise DataConfigError("every data source needs a non-empty name")
        if self.format not in FORMATS:
            raise DataConfigError(f"{where}: format={self.format!r}; choose one of {FORMATS}")
        if not self.paths:
            raise DataConfigError(f"{where}: no paths given; list its files, globs or URLs")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise DataConfigError(
                f"{where}: weight={self.weight!r} must be a positive number (a token share); "
                f"remove the source instead of giving it weight 0"
            )
        if self.on_exhaustion not in ON_EXHAUSTION:
            raise DataConfigError(f"{where}: on_exhaustion={self.on_exhaustion!r}; choose one of {ON_EXHAUSTION}")
        lo, hi = self.doc_range
        if not 0.0 <= lo < hi <= 1.0:
            raise DataConfigError(f"{where}: doc_range={self.doc_range} must satisfy 0 <= start < end <= 1")


@dataclass
class MixtureConfig:
    """A weighted mixture and how it is shuffled, packed and spread over lanes.

    num_lanes fixes the global sample order independently of the data-parallel size: it must be a
    multiple of every DP size the run may use (see loader.py).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    seed: int = 1234
    shuffle: bool = True  # file order per epoch, plus documents within blocks (or fully, indexed)
    shuffle_block_docs: int = 256  # streamed documents shuffled together (and re-read on resume)
    num_lanes: int = 8
    reset_position_ids: bool = False  # restart positions at every document
    reset_attention_mask: bool = False  # no attention across document boundaries
    num_workers: int = 1  # background tokenising processes per loader; 0 = in the caller
    prefetch_samples: int = 64  # per worker
    worker_timeout_s: float = 600.0  # a worker silent this long (e.g. a stalled remote read) is an error
    tokenizer: str | None = None  # a tokenizer directory; None = the installed Qwen2 tokenizer
    # Documents held out of training for evaluation, chosen by a stable hash of (file name, row) or,
    # for indexed sources, (source name, document id): independent of lanes, seed and DP size.
    heldout_fraction: float = 0.01
    split: str = "train"  # train | heldout

    def validate(self) -> None:
        if not self.sources:
            raise DataConfigError(
                "the data mixture is empty: add at least one entry to data.sources "
                "(or use the demo mixture, qwen2_megatron.data.demo.demo_mixture())"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataConfigError(f"data source names must be unique, got {names}")
        for source in self.sources:
            source.validate()
        for name in ("shuffle_block_docs", "num_lanes", "prefetch_samples"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataConfigError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.split not in SPLITS:
            raise DataConfigError(f"data.split={self.split!r}; choose one of {SPLITS}")
        if self.split == "heldout" and self.heldout_fraction == 0:
            raise DataConfigError("the held-out split is empty with data.heldout_fraction=0; raise it (e.g. 0.01)")
        if self.num_workers < 0:
            raise DataConfigError(f"data.num_workers={self.num_workers} must be >= 0")

    def check_dp_size(self, dp_size: int) -> None:
        """The global sample order is defined over lanes, so every DP rank needs whole lanes."""
        if self.num_lanes % dp_size:
            raise DataConfigError(
                f"data.num_lanes={self.num_lanes} is not a multiple of the data-parallel size "
                f"{dp_size}: the global sample order is defined over lanes; set data.num_lanes to a "
                f"multiple of every DP size the run may use (e.g. {self.num_lanes * dp_size})"
            )

    def heldout(self) -> "MixtureConfig":
        """The evaluation mixture: the held-out documents of the same sources, one lane, in file
        order, repeating (an evaluation loop may outlast a small held-out set)."""
        sources = [replace(s, on_exhaustion="repeat") for s in self.sources]
        return replace(self, sources=sources, split="heldout", num_lanes=1, shuffle=False, num_workers=0)

    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the document named `key` belongs to the held-out split (stable across runs)."""
    return zlib.crc32(key.encode()) < fraction * 2**32
