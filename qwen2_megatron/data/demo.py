"""The embedded demo corpus and the default demo mixture for CPU runs (tiny Qwen2, seq 128-256).

Real text that needs no download. Built on first use from the running Python (same results on
any CPython of one version):
 - code: the standard library's top-level *.py modules (PSF-2.0), dealt into 8 jsonl shards so
   that the 8 default lanes read whole files;
 - english: the language reference prose in pydoc_data/topics.py (PSF-2.0), one topic per document.
Shipped in demo_corpus/ (see its README for provenance and license), because not every Python
install has CPython's test suite: multilingual (Chinese/Japanese/Korean prose) and math (math
function test vectors and IEEE 754 notes).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from qwen2_megatron.data.config import MixtureConfig, SourceConfig

SHIPPED = Path(__file__).parent / "demo_corpus"
CODE_SHARDS = 8


def default_cache_dir() -> Path:
    base = os.environ.get("QWEN2_MEGATRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen2_megatron")
    return Path(base) / "demo_corpus"


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def build_demo_corpus(root: Path | None = None) -> Path:
    """Write the built part of the corpus under root (once; atomically) and return root."""
    root = Path(root or default_cache_dir())
    if (root / "english.jsonl").is_file():
        return root
    from pydoc_data.topics import topics

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    (staging / "code").mkdir()
    for shard in range(CODE_SHARDS):
        _write_jsonl(staging / "code" / f"{shard:02d}.jsonl", [p.read_text(encoding="utf-8", errors="replace") for p in modules[shard::CODE_SHARDS]])
    _write_jsonl(staging / "english.jsonl", [topics[name] for name in sorted(topics)])
    try:
        staging.rename(root)
    except OSError:  # another process built it first
        shutil.rmtree(staging)
    return root


def demo_sources(root: Path | None = None) -> list[SourceConfig]:
    built = build_demo_corpus(root)
    return [
        SourceConfig(name="code", paths=[str(built / "code")], weight=0.4),
        SourceConfig(name="english", paths=[str(built / "english.jsonl")], weight=0.3),
        SourceConfig(name="multilingual", paths=[str(SHIPPED / "multilingual.jsonl")], weight=0.15),
        SourceConfig(name="math", paths=[str(SHIPPED / "math.jsonl")], weight=0.15),
    ]


def demo_mixture(root: Path | None = None, **overrides) -> MixtureConfig:
    """The default mixture of the CPU demo: code 40%, English 30%, CJK 15%, math 15% of tokens."""
    return MixtureConfig(sources=demo_sources(root), **overrides)
