"""One lane: a deterministic weighted mixture of sources, packed into training windows.

Mixing is by token share with a deficit rule (the next document comes from the active source that
is furthest below its target share of the lane's tokens so far; ties go to the earlier source),
which is deterministic, needs no RNG state, and keeps the realised share within one document of
the target at every point. The seed drives the shuffles inside the sources. A source configured
with on_exhaustion="end" drops out and the others' weights renormalise; when every source has
ended the lane ends.

Packing: documents are concatenated, each followed by <|endoftext|>, and cut into windows of
seq_length + 1 tokens that overlap by one token (window k covers stream positions
[k*S, k*S + S]), so every token is a training label exactly once. The packing state is therefore
just "which document holds position k*S, and at which offset", and the lane's whole state is a
few integers per source (see state()).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qwen2_megatron.data.tokenizer import EOD_ID


class DocumentSource(Protocol):
    ended: bool

    def next_doc(self) -> np.ndarray | None: ...
    def cursor(self) -> dict[str, int]: ...
    def load_cursor(self, cursor: dict[str, int]) -> None: ...


class Lane:
    """Windows of seq_length + 1 tokens from a weighted mixture of document sources."""

    def __init__(self, sources: list[DocumentSource], weights: list[float], seq_length: int) -> None:
        self.sources, self.weights, self.seq_length = sources, weights, seq_length
        self.tokens = [0] * len(sources)  # tokens (with separators) drawn per source
        self.docs = [0] * len(sources)
        self.samples = 0
        self._doc: np.ndarray | None = None  # the document holding the next window's start
        self._current: dict | None = None  # {"source", "cursor" (where _doc came from), "offset", "length"}

    def _pick_source(self) -> int | None:
        active = [i for i, s in enumerate(self.sources) if not s.ended]
        if not active:
            return None
        total_weight = sum(self.weights[i] for i in active)
        drawn = sum(self.tokens[i] for i in active)
        return max(active, key=lambda i: (self.weights[i] / total_weight * drawn - self.tokens[i], -i))

    def _draw(self) -> bool:
        """Make the next document current; False when every source has ended."""
        while (index := self._pick_source()) is not None:
            cursor = self.sources[index].cursor()
            doc = self.sources[index].next_doc()
            if doc is None:
                continue
            self._doc = np.append(doc.astype(np.int64), EOD_ID)
            self._current = {"source": index, "cursor": cursor, "offset": 0, "length": len(self._doc)}
            self.tokens[index] += len(self._doc)
            self.docs[index] += 1
            return True
        return False

    def next_window(self) -> np.ndarray | None:
        """The next window of seq_length + 1 tokens, or None once the sources are exhausted."""
        if self._current is None and not self._draw():
            return None
        pieces, need, offset = [], self.seq_length + 1, self._current["offset"]
        while True:
            piece = self._doc[offset : offset + need]
            pieces.append(piece)
            need -= len(piece)
            if not need:
                # The window's last token is the next window's first (offset < len(doc) holds).
                self._current["offset"] = offset + len(piece) - 1
                break
            if not self._draw():
                return None
            offset = 0
        self.samples += 1
        return np.concatenate(pieces)

    def state(self) -> dict:
        """Everything needed to continue exactly here: a few integers per source (JSON-able)."""
        return {
            "samples": self.samples, "tokens": list(self.tokens), "docs": list(self.docs),
            "ended": [s.ended for s in self.sources], "sources": [s.cursor() for s in self.sources],
            "current": None if self._current is None else dict(self._current),
        }

    def load_state(self, state: dict) -> None:
        self.samples, self.tokens, self.docs = state["samples"], list(state["tokens"]), list(state["docs"])
        current = state["current"]
        for index, (source, cursor) in enumerate(zip(self.sources, state["sources"])):
            source.load_cursor(current["cursor"] if current and current["source"] == index else cursor)
            source.ended = state["ended"][index]
        self._current = None if current is None else dict(current)
        if current is not None:  # re-read the partly consumed document
            source = self.sources[current["source"]]
            doc = source.next_doc()
            if doc is None or source.cursor() != state["sources"][current["source"]]:
                raise ValueError(
                    f"the data state does not match the data: document at {current['cursor']} of "
                    f"source {current['source']} cannot be re-read (were the files changed?)"
                )
            self._doc = np.append(doc.astype(np.int64), EOD_ID)
