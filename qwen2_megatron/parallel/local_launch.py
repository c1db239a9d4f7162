"""Run a function in N local processes wired up like torchrun does (for CPU runs, tools, tests).

torchrun remains the launcher for training jobs; this is for programs that need a few ranks on
one machine and a return value from each (checkpoint conversion, parity checks). Children are
started with the "spawn" method, so `fn` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank raised; carries that rank's traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 1800) -> list[Any]:
    """Call fn(*args) on ranks 0..nprocs-1 and return their results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, nprocs, port, results, args))
        for rank in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    forwarded = _forward_signals(procs)
    collected: dict[int, Any] = {}
    error = ""
    deadline = time.monotonic() + timeout_s
    while len(collected) < nprocs and not error:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
            if dead:
                error = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
            elif time.monotonic() > deadline:
                error = f"timed out after {timeout_s:.0f} s waiting for ranks"
            continue
        if ok:
            collected[rank] = pickle.loads(value)
        else:
            error = f"rank {rank} failed:\n{value}"
    for proc in procs:  # after a failure the other ranks may wait forever on a collective
        proc.join(timeout=None if not error else 5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for sig, handler in forwarded.items():
        signal.signal(sig, handler)
    if error:
        raise WorkerError(error)
    return [collected[rank] for rank in range(nprocs)]


def _forward_signals(procs: list[Any]) -> dict[int, Any]:
    """Pass SIGUSR1/SIGTERM (preemption, graceful stop) on to the ranks; returns old handlers."""

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be installed from the main thread
    return {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        value = fn(*args)
    except BaseException:  # noqa: BLE001 - the parent reports it with the rank's traceback
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    # By value: torch's queue pickler would pass tensors as shared-memory handles that die with
    # this process.
    results.put((rank, True, pickle.dumps(value)))
