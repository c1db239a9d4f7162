"""The parallel layout (TP, SP, PP, VPP, CP, EP, expert-TP, DP) and its validation.

Validation runs on plain integers before torch.distributed or any model memory exists, so a layout
that cannot work fails in milliseconds with a message naming the values and a valid alternative,
instead of as an assertion deep inside megatron-core after minutes of start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen2_megatron.model.shape import Qwen2Shape, padded_vocab_size


class LayoutError(ValueError):
    """A parallel layout that cannot run this model on this many processes."""


@dataclass
class ParallelLayout:
    """Sizes of each parallel dimension; dp=None derives data parallel from the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages (model chunks) per pipeline rank
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None = tp (megatron-core's default)
    dp: int | None = None
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def min_world_size(self) -> int:
        """Fewest processes that realise this layout: data parallel only as far as EP needs."""
        expert_width = self.ep * self.expert_tp
        return self.model_parallel_size * expert_width // math.gcd(self.tp * self.cp, expert_width)

    def world_size(self) -> int:
        if self.dp is None:
            raise LayoutError("parallel.dp is not resolved yet; call resolve(world_size) first")
        return self.model_parallel_size * self.dp

    def resolve(self, world_size: int) -> "ParallelLayout":
        """Check the sizes against the number of processes and fill in dp."""
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r}: must be an integer >= 1")
        if self.etp is not None and self.etp < 1:
            raise LayoutError(f"parallel.etp={self.etp}: must be >= 1 (or null for etp=tp)")
        mp = self.model_parallel_size
        if world_size % mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*"
                f"{self.cp} = {mp}; use a process count that is a multiple of {mp}, or sizes "
                f"whose product divides {world_size}"
            )
        dp = world_size // mp
        if self.dp is not None and self.dp != dp:
            raise LayoutError(
                f"parallel.dp={self.dp} but world size {world_size} / (tp*pp*cp={mp}) = {dp}; "
                f"set parallel.dp={dp} (or null to derive it), or run {mp * self.dp} processes"
            )
        expert_width = self.expert_tp * self.ep
        if (self.tp * self.cp * dp) % expert_width:
            raise LayoutError(
                f"expert parallel ep={self.ep} x expert-tp={self.expert_tp} = {expert_width} must "
                f"divide tp*cp*dp = {self.tp * self.cp * dp} (the ranks of one pipeline stage); "
                f"choose ep among {_divisors(self.tp * self.cp * dp // self.expert_tp)}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError(
                "parallel.sequence_parallel=true needs tensor parallelism (tp > 1); "
                "set parallel.sequence_parallel=false or parallel.tp >= 2"
            )
        if self.vpp is not None:
            if self.vpp < 1:
                raise LayoutError(f"parallel.vpp={self.vpp}: must be >= 1 (or null)")
            if self.vpp > 1 and self.pp == 1:
                raise LayoutError(
                    f"parallel.vpp={self.vpp} (virtual pipeline stages) needs pp > 1; "
                    "set parallel.vpp=null or parallel.pp >= 2"
                )
        return ParallelLayout(
            tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, ep=self.ep, etp=self.etp, dp=dp,
            sequence_parallel=self.sequence_parallel,
        )

    def check_model(
        self, shape: Qwen2Shape, seq_length: int | None = None, have_te: bool = False
    ) -> None:
        """Check that this layout divides the model (and the sequence length, when given)."""
        tp = self.tp
        heads, groups = shape.num_attention_heads, shape.num_key_value_heads
        if heads % tp or groups % tp:
            raise LayoutError(
                f"tp={tp} must divide both model.num_attention_heads={heads} and "
                f"model.num_key_value_heads={groups}; valid tp: {_divisors(math.gcd(heads, groups))}"
            )
        if shape.intermediate_size % tp:
            raise LayoutError(
                f"tp={tp} must divide model.intermediate_size={shape.intermediate_size}; "
                f"valid tp: {_common_divisors(heads, groups, shape.intermediate_size)}"
            )
        if shape.vocab_size % tp:
            raise LayoutError(
                f"model.vocab_size={shape.vocab_size} is not divisible by tp={tp}; pad the "
                f"vocabulary to {padded_vocab_size(shape.vocab_size, tp)} (model.vocab_size) "
                "or choose a tp that divides it"
            )
        stages = self.pp * (self.vpp or 1)
        layers = shape.num_hidden_layers
        if layers % stages:
            what = f"pp*vpp = {self.pp}*{self.vpp}" if self.vpp else f"pp={self.pp}"
            raise LayoutError(
                f"model.num_hidden_layers={layers} is not divisible by {what} = {stages} "
                f"pipeline stages; choose pp (x vpp) among {_divisors(layers)}"
            )
        if shape.is_moe:
            if shape.num_experts % self.ep:
                raise LayoutError(
                    f"ep={self.ep} must divide model.num_experts={shape.num_experts}; "
                    f"valid ep: {_divisors(shape.num_experts)}"
                )
            if shape.moe_intermediate_size % self.expert_tp:
                raise LayoutError(
                    f"expert tensor parallel {self.expert_tp} must divide "
                    f"model.moe_intermediate_size={shape.moe_intermediate_size}"
                )
            if shape.shared_expert_intermediate_size % tp:
                raise LayoutError(
                    f"tp={tp} must divide model.shared_expert_intermediate_size="
                    f"{shape.shared_expert_intermediate_size}"
                )
            if self.ep > 1 and tp > 1 and not self.sequence_parallel:
                raise LayoutError(
                    f"MoE with ep={self.ep} and tp={tp} needs sequence parallelism "
                    "(megatron-core's token dispatchers require it); set "
                    "parallel.sequence_parallel=true"
                )
        elif self.ep > 1:
            raise LayoutError(
                f"ep={self.ep} but the model is dense (model.num_experts=0); set parallel.ep=1"
            )
        if self.cp > 1 and not have_te:
            raise LayoutError(
                f"context parallel cp={self.cp} needs Transformer Engine's attention on a GPU; "
                "set parallel.cp=1 or install transformer-engine (the NGC container has it)"
            )
        if seq_length is not None:
            if seq_length < 1:
                raise LayoutError(f"sequence length {seq_length} must be >= 1")
            if self.cp > 1 and seq_length % (2 * self.cp):
                raise LayoutError(
                    f"sequence length {seq_length} must be divisible by 2*cp = {2 * self.cp} "
                    "(context parallel splits each sequence into 2*cp balanced chunks)"
                )
            if self.sequence_parallel and (seq_length // self.cp) % tp:
                raise LayoutError(
                    f"with sequence parallel, sequence length {seq_length} (per cp rank) must be "
                    f"divisible by tp={tp}; use a multiple of {tp * self.cp}"
                )
            if seq_length > shape.max_position_embeddings:
                raise LayoutError(
                    f"sequence length {seq_length} exceeds model.max_position_embeddings="
                    f"{shape.max_position_embeddings}; raise that or shorten the sequence"
                )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _common_divisors(*values: int) -> list[int]:
    return _divisors(math.gcd(*values))
