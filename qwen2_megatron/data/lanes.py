"""Building lanes from a mixture config and running a rank's lanes in its consumption order.

This code runs either in the training process (num_workers=0) or in background worker
processes; it imports neither torch nor megatron unless an indexed source needs megatron's reader.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from qwen2_megatron.data.config import MixtureConfig
from qwen2_megatron.data.indexed import IndexedSource
from qwen2_megatron.data.mixture import DocumentSource, Lane
from qwen2_megatron.data.sources import StreamedSource, setup_worker_process
from qwen2_megatron.data.tokenizer import QwenTokenizer

LaneItem = tuple[int, np.ndarray | None, dict]  # (lane, window or None at the end, lane state after it)


def build_lane(
    config: MixtureConfig, seq_length: int, lane: int, files: list[list[str]], tokenizer: QwenTokenizer
) -> Lane:
    sources: list[DocumentSource] = []
    for index, source in enumerate(config.sources):
        common = dict(lane=lane, num_lanes=config.num_lanes, seed=config.seed, shuffle=config.shuffle,
                      heldout=(config.split == "heldout", config.heldout_fraction))
        if source.format == "indexed":
            sources.append(IndexedSource(source, index, tokenizer.fingerprint, **common))
        else:
            sources.append(
                StreamedSource(source, index, files[index], tokenizer, block_docs=config.shuffle_block_docs, **common)
            )
    return Lane(sources, config.weights(), seq_length)


def run_lanes(
    config: MixtureConfig, seq_length: int, files: list[list[str]], tokenizer: QwenTokenizer,
    order: list[int], states: dict[int, dict | None],
) -> Iterator[LaneItem]:
    """Windows of the lanes in `order`, cyclically, each with the lane's state after it."""
    lanes: dict[int, Lane] = {}
    for lane in order:
        lanes[lane] = build_lane(config, seq_length, lane, files, tokenizer)
        if states.get(lane) is not None:
            lanes[lane].load_state(states[lane])
    while True:
        for lane in order:
            window = lanes[lane].next_window()
            yield lane, window, lanes[lane].state()
            if window is None:
                return


def worker_main(
    config: MixtureConfig, seq_length: int, files: list[list[str]], tokenizer_path: str,
    order: list[int], states: dict[int, dict | None], out: Any,
) -> None:
    """Entry point of a background worker: fills `out` until killed, the lanes end, or an error."""
    setup_worker_process()
    try:
        tokenizer = QwenTokenizer(tokenizer_path)
        for item in run_lanes(config, seq_length, files, tokenizer, order, states):
            out.put(item)
    except BaseException:  # noqa: BLE001 - the loader re-raises it with this traceback
        out.put(("error", traceback.format_exc(), {}))
