"""The mixture loader on real text: exact resume (mid-document, shuffled, other DP size, workers),
DP-independent global order, disjoint ranks, epoch coverage, realised share, resets, and workers
that do not outlive a killed rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2_megatron.data.config import DataConfigError, MixtureConfig
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.data.loader import MixtureDataLoader, build_data_loader, merge_states
from qwen2_megatron.data.report import mixture_report
from qwen2_megatron.data.sources import StreamedSource, resolve_files
from qwen2_megatron.data.tokenizer import EOD_ID
from tests.data_fixtures import corpus, corpus_mixture, tokenizer  # noqa: F401
from tests.processes import stop_process

SEQ = 64


def _loaders(config: MixtureConfig, tok, dp: int, mbs: int = 2) -> list[MixtureDataLoader]:
    return [build_data_loader(config, tok, SEQ, mbs, dp_rank=r, dp_size=dp) for r in range(dp)]


def _global_samples(loaders: list[MixtureDataLoader], steps: int) -> list[list[int]]:
    """Run `steps` micro-batches on every rank; return the samples in global order."""
    dp = len(loaders)
    per_rank = [[row for _ in range(steps) for row in _windows(next(ld))] for ld in loaders]
    return [per_rank[g % dp][g // dp] for g in range(dp * len(per_rank[0]))]


def _windows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1).tolist()


def _resume(state: dict, config: MixtureConfig, tok, dp: int) -> list[MixtureDataLoader]:
    loaders = _loaders(config, tok, dp)
    for ld in loaders:
        ld.load_state_dict(json.loads(json.dumps(state)))  # must survive JSON
    return loaders


def test_resume_and_dp_change_continue_the_global_sequence(corpus, tokenizer) -> None:
    root, _ = corpus
    config = corpus_mixture(root)
    reference = _global_samples(_loaders(config, tokenizer, dp=1), steps=40)
    assert all(len(w) == SEQ + 1 for w in reference)

    # dp=2 sees the same global sequence, then saves after 7 steps (14 * 2 samples)
    first = _loaders(config, tokenizer, dp=2)
    assert _global_samples(first, steps=7) == reference[:28]
    state = merge_states([ld.local_state() for ld in first])
    assert state["consumed"] == 28
    assert any(s and s["current"]["offset"] > 0 for s in state["lanes"].values()), "expected a mid-document save"
    assert any(s and any(c["skip"] for c in s["sources"]) for s in state["lanes"].values()), "expected a mid-block save"

    # ... and resumes with dp=4, with dp=1 and with background workers: token for token
    assert _global_samples(_resume(state, config, tokenizer, dp=4), steps=3) == reference[28:52]
    assert _global_samples(_resume(state, config, tokenizer, dp=1), steps=6) == reference[28:40]
    workers = _resume(state, corpus_mixture(root, num_workers=2), tokenizer, dp=1)
    try:
        assert _global_samples(workers, steps=6) == reference[28:40]
        saved_with_prefetch = workers[0].state_dict()  # the workers ran ahead: only consumed counts
        assert _global_samples(_resume(saved_with_prefetch, config, tokenizer, dp=2), steps=3) == reference[40:52]
    finally:
        for ld in workers:
            ld.close()


def test_seed_changes_order_and_ranks_are_disjoint(corpus, tokenizer) -> None:
    root, _ = corpus
    a = _loaders(corpus_mixture(root), tokenizer, dp=2)
    rows = [[tuple(w) for _ in range(10) for w in _windows(next(ld))] for ld in a]
    assert not set(rows[0]) & set(rows[1])
    other = _global_samples(_loaders(corpus_mixture(root, seed=8), tokenizer, dp=1), steps=10)
    assert [list(r) for r in rows[0][:5]] != other[0:10:2]


def _lane_documents(source, tok) -> list[str]:
    docs = []
    while source.epoch == 0 and (doc := source.next_doc()) is not None:
        docs.append(tok.decode(doc.tolist()))
    return docs[:-1] if source.epoch else docs  # the last one drawn belongs to epoch 1


# english has 4 files, code 2, cjk 10: whole files per lane (evenly or not), or rows dealt out
@pytest.mark.parametrize("name,lanes", [("english", 4), ("english", 3), ("english", 8), ("code", 2), ("cjk", 4)])
def test_each_document_once_per_epoch_and_heldout_disjoint(corpus, tokenizer, name: str, lanes: int) -> None:
    root, texts = corpus
    config = corpus_mixture(root, num_lanes=lanes)
    index = [s.name for s in config.sources].index(name)
    source_config = config.sources[index]
    files = resolve_files(source_config)
    splits: dict[bool, list[str]] = {}
    for heldout, split_lanes in ((False, lanes), (True, 1)):
        splits[heldout] = []
        for lane in range(split_lanes):
            source = StreamedSource(
                source_config, index, files, tokenizer, lane, split_lanes, config.seed, True, 8, (heldout, 0.15)
            )
            splits[heldout] += _lane_documents(source, tokenizer)
            assert source.epoch == 1  # on_exhaustion="repeat": the next epoch began
    assert splits[True] and not set(splits[True]) & set(splits[False])
    everything = Counter(unicodedata.normalize("NFC", t) for t in texts[name])  # the tokenizer normalises
    assert Counter(splits[False]) + Counter(splits[True]) == everything


def test_heldout_loader_and_sequence_length_change(corpus, tokenizer) -> None:
    root, texts = corpus
    config = corpus_mixture(root, num_lanes=1, heldout_fraction=0.15)
    heldout_docs: set[str] = set()
    for index, source_config in enumerate(config.sources):
        source = StreamedSource(source_config, index, resolve_files(source_config), tokenizer, 0, 1,
                                config.seed, False, 8, (True, 0.15))
        heldout_docs |= set(_lane_documents(source, tokenizer))
    evaluation = build_data_loader(config.heldout(), tokenizer, SEQ, 1)
    stream = _stitched([_windows(next(evaluation))[0] for _ in range(40)])
    assert _documents(stream, tokenizer) <= heldout_docs

    # a sequence-length stage continues the same token stream with longer windows
    short = build_data_loader(config, tokenizer, 32, 1)
    reference = _stitched([_windows(next(short))[0] for _ in range(30)])
    first = build_data_loader(config, tokenizer, 32, 1)
    before = [_windows(next(first))[0] for _ in range(7)]
    longer = build_data_loader(config, tokenizer, 64, 1)
    longer.load_state_dict(first.state_dict(), seq_length_changed=True)
    after = [_windows(next(longer))[0] for _ in range(8)]
    assert all(len(w) == 65 for w in after)
    assert _stitched(before + after) == reference[: 7 * 32 + 8 * 64 + 1]
    with pytest.raises(DataConfigError, match="seq_length"):
        build_data_loader(config, tokenizer, 64, 1).load_state_dict(first.state_dict())


def _stitched(windows: list[list[int]]) -> list[int]:
    """The token stream that consecutive windows (overlapping by one token) cut."""
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))
    return windows[0] + [t for w in windows[1:] for t in w[1:]]


def _documents(stream: list[int], tokenizer) -> set[str]:
    """The documents that lie wholly inside a stream."""
    ends = [i for i, t in enumerate(stream) if t == EOD_ID]
    return {tokenizer.decode(stream[a + 1 : b]) for a, b in zip(ends, ends[1:])}


def test_windows_are_the_packed_document_stream(corpus, tokenizer) -> None:
    root, texts = corpus
    loader = build_data_loader(corpus_mixture(root, num_lanes=1, shuffle=False), tokenizer, SEQ, 1)
    documents = _documents(_stitched([_windows(next(loader))[0] for _ in range(60)]), tokenizer)
    everything = {unicodedata.normalize("NFC", t) for docs in texts.values() for t in docs}
    assert len(documents) > 3 and documents <= everything


def test_realised_share_is_reported(corpus, tokenizer) -> None:
    root, texts = corpus
    loader = build_data_loader(corpus_mixture(root), tokenizer, SEQ, 4)
    for _ in range(60):
        next(loader)
    report = mixture_report(loader.state_dict())
    longest = max(len(ids) + 1 for docs in texts.values() for ids in tokenizer.encode_batch(docs))
    drawn = report["tokens"]
    assert drawn == 60 * 4 * SEQ  # each window advances the stream by SEQ tokens
    for source, target in (("english", 0.5), ("code", 0.3), ("cjk", 0.2)):
        row = report["sources"][source]
        assert row["target_share"] == pytest.approx(target)
        # the deficit rule keeps every lane within one document of its target
        assert abs(row["realised_share"] - target) * drawn <= 4 * longest
        assert row["documents"] > 0
    assert "realised" in report["text"]


def test_end_exhaustion_and_resets(corpus, tokenizer) -> None:
    root, _ = corpus
    config = corpus_mixture(root, reset_position_ids=True, reset_attention_mask=True)
    for source in config.sources:
        source.on_exhaustion = "end"
    loader = build_data_loader(config, tokenizer, SEQ, 2)
    batches = list(loader)  # ends (no hang) once a lane's sources have all ended
    assert 100 < len(batches) < 5000
    tokens, positions, mask = batches[0]["tokens"], batches[0]["position_ids"], batches[0]["attention_mask"]
    for row in range(tokens.shape[0]):
        eods = (tokens[row] == EOD_ID).nonzero().flatten().tolist()
        for e in eods:
            if e + 1 < SEQ:
                assert positions[row, e + 1] == 0 and mask[row, 0, e + 1, e]  # new document: masked
        assert not mask[row, 0].diagonal().any()
    assert mask.shape == (2, 1, SEQ, SEQ) and mask.dtype == torch.bool


def test_bad_loader_settings(corpus, tokenizer) -> None:
    root, _ = corpus
    with pytest.raises(DataConfigError, match="multiple of the data-parallel size"):
        build_data_loader(corpus_mixture(root, num_lanes=4), tokenizer, SEQ, 1, dp_rank=0, dp_size=3)
    loader = build_data_loader(corpus_mixture(root), tokenizer, SEQ, 1)
    state = loader.state_dict()
    with pytest.raises(DataConfigError, match="different mixture"):
        build_data_loader(corpus_mixture(root, seed=99), tokenizer, SEQ, 1).load_state_dict(state)
    with pytest.raises(DataConfigError, match="different mixture"):
        build_data_loader(corpus_mixture(root), tokenizer, SEQ * 2, 1).load_state_dict(state)
    with pytest.raises(Exception, match="smaller than the tokenizer"):
        build_data_loader(corpus_mixture(root), tokenizer, SEQ, 1, model_vocab_size=384)


def test_demo_mixture_builds_and_draws_every_source(tmp_path, tokenizer) -> None:
    config = demo_mixture(tmp_path / "demo", shuffle_block_docs=2, num_workers=0)
    loader = build_data_loader(config, None, 256, config.num_lanes, model_vocab_size=151936)  # default tokenizer
    for _ in range(12):
        batch = next(loader)
    assert batch["tokens"].shape == (8, 256)
    report = mixture_report(loader.state_dict())
    assert all(row["documents"] > 0 for row in report["sources"].values()), report["text"]
    assert sorted(report["sources"]) == ["code", "english", "math", "multilingual"]


_RANK_WITH_WORKERS = """
import sys, time
from qwen2_megatron.data.demo import demo_mixture
from qwen2_megatron.data.loader import build_data_loader
config = demo_mixture(sys.argv[1], num_workers=2)
loader = build_data_loader(config, None, 64, config.num_lanes, model_vocab_size=151936)
next(loader)
print(*[proc.pid for proc, _ in loader._workers], flush=True)
time.sleep(600)
"""


def test_data_workers_die_with_a_killed_rank(tmp_path) -> None:
    """kill -9 of the process that owns the loader: its workers (blocked on full queues) follow."""
    rank = subprocess.Popen([sys.executable, "-c", _RANK_WITH_WORKERS, str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2 and all(Path(f"/proc/{pid}").exists() for pid in workers)
        rank.kill()
        rank.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, "a data worker outlived its rank"
    finally:
        stop_process(rank, 5)
