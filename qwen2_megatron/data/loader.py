"""The data loader the trainer iterates: micro-batches for one data-parallel rank, exactly resumable.

Design (why it looks like this):
 - Global order. Samples (windows of seq_length + 1 tokens) have global indices g = 0, 1, ...
   Sample g is the (g // L)-th window of lane g % L, where L = data.num_lanes. Each lane is an
   independent, deterministic mixture over its own share of every source's documents (lanes.py,
   mixture.py, sources.py), so the sequence of samples depends on the config and the seed only.
 - Data parallelism. DP rank r of D takes samples C0 + r, C0 + r + D, ... (C0: samples consumed
   before the run started), i.e. whole lanes when D divides L. Ranks get disjoint data and every
   rank reads and tokenises only its own lanes, so the tokenising work is divided by D rather than
   repeated on every rank. With another D after a restart, the lanes are dealt anew and the global
   sequence continues unchanged: L must be a multiple of every DP size the run may use.
 - Workers. A rank's lanes are spread over `num_workers` background processes (useful up to
   L / D of them). Which worker produced a window does not affect the window.
 - State. state_dict() is global: it gathers every rank's lane states, so the same small
   JSON-serialisable dict comes back on every rank (save it once) and loads into any DP size:
   {"version", "config", "consumed", "lanes": {lane: lane state or null}}. A lane state holds per
   source a cursor (epoch, file, row, block position, empty documents skipped), the tokens and
   documents drawn, whether it ended, and the partly consumed document with its offset (mixture.py).
 - TP/CP/PP peers of one replica share a DP rank: build the loader on one of them and broadcast,
   or build it on each (identical output); batch_for_stage drops fields a stage does not use.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from qwen2_megatron.data.batch import collate
from qwen2_megatron.data.config import DataConfigError, MixtureConfig
from qwen2_megatron.data.lanes import LaneItem, run_lanes, worker_main
from qwen2_megatron.data.sources import DataSourceError, resolve_files
from qwen2_megatron.data.tokenizer import QwenTokenizer

STATE_VERSION = 1
_POLL_S = 1.0


class DataExhausted(StopIteration):
    """Every source of a lane has ended (all sources use on_exhaustion="end")."""


def _config_key(config: MixtureConfig, seq_length: int) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume, for the sample order to hold."""
    sources = [
        {k: v for k, v in asdict(s).items() if k in ("name", "format", "weight", "text_key", "on_exhaustion", "doc_range")}
        for s in config.sources
    ]
    return {"num_lanes": config.num_lanes, "seq_length": seq_length, "seed": config.seed,
            "shuffle": config.shuffle, "shuffle_block_docs": config.shuffle_block_docs, "sources": sources,
            "heldout_fraction": config.heldout_fraction, "split": config.split}


