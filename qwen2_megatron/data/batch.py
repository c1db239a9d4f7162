"""Turning windows of seq_length + 1 tokens into the trainer's micro-batch dict.

tokens = window[:-1], labels = window[1:]. With document resets, position ids restart after
every <|endoftext|> and the attention mask blocks attention across documents (megatron's
convention: a bool [b, 1, s, s] mask, True = masked out). Ranks of one model replica only need
some of the fields: batch_for_stage drops the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qwen2_megatron.data.tokenizer import EOD_ID


def _document_ids(tokens: np.ndarray) -> np.ndarray:
    """Per position, the index of its document within the row (a new one starts after each EOD)."""
    ends = tokens == EOD_ID
    starts = np.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    return np.cumsum(starts, axis=1)


def collate(windows: list[np.ndarray], reset_position_ids: bool, reset_attention_mask: bool) -> dict[str, Tensor]:
    stacked = np.stack(windows).astype(np.int64)
    tokens = stacked[:, :-1]
    batch = {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
        "labels": torch.from_numpy(np.ascontiguousarray(stacked[:, 1:])),
        "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
    }
    if reset_position_ids or reset_attention_mask:
        docs = _document_ids(tokens)
    if reset_position_ids:
        positions = np.arange(tokens.shape[1])[None, :].repeat(len(tokens), 0)
        first = np.maximum.accumulate(np.where(np.diff(docs, prepend=-1, axis=1) != 0, positions, 0), axis=1)
        batch["position_ids"] = torch.from_numpy(positions - first)
    if reset_attention_mask:
        causal = np.tril(np.ones((tokens.shape[1], tokens.shape[1]), dtype=bool))
        same_doc = docs[:, :, None] == docs[:, None, :]
        batch["attention_mask"] = torch.from_numpy(~(causal[None] & same_doc)[:, None])
    return batch


def batch_for_stage(batch: dict[str, Tensor], first_stage: bool, last_stage: bool) -> dict[str, Tensor]:
    """The fields a pipeline stage uses: inputs on the first, targets on the last, the mask on all."""
    keep = {"attention_mask"}
    if first_stage:
        keep |= {"tokens", "position_ids"}
    if last_stage:
        keep |= {"labels", "loss_mask"}
    return {k: v for k, v in batch.items() if k in keep}
