"""MoE observability: the load-balancing aux loss and per-layer expert load.

The aux loss is what megatron-core's routers record in its MoE metrics tracker. Expert load is
counted by forward hooks on each router (its routing map says which experts each token went to)
and summed over all ranks at log time; a layer's imbalance is its busiest expert's token count
over the mean (1.0 = perfectly balanced).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.router import TopKRouter

from qwen2_megatron.model.shape import Qwen2Shape


def aux_loss(shape: Qwen2Shape, microbatches: int) -> float:
    """Mean load-balancing loss per MoE layer for the last step (a collective; clears the tracker)."""
    totals: dict[str, torch.Tensor] = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / microbatches,
        iteration=0,
        force_initialize=True,
        track_names=["load_balancing_loss"],
        num_layers=shape.num_hidden_layers,
        moe_layer_freq=[int(m) for m in shape.moe_layer_pattern()],
        total_loss_dict=totals,
    )
    value = totals.get("load_balancing_loss", 0.0)
    return float(value)


class ExpertLoad:
    """Tokens routed to each expert of each layer since the last report."""

    def __init__(self, chunks: list[torch.nn.Module], shape: Qwen2Shape) -> None:
        device = next(chunks[0].parameters()).device
        self.counts = torch.zeros(shape.num_hidden_layers, shape.num_experts, dtype=torch.float64, device=device)
        self.moe_layers = [i for i, moe in enumerate(shape.moe_layer_pattern()) if moe]
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: torch.nn.Module, _inputs: Any, outputs: Any) -> None:
        routing_map = outputs[1]  # [tokens, experts] booleans
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(self.counts.dtype)

    def report(self) -> dict[str, float]:
        """Per-layer imbalance (max / mean tokens per expert) over all ranks; resets the counts.

        Tokens are counted once per tensor-parallel rank and per pipeline stage that holds the
        layer; ratios are unaffected.
        """
        dist.all_reduce(self.counts)
        stats: dict[str, float] = {}
        for layer in self.moe_layers:
            load = self.counts[layer]
            mean = load.mean().item()
            stats[f"moe_load_imbalance/layer_{layer}"] = load.max().item() / mean if mean else 0.0
        values = [stats[f"moe_load_imbalance/layer_{layer}"] for layer in self.moe_layers]
        stats["moe_load_imbalance"] = sum(values) / len(values)
        self.counts.zero_()
        return stats
