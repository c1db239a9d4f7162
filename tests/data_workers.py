"""Rank functions for the multi-process data test (module level, so spawned ranks can import them)."""

from __future__ import annotations

from pathlib import Path

from megatron.core import parallel_state

from qwen2_megatron.data.loader import build_data_loader
from qwen2_megatron.data.replica import broadcast_batch, replica_fields
from qwen2_megatron.data.tokenizer import QwenTokenizer
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
from tests.data_fixtures import corpus_mixture

SEQ, MBS = 64, 2


def dp_and_tp_ranks(root: str, state: dict) -> dict:
    """DP=2: state_dict gathers over the DP group and resumes. Then TP=2: one loader, broadcast."""
    tokenizer = QwenTokenizer()
    config = corpus_mixture(Path(root), reset_position_ids=True, reset_attention_mask=True)
    init_runtime(ParallelLayout(tp=1))
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    loader = build_data_loader(config, tokenizer, SEQ, MBS, dp_rank, dp_size, parallel_state.get_data_parallel_group())
    loader.load_state_dict(state)
    dp_batches = [next(loader)["tokens"].tolist() for _ in range(3)]
    dp_state = loader.state_dict()
    shutdown_runtime(keep_process_group=True)

    runtime = init_runtime(ParallelLayout(tp=2))
    group, src = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_src_rank()
    owner = parallel_state.get_tensor_model_parallel_rank() == 0
    tp_loader = build_data_loader(config, tokenizer, SEQ, MBS) if owner else None
    fields = replica_fields(True, True, first_stage=True, last_stage=True)
    tp_batches = [
        broadcast_batch(next(tp_loader) if owner else None, fields, MBS, SEQ, group, src, runtime.device)
        for _ in range(2)
    ]
    shutdown_runtime()
    return {"dp_batches": dp_batches, "dp_state": dp_state, "tp_batches": tp_batches}
