"""The realised mixture: per-source token shares, documents, epochs and skips from a data state.

Computed from the (global) loader state, so it is exact for the tokens consumed up to the last
whole micro-batch, and can be logged at any step or read from any checkpoint. Mixing is per
document, so over a short run the share deviates from the target by up to one document per lane.
"""

from __future__ import annotations

from typing import Any


def mixture_report(state: dict[str, Any]) -> dict[str, Any]:
    sources = state["config"]["sources"]
    total_weight = sum(s["weight"] for s in sources)
    lanes = [lane for lane in state["lanes"].values() if lane is not None]
    rows: dict[str, dict[str, Any]] = {}
    for index, source in enumerate(sources):
        rows[source["name"]] = {
            "target_share": source["weight"] / total_weight,
            "tokens": sum(lane["tokens"][index] - _unconsumed(lane, index) for lane in lanes),
            "documents": sum(lane["docs"][index] for lane in lanes),
            "empty_skipped": sum(lane["sources"][index]["empty"] for lane in lanes),
            "epochs": max((lane["sources"][index]["epoch"] for lane in lanes), default=0),
            "ended_in_lanes": sum(bool(lane["ended"][index]) for lane in lanes),
        }
    trained = sum(row["tokens"] for row in rows.values())
    for row in rows.values():
        row["realised_share"] = row["tokens"] / trained if trained else 0.0
    lines = [f"data mixture after {state['consumed']} samples ({trained} tokens):"]
    lines += [
        f"  {name}: realised {row['realised_share']:.3f} (target {row['target_share']:.3f}), "
        f"{row['documents']} docs, epoch {row['epochs']}, {row['empty_skipped']} empty skipped"
        for name, row in rows.items()
    ]
    return {"consumed_samples": state["consumed"], "tokens": trained, "sources": rows, "text": "\n".join(lines)}


def _unconsumed(lane: dict[str, Any], index: int) -> int:
    """Tokens of the lane's current document not yet in a consumed window."""
    current = lane["current"]
    return current["length"] - current["offset"] if current and current["source"] == index else 0
