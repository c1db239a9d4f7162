"""Run a function in N local processes wired up like torchrun does (for CPU runs, tools, tests).

torchrun remains the launcher for training jobs; this is for programs that need a few ranks on
one machine and a return value from each (checkpoint conversion, parity checks). Children are
started with the "spawn" method, so `fn` must be importable (a module-level function).

As under torchrun, each rank runs in a session of its own, and when a rank fails or dies the
launcher stops the others (after a grace period) by killing each rank's whole process group: the
survivors may be waiting forever on a collective, and what a rank started (data workers,
checkpoint writers) would otherwise outlive a rank killed from outside (kill -9, the OOM killer).
A launcher killed itself cannot do that: on Linux the kernel then sends each rank SIGTERM, on
which the trainer saves a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import torch.multiprocessing as mp

from qwen2_megatron.parallel.lifetime import end_with_parent


class WorkerError(RuntimeError):
    """A rank raised; carries that rank's traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(
    fn: Callable[..., Any], nprocs: int, *args: Any, env: dict[str, str] | None = None, timeout_s: float = 1800
) -> list[Any]:
    """Call fn(*args) on ranks 0..nprocs-1 and return their results in rank order. `env` is added
    to the ranks' environment from their start (torch reads some settings only once, at start-up)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, nprocs, port, results, args))
        for rank in range(nprocs)
    ]
    forwarded: dict[int, Any] = {}
    collected: dict[int, Any] = {}
    error = ""
    finished = False
    signalled: dict[int, int] = {}
    try:
        with _environment(env or {}):
            for proc in procs:
                proc.start()
        forwarded = _forward_signals(procs)
        deadline = time.monotonic() + timeout_s
        while len(collected) < nprocs and not error:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    error = _death(dead[0], procs[dead[0]].exitcode)
                elif time.monotonic() > deadline:
                    error = f"timed out after {timeout_s:.0f} s waiting for ranks"
                continue
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                error = f"rank {rank} failed:\n{value}"
        finished = not error
    except KeyboardInterrupt:
        _signal_ranks(procs, signal.SIGINT)  # the ranks are not in the terminal's process group
        raise
    finally:
        if finished:
            for proc in procs:
                proc.join()
        else:  # a failure or an interrupt: the others may wait forever on a collective
            signalled = _stop(procs, set(collected), grace_s=5.0)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if error:
        # The first error is often a survivor's broken connection; name a rank killed from outside.
        causes = [_death(rank, code) for rank, code in signalled.items() if _death(rank, code) not in error]
        raise WorkerError("\n".join([error, *causes]))
    return [collected[rank] for rank in range(nprocs)]


def _signal_ranks(procs: list[Any], signum: int) -> None:
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signum)


def _death(rank: int, exitcode: int) -> str:
    if exitcode >= 0:
        return f"rank {rank} died with exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"rank {rank} died with exit code {exitcode} (killed by {name})"


def _stop(procs: list[Any], done: set[int], grace_s: float) -> dict[int, int]:
    """Give the ranks grace_s to exit, then SIGKILL each rank's process group (the rank and all
    it started, even after the rank itself died), like torchrun; ranks in `done` (which returned
    a result) only if still running. Returns {rank: exit code} of the ranks that had been killed
    by a signal before that."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=max(deadline - time.monotonic(), 0.0))
    signalled = {rank: proc.exitcode for rank, proc in enumerate(procs) if (proc.exitcode or 0) < 0}
    for rank, proc in enumerate(procs):
        if proc.pid is None or (rank in done and not proc.is_alive()):
            continue  # a rank that ended well long ago: its pid may name another group by now
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no group left (or the rank never got to setsid)
            pass
        if proc.is_alive():
            proc.kill()
        proc.join()
    return signalled


def _forward_signals(procs: list[Any]) -> dict[int, Any]:
    """Pass SIGUSR1/SIGTERM (preemption, graceful stop) on to the ranks; returns old handlers."""

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be installed from the main thread
    return {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` added, restored afterwards (a spawned process copies it at start)."""
    saved = os.environ.copy()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    if hasattr(os, "setsid"):
        os.setsid()  # a process group of its own, which _stop can kill as a whole (torchrun does the same)
    end_with_parent(signal.SIGTERM)  # a killed launcher: the trainer saves a checkpoint and stops
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
