"""qwen2-prepare-data and indexed sources: megatron reads the output, resume after a failure, and
every broken pairing of index and data is a clear error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen2_megatron.data.config import MixtureConfig, SourceConfig
from qwen2_megatron.data.indexed import open_indexed
from qwen2_megatron.data.loader import build_data_loader
from qwen2_megatron.data.prepare import main, prepare
from qwen2_megatron.data.sources import DataSourceError
from tests.data_fixtures import corpus, tokenizer, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[str, list[str]]:
    """english (4 jsonl files) tokenised with 2 worker processes."""
    root, texts = corpus
    prefix = str(tmp_path_factory.mktemp("indexed") / "english")
    assert main(["--input", str(root / "english-*.jsonl"), "--output-prefix", prefix, "--workers", "2", "--quiet"]) == 0
    in_file_order = [t for i in range(4) for t in texts["english"][i::4]]
    return prefix, in_file_order


def test_megatron_reads_what_prepare_wrote(prepared, tokenizer) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, docs = prepared
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(docs)
    expected = tokenizer.encode_batch(docs)
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        np.testing.assert_array_equal(dataset[i], expected[i])
    meta = json.loads(Path(prefix + ".json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert meta["tokens"] == sum(len(e) for e in expected)
    assert not os.path.exists(prefix + ".parts")


def test_indexed_source_in_a_mixture_resumes_exactly(prepared, corpus, tokenizer) -> None:
    prefix, _ = prepared
    root, _ = corpus
    config = MixtureConfig(
        sources=[
            SourceConfig(name="english-indexed", paths=[prefix], format="indexed", weight=0.7, doc_range=[0.0, 0.9]),
            SourceConfig(name="cjk", paths=[str(root / "cjk")], format="text", weight=0.3),
        ],
        num_lanes=2, shuffle_block_docs=4, num_workers=0,
    )
    loader = build_data_loader(config, tokenizer, 48, 2)
    run = [next(loader)["tokens"] for _ in range(30)]
    first = build_data_loader(config, tokenizer, 48, 2)
    for _ in range(11):
        next(first)
    resumed = build_data_loader(config, tokenizer, 48, 2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in run[11:]:
        assert next(resumed)["tokens"].equal(expected)


def test_prepare_resumes_after_a_bad_file(corpus, tmp_path, tokenizer) -> None:
    root, texts = corpus
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_jsonl(inputs / f"{i}.jsonl", texts["english"][i::3])
    good_last = (inputs / "2.jsonl").read_text()
    (inputs / "2.jsonl").write_text(good_last[: len(good_last) // 2])  # truncated mid-record
    prefix = str(tmp_path / "out" / "english")
    with pytest.raises(DataSourceError, match=r"2\.jsonl.*truncated"):
        prepare([str(inputs)], prefix, workers=1, progress=False)
    assert not os.path.exists(prefix + ".bin")  # nothing half-written under the final name
    finished = sorted(p.name for p in Path(prefix + ".parts").glob("*.npy"))
    assert finished == ["part-000000.npy", "part-000001.npy"]
    (inputs / "2.jsonl").write_text(good_last)
    meta = prepare([str(inputs)], prefix, workers=1, progress=False)
    assert meta["documents"] == len(texts["english"])
    assert meta["files_tokenised_this_run"] == 1  # the two finished files were not redone


def test_index_data_mismatch_and_empty_splits(prepared, tmp_path, tokenizer) -> None:
    prefix, _ = prepared
    copy = str(tmp_path / "copy")
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(prefix + suffix, copy + suffix)
    open_indexed(copy, tokenizer.fingerprint)
    with open(copy + ".bin", "r+b") as stream:  # truncated data file
        stream.truncate(os.path.getsize(copy + ".bin") - 8)
    with pytest.raises(DataSourceError, match="truncated or from different runs"):
        open_indexed(copy)
    os.remove(copy + ".bin")
    with pytest.raises(DataSourceError, match=r"copy\.bin is missing"):
        open_indexed(copy)
    Path(copy + ".idx").write_bytes(b"not an index")
    shutil.copy(prefix + ".bin", copy + ".bin")
    with pytest.raises(DataSourceError, match="not a valid index"):
        open_indexed(copy)
    meta = json.loads(Path(prefix + ".json").read_text())
    shutil.copy(prefix + ".idx", copy + ".idx")
    Path(copy + ".json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "other"}))
    with pytest.raises(DataSourceError, match="tokenised with tokenizer other"):
        open_indexed(copy, tokenizer.fingerprint)
    tiny_split = SourceConfig(name="valid", paths=[prefix], format="indexed", doc_range=[0.99, 1.0])
    with pytest.raises(DataSourceError, match="split with no documents"):
        build_data_loader(MixtureConfig(sources=[tiny_split], num_workers=0), tokenizer, 32, 1).__next__()
    all_empty = tmp_path / "empty.jsonl"
    write_jsonl(all_empty, ["", ""])
    assert main(["--input", str(all_empty), "--output-prefix", str(tmp_path / "e"), "--workers", "1", "--quiet"]) == 2
