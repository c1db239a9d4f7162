"""Bad input: every case named in the issue gives a clear error naming the file and the fix, or a
counted skip; none hangs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen2_megatron.data.config import DataConfigError, MixtureConfig, SourceConfig
from qwen2_megatron.data.loader import build_data_loader
from qwen2_megatron.data.report import mixture_report
from qwen2_megatron.data.sources import DataSourceError
from tests.data_fixtures import english_docs, tokenizer, write_jsonl  # noqa: F401


def _first_batch(tokenizer, *sources: SourceConfig, lanes: int = 1):
    """The loader and its first micro-batch (one sample from each lane)."""
    loader = build_data_loader(MixtureConfig(sources=list(sources), num_lanes=lanes, num_workers=0), tokenizer, 32, lanes)
    return loader, next(loader)


def test_config_errors() -> None:
    good = SourceConfig(name="a", paths=["x.jsonl"])
    cases = [
        (MixtureConfig(sources=[]), "mixture is empty"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=["x"], weight=0)]), "weight=0 must be a positive"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=["x"], weight=-1.0)]), "must be a positive"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=["x"], weight=float("nan"))]), "must be a positive"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=["x"], format="csv")]), "format='csv'"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=[])]), "no paths"),
        (MixtureConfig(sources=[SourceConfig(name="a", paths=["x"], on_exhaustion="stop")]), "on_exhaustion"),
        (MixtureConfig(sources=[good, good]), "unique"),
        (MixtureConfig(sources=[good], num_lanes=0), "num_lanes"),
    ]
    for config, message in cases:
        with pytest.raises(DataConfigError, match=message):
            config.validate()


def test_missing_files(tmp_path, tokenizer) -> None:
    with pytest.raises(DataSourceError, match=r"nope\.jsonl does not exist"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "nope.jsonl")]))
    with pytest.raises(DataSourceError, match="matches no files"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "*.jsonl")]))


def test_corrupt_files_are_named(tmp_path, tokenizer) -> None:
    docs = english_docs()[:6]
    whole = write_jsonl(tmp_path / "ok.jsonl", docs).read_text()
    (tmp_path / "cut.jsonl").write_text(whole[: len(whole) // 2])
    with pytest.raises(DataSourceError, match=r"cut\.jsonl.*truncated; repair"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "cut.jsonl")]))
    pq.write_table(pa.table({"text": docs}), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) - 40])
    with pytest.raises(DataSourceError, match=r"cut\.parquet.*corrupt or truncated"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "cut.parquet")], format="parquet"))
    (tmp_path / "latin1.txt").write_bytes("Café crème, naïve façade.".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin1\.txt.*not UTF-8.*iconv"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "latin1.txt")], format="text"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "Café"}\n'.encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin1\.jsonl.*not UTF-8"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "latin1.jsonl")]))
    with pytest.raises(DataSourceError, match=r"no column 'body' \(columns: \['text'\]\); set text_key"):
        _first_batch(tokenizer, SourceConfig(name="a", paths=[str(tmp_path / "ok.jsonl")], text_key="body"))


def test_an_error_in_a_background_worker_reaches_the_trainer(tmp_path, tokenizer) -> None:
    whole = write_jsonl(tmp_path / "ok.jsonl", english_docs()[:6]).read_text()
    (tmp_path / "cut.jsonl").write_text(whole[: len(whole) // 2])
    config = MixtureConfig(sources=[SourceConfig(name="a", paths=[str(tmp_path / "cut.jsonl")])], num_lanes=1, num_workers=1)
    loader = build_data_loader(config, tokenizer, 32, 1)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)qwen2-data-worker-0 failed.*cut\.jsonl.*truncated"):
            for _ in range(100):
                next(loader)
    finally:
        loader.close()


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer) -> None:
    docs = english_docs()[:4]
    path = write_jsonl(tmp_path / "gaps.jsonl", [docs[0], "", docs[1], "", "", docs[2], docs[3]])
    loader, _ = _first_batch(tokenizer, SourceConfig(name="gaps", paths=[str(path)]))
    for _ in range(200):  # past the end of the first epoch
        next(loader)
    row = mixture_report(loader.state_dict())["sources"]["gaps"]
    assert row["epochs"] >= 1 and row["empty_skipped"] >= 3


def test_sources_too_small_or_all_empty_fail_instead_of_hanging(tmp_path, tokenizer) -> None:
    few = write_jsonl(tmp_path / "few.jsonl", english_docs()[:3])
    with pytest.raises(DataSourceError, match="no non-empty documents for lane 3 of 4.*lower data.num_lanes"):
        _first_batch(tokenizer, SourceConfig(name="few", paths=[str(few)]), lanes=4)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    with pytest.raises(DataSourceError, match="no non-empty documents"):
        _first_batch(tokenizer, SourceConfig(name="blank", paths=[str(blank)]))
