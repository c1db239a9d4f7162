"""Small real-text corpora for the data tests (no synthetic text: real prose, code and CJK)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen2_megatron.data.config import MixtureConfig, SourceConfig
from qwen2_megatron.data.demo import SHIPPED
from qwen2_megatron.data.tokenizer import QwenTokenizer


def english_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def code_docs(count: int = 16, max_bytes: int = 12000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    small = [p for p in sorted(stdlib.glob("*.py")) if 2000 < p.stat().st_size < max_bytes]
    return [p.read_text(encoding="utf-8") for p in small[:count]]


def cjk_docs() -> list[str]:
    return [json.loads(line)["text"] for line in (SHIPPED / "multilingual.jsonl").read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def write_corpus(root: Path) -> dict[str, list[str]]:
    """english: 4 jsonl files; code: 2 parquet files (column "content"); cjk: one .txt per document."""
    root.mkdir(parents=True, exist_ok=True)
    english, code, cjk = english_docs(), code_docs(), cjk_docs()
    for i in range(4):
        write_jsonl(root / f"english-{i}.jsonl", english[i::4])
    for i in range(2):
        pq.write_table(pa.table({"content": code[i::2]}), root / f"code-{i}.parquet")
    (root / "cjk").mkdir(exist_ok=True)
    for i, text in enumerate(cjk):
        (root / "cjk" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return {"english": english, "code": code, "cjk": cjk}


def corpus_mixture(root: Path, **overrides) -> MixtureConfig:
    sources = [
        SourceConfig(name="english", paths=[str(root / "english-*.jsonl")], weight=0.5),
        SourceConfig(name="code", paths=[str(root / "code-*.parquet")], format="parquet", text_key="content", weight=0.3),
        SourceConfig(name="cjk", paths=[str(root / "cjk")], format="text", weight=0.2),
    ]
    settings = dict(num_lanes=4, shuffle_block_docs=8, num_workers=0, seed=7)
    settings.update(overrides)
    return MixtureConfig(sources=sources, **settings)


@pytest.fixture(scope="session")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)