class MixtureDataLoader:
    """Iterates micro-batch dicts {"tokens", "labels", "loss_mask"[, "position_ids", "attention_mask"]}."""

    def __init__(
        self, config: MixtureConfig, tokenizer: QwenTokenizer, seq_length: int, micro_batch_size: int,
        dp_rank: int = 0, dp_size: int = 1, dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        config.validate()
        if seq_length < 1 or micro_batch_size < 1:
            raise DataConfigError(f"seq_length={seq_length} and micro_batch_size={micro_batch_size} must be >= 1")
        config.check_dp_size(dp_size)
        if not 0 <= dp_rank < dp_size:
            raise DataConfigError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
        self.config, self.tokenizer, self.seq_length = config, tokenizer, seq_length
        self.micro_batch_size, self.dp_rank, self.dp_size, self.dp_group = micro_batch_size, dp_rank, dp_size, dp_group
        self.files = [[] if s.format == "indexed" else resolve_files(s) for s in config.sources]
        self._key = _config_key(config, seq_length)
        self._lane_states: dict[int, dict | None] = {lane: None for lane in range(config.num_lanes)}
        self._start = 0  # global samples consumed when this loader (re)started
        self._taken = 0  # samples this rank consumed since then
        self._stream: Iterator[LaneItem] | None = None
        self._workers: list[tuple[mp.process.BaseProcess, Any]] = []

    # ----- order -----------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """This rank's lanes in the order it consumes them (cyclically)."""
        per_rank = self.config.num_lanes // self.dp_size
        return [(self._start + self.dp_rank + i * self.dp_size) % self.config.num_lanes for i in range(per_rank)]

    def _start_stream(self) -> None:
        self._start, self._taken = self._start + self._taken * self.dp_size, 0
        order = self._order()
        states = {lane: self._lane_states[lane] for lane in order}
        workers = min(self.config.num_workers, len(order))
        if workers == 0:
            self._stream = run_lanes(self.config, self.seq_length, self.files, self.tokenizer, order, states)
            return
        ctx = mp.get_context("spawn")
        for w in range(workers):
            out = ctx.Queue(maxsize=self.config.prefetch_samples)
            mine = order[w::workers]
            args = (self.config, self.seq_length, self.files, self.tokenizer.path, mine, {l: states[l] for l in mine}, out)
            proc = ctx.Process(target=worker_main, args=args, daemon=True, name=f"qwen2-data-worker-{w}")
            proc.start()
            self._workers.append((proc, out))
        self._stream = self._from_workers(len(order))

    def _from_workers(self, lanes: int) -> Iterator[LaneItem]:
        position = 0
        while True:
            proc, out = self._workers[position % len(self._workers)]
            waited = 0.0
            while True:
                try:
                    item = out.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    waited += _POLL_S
                    if not proc.is_alive():
                        raise RuntimeError(f"data worker {proc.name} died (exit code {proc.exitcode})") from None
                    if waited >= self.config.worker_timeout_s:
                        raise TimeoutError(
                            f"data worker {proc.name} produced nothing for {waited:.0f} s (a stalled read?); "
                            f"raise data.worker_timeout_s if the sources are that slow"
                        ) from None
            if item[0] == "error":
                raise RuntimeError(f"data worker {proc.name} failed:\n{item[1]}")
            yield item
            position = (position + 1) % lanes

    # ----- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "MixtureDataLoader":
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._stream is None:
            self._start_stream()
        windows: list[np.ndarray] = []
        pending: dict[int, dict] = {}
        for _ in range(self.micro_batch_size):
            lane, window, state = next(self._stream)
            if window is None and self.config.split == "heldout":
                raise DataSourceError(
                    f"the held-out split has no documents (data.heldout_fraction="
                    f"{self.config.heldout_fraction}); raise data.heldout_fraction"
                )
            if window is None:
                raise DataExhausted(f"lane {lane}: every data source has ended")
            windows.append(window)
            pending[lane] = state
        # Only whole micro-batches count as consumed, so a state is always at a batch boundary.
        self._lane_states.update(pending)
        self._taken += self.micro_batch_size
        return collate(windows, self.config.reset_position_ids, self.config.reset_attention_mask)

    # ----- state -------------------------------------------------------------------------------

    def local_state(self) -> dict[str, Any]:
        """This rank's part of the data state (merge_states combines the parts of all DP ranks)."""
        return {"version": STATE_VERSION, "config": self._key, "consumed": self._start + self._taken * self.dp_size,
                "lanes": {str(lane): self._lane_states[lane] for lane in self._order()}}

    def state_dict(self) -> dict[str, Any]:
        """The global data state, identical on every rank (a collective over the DP group)."""
        local = self.local_state()
        if self.dp_size == 1:
            return merge_states([local])
        parts: list[Any] = [None] * self.dp_size
        dist.all_gather_object(parts, local, group=self.dp_group)
        return merge_states(parts)

    def load_state_dict(self, state: dict[str, Any], seq_length_changed: bool = False) -> None:
        """Continue from `state`. seq_length_changed=True accepts a state saved at another sequence
        length (a sequence-length stage): the lanes' document streams continue where they were,
        cut into windows of the new length."""
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        ignored = {"seq_length"} if seq_length_changed else set()
        changed = sorted(k for k in self._key if k not in ignored and state["config"].get(k) != self._key[k])
        if changed:
            raise DataConfigError(
                f"the data state was saved with a different mixture ({changed} changed): resuming would "
                f"not continue the same sample sequence; restore those settings or start the data afresh"
            )
        self.close()
        self._lane_states = {int(lane): s for lane, s in state["lanes"].items()}
        self._start, self._taken = state["consumed"], 0

    def close(self) -> None:
        """Stop the background workers (they hold prefetched windows only)."""
        for proc, _ in self._workers:
            proc.kill()
            proc.join()
        self._workers, self._stream = [], None


def merge_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One global state from the local states of all DP ranks, taken at the same step."""
    consumed = {p["consumed"] for p in parts}
    if len(consumed) != 1:
        raise RuntimeError(
            f"data-parallel ranks are at different sample counts {sorted(consumed)}; save the data "
            "state at a step boundary, where every rank has taken the same number of micro-batches"
        )
    lanes: dict[str, Any] = {}
    for part in parts:
        lanes.update(part["lanes"])
    num_lanes = parts[0]["config"]["num_lanes"]
    if sorted(lanes, key=int) != [str(i) for i in range(num_lanes)]:
        raise RuntimeError(f"the ranks' data states cover lanes {sorted(lanes, key=int)}, not 0..{num_lanes - 1}")
    return {**parts[0], "lanes": lanes}


def build_data_loader(
    config: MixtureConfig, tokenizer: QwenTokenizer | None, seq_length: int, micro_batch_size: int,
    dp_rank: int = 0, dp_size: int = 1, dp_group: dist.ProcessGroup | None = None,
    model_vocab_size: int | None = None,
) -> MixtureDataLoader:
    """The trainer's entry point. tokenizer=None loads config.tokenizer (default: the installed
    Qwen2 tokenizer); a model_vocab_size is checked against the tokenizer first."""
    tokenizer = tokenizer or QwenTokenizer(config.tokenizer)
    if model_vocab_size is not None:
        tokenizer.check_model_vocab(model_vocab_size)
    return MixtureDataLoader(config, tokenizer, seq_length, micro_batch_size, dp_rank, dp_size, dp_group)
