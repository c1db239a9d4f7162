"""Benchmark of the data pipeline on real text (the demo corpus: stdlib code + English prose).

Prints tokens/s per CPU core for: the raw tokenizer (batch encode, one thread), the streaming
mixture pipeline (read + tokenise + mix + pack + collate) in-process and in one background
worker, qwen2-prepare-data, and reading an indexed dataset. Everything runs single-threaded
(RAYON_NUM_THREADS=1) so the numbers are per core. Usage: python tools/bench_data.py [--seq 2048]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before the tokenizer starts its thread pool
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from qwen2_megatron.data.config import MixtureConfig, SourceConfig  # noqa: E402
from qwen2_megatron.data.demo import build_demo_corpus  # noqa: E402
from qwen2_megatron.data.loader import build_data_loader  # noqa: E402
from qwen2_megatron.data.prepare import prepare  # noqa: E402
from qwen2_megatron.data.tokenizer import QwenTokenizer  # noqa: E402

TOKENS_PER_GPU_7B = 10_000  # performance.md: a 7B model trains at about 10k tokens/s per GPU


def _texts(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in p.read_text(encoding="utf-8").splitlines()]


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:>10,.0f} tokens/s  ({tokens:,} tokens in {seconds:.1f} s)"


def bench_raw(tok: QwenTokenizer, texts: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = sum(len(ids) for i in range(0, len(texts), 256) for ids in tok.encode_batch(texts[i : i + 256]))
    return tokens, time.perf_counter() - start


def bench_loader(config: MixtureConfig, tok: QwenTokenizer, seq: int, tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds for them, seconds to the first batch). With workers the clock starts at the
    first batch (steady state: the worker's start-up is reported separately); in-process it starts
    before the loader is built, so every read and tokenisation is counted."""
    start = time.perf_counter()
    loader = build_data_loader(config, tok, seq, 1)
    done = next(loader)["tokens"].numel()
    first = time.perf_counter() - start
    if config.num_workers:
        start, done = time.perf_counter(), 0
    while done < tokens:
        done += next(loader)["tokens"].numel()
    elapsed = time.perf_counter() - start
    loader.close()
    return done, elapsed, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    root = build_demo_corpus()
    files = sorted((root / "code").glob("*.jsonl")) + [root / "english.jsonl"]
    texts = _texts(files)
    tok = QwenTokenizer()
    sources = [SourceConfig(name="code", paths=[str(root / "code")], weight=0.85),
               SourceConfig(name="english", paths=[str(root / "english.jsonl")], weight=0.15)]
    bench_loader(MixtureConfig(sources=sources, num_lanes=1, num_workers=0), tok, 16, 16)  # warm-up: imports
    # The raw rate is measured before and after the pipeline runs (the machine may be shared).
    raw_tokens, raw_s = bench_raw(tok, texts)
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB, {raw_tokens:,} tokens")
    print(f"raw tokenizer, batch encode, 1 thread:    {_rate(raw_tokens, raw_s)}")
    budget = int(raw_tokens * 0.8)  # stay inside one epoch of both sources
    runs = {}
    for workers in (0, 1):
        config = MixtureConfig(sources=sources, num_lanes=1, num_workers=workers, shuffle_block_docs=16, prefetch_samples=4)
        runs[workers] = bench_loader(config, tok, args.seq, budget)
    after_tokens, after_s = bench_raw(tok, texts)
    print(f"raw tokenizer again:                      {_rate(after_tokens, after_s)}")
    raw_rate = (raw_tokens + after_tokens) / (raw_s + after_s)
    for workers, (done, elapsed, first) in runs.items():
        where = "in-process, all counted" if workers == 0 else "1 worker, steady state "
        print(f"streaming pipeline, {where}: {_rate(done, elapsed)} = {done / elapsed / raw_rate:.2f}x raw; "
              f"first batch after {first:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "demo")
        start = time.perf_counter()
        meta = prepare([str(f) for f in files], prefix, workers=2, progress=False)
        prep_s = time.perf_counter() - start
        print(f"qwen2-prepare-data, 2 worker processes:   {_rate(meta['tokens'], prep_s)} (incl. start-up and merge)")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        start = time.perf_counter()
        read = sum(len(np.array(dataset[i])) for i in range(len(dataset)))  # copied out of the mmap
        print(f"IndexedDataset, read every document:     {_rate(read, time.perf_counter() - start)}")
        config = MixtureConfig(sources=[SourceConfig(name="demo", paths=[prefix], format="indexed")], num_lanes=1, num_workers=0)
        done, elapsed, _ = bench_loader(config, tok, args.seq, int(meta["tokens"] * 0.9))
        print(f"indexed source through the loader:       {_rate(done, elapsed)}")
    worker_rate = runs[1][0] / runs[1][1]
    need = 8 * TOKENS_PER_GPU_7B
    print(f"\nQwen2-7B on 8 GPUs needs about {need:,} tokens/s per node: {need / worker_rate:.1f} streaming "
          f"worker(s) at {worker_rate:,.0f} tokens/s each (one core each; at the anchor rate of 266k raw "
          f"tokens/s per core, {need / (266_000 * worker_rate / raw_rate):.2f}); indexed data needs a fraction of one process")


if __name__ == "__main__":
    main()
