"""The loader across real processes (gloo): DP state gathering and resume, TP broadcast.

One spawn of two ranks covers both, because each spawned rank pays the megatron import."""

from __future__ import annotations

import json

import torch

from qwen2_megatron.data.loader import build_data_loader, merge_states
from qwen2_megatron.parallel.local_launch import spawn
from tests.data_fixtures import corpus, corpus_mixture, tokenizer  # noqa: F401
from tests.data_workers import MBS, SEQ, dp_and_tp_ranks


def test_two_ranks_gather_resume_and_broadcast(corpus, tokenizer) -> None:
    root, _ = corpus
    config = corpus_mixture(root, reset_position_ids=True, reset_attention_mask=True)
    reference = build_data_loader(config, tokenizer, SEQ, MBS)  # dp=1: the global order
    rows = [row for _ in range(10) for row in next(reference)["tokens"].tolist()]
    saved = build_data_loader(config, tokenizer, SEQ, MBS)
    for _ in range(3):
        next(saved)  # 6 samples consumed at dp=1, resumed below at dp=2
    state = json.loads(json.dumps(saved.state_dict()))

    results = spawn(dp_and_tp_ranks, 2, str(root), state, timeout_s=600)

    for rank, result in enumerate(results):  # rank r took global samples 6 + r, 6 + r + 2, ...
        taken = [row for batch in result["dp_batches"] for row in batch]
        assert taken == [rows[g] for g in range(6 + rank, 18, 2)]
    assert results[0]["dp_state"] == results[1]["dp_state"]  # gathered: the same on every rank
    assert results[0]["dp_state"]["consumed"] == 18
    expected = merge_states([results[0]["dp_state"]])
    assert json.loads(json.dumps(expected)) == results[0]["dp_state"]
    for a, b in zip(*(r["tp_batches"] for r in results)):  # TP peers got the same micro-batch
        assert sorted(a) == ["attention_mask", "labels", "loss_mask", "position_ids", "tokens"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0]["tp_batches"][0]["tokens"].tolist() == rows[:2]
