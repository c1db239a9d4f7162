"""Where the device waits: idle gaps between kernels in a torch.profiler capture.

A step can be slower than its kernels add up to: the device idles while the host prepares work
(launch overhead, Python, a synchronisation that drained the queue). bench_throughput.py's
--profile appends this report to its kernel table: the device's busy time (the union of kernel
intervals) against the span from the first kernel to the last, and the longest gaps, each with
the kernels around it and the host operations that started while the device waited.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

Interval = tuple[float, float, str]  # start, end (microseconds), name


def idle_gaps(kernels: list[Interval], host_ops: list[Interval], top: int = 8) -> dict[str, Any]:
    """The device's busy and idle time from its kernels, and the `top` longest gaps.

    Each gap: its length, the kernel that ended last before it and the one that starts it, and
    the names of the host operations that started within it, longest first (at most four).
    """
    if not kernels:
        return {"span_us": 0.0, "busy_us": 0.0, "gaps": [], "gap_count": 0}
    ordered = sorted(kernels)
    busy, gaps = 0.0, []
    start, end, last = ordered[0][0], ordered[0][1], ordered[0][2]
    for k_start, k_end, name in ordered[1:]:
        if k_start > end:
            busy += end - start
            gaps.append((k_start - end, end, k_start, last, name))
            start, end, last = k_start, k_end, name
        elif k_end > end:
            end, last = k_end, name
    busy += end - start
    span = end - ordered[0][0]
    longest = sorted(gaps, reverse=True)[:top]
    report = []
    for length, g_start, g_end, before, after in longest:
        waiting = Counter()
        for h_start, h_end, name in host_ops:
            if g_start <= h_start < g_end:
                waiting[name] += h_end - h_start
        report.append({"us": length, "after": before, "before": after,
                       "host_ops": [name for name, _ in waiting.most_common(4)]})
    return {"span_us": span, "busy_us": busy, "gaps": report, "gap_count": len(gaps)}


def describe(result: dict[str, Any]) -> str:
    """The report as text lines."""
    if not result["span_us"]:
        return "device idle gaps: no device kernels in the profile"
    span, busy = result["span_us"], result["busy_us"]
    lines = [f"device busy {busy / 1e3:.1f} of {span / 1e3:.1f} ms from the first kernel to the last "
             f"({100 * busy / span:.1f}%); idle {(span - busy) / 1e3:.1f} ms in {result['gap_count']} gaps; longest:"]
    for gap in result["gaps"]:
        ops = ", ".join(gap["host_ops"]) or "none"
        lines.append(f"  {gap['us'] / 1e3:7.3f} ms after {gap['after'][:60]} | before {gap['before'][:60]} | "
                     f"host ops started in it: {ops}")
    return "\n".join(lines)


def from_profiler(prof: Any, top: int = 8) -> str:
    """describe(idle_gaps(...)) of a finished torch.profiler.profile."""
    from torch.autograd import DeviceType

    kernels, host = [], []
    for event in prof.events():
        interval = (event.time_range.start, event.time_range.end, event.name)
        (kernels if event.device_type == DeviceType.CUDA else host).append(interval)
    return describe(idle_gaps(kernels, host, top))
