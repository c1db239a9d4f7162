"""Checkpoint save throughput versus the raw write speed of the same disk, and what an
asynchronous save costs the training step that triggers it.

    python tools/bench_checkpoint.py [--dir /path/on/the/storage] [--layers 8] [--nproc 2] [--write-threads 4]

Builds a Qwen2-0.5B-shaped model (--preset; fewer layers to fit a laptop) with megatron DDP and the
distributed optimizer on `nproc` local ranks and trains it on random tokens (on the GPU where there
is one: --nproc 1 per GPU of the machine). Times: a training
step; full synchronous checkpoints (model + optimizer, torch_dist, fsync'd, published
atomically); asynchronous checkpoints (the part that blocks training, also for each save in order,
as a run's first two saves plan the files and the later ones reuse the plans; then training steps run,
as the trainer's loop does, until the background writer has finished and the save is published;
the time that took beyond as many plain steps is what a save costs training; the host time of the
next step's before_update, where with checkpoint.async_copy=overlap megatron's planning runs and
the copies start; and rank 0's minor
page faults in the step that triggers a save against a plain step's: megatron's default writer is a
forked process, which shares the trainer's memory copy-on-write, so every page of host memory the
step writes while the writer lives is first copied (--async-writer persistent: one writer process
for the run, not forked); then the poll after that step, which with
checkpoint.async_copy=overlap starts the writer, and the later steps beside the writer with their
page faults); and, beside each
synchronous save, a plain sequential write of the same number of bytes with fsync on the same
disk, and the same bytes written into as many files at once as the save writes (ranks x write
threads; a disk or a parallel file system may take several streams faster than one), the three
in an order that rotates from one repetition to the next (this disk wrote slower right after
gigabytes of other writes). The save's speed is given as the median of its ratios to those
writes, since a disk's speed drifts between one repetition and the next. Then loads of the last
synchronous checkpoint (model + optimizer, as a resume does), with every rank reading all the
weights and with
checkpoint.fully_parallel_load (the weights' reading spread over the data-parallel ranks, then
exchanged), the bytes rank 0 read (/proc/self/io rchar: page-cache hits included), and the
verification of the shards' checksums that a resume runs first (each rank its share of the files).
Last, it checks that an asynchronous save writes the state of the step that saved, although its
copy to host memory overlaps the next step (checkpoint.async_copy=overlap, the default on a GPU):
both saves of one state are loaded back and every weight and optimizer tensor compared; a
difference fails the run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from qwen2_megatron.checkpoint.config import CheckpointConfig


def raw_write(path: Path, nbytes: int, streams: int = 1) -> float:
    """Seconds for nbytes written sequentially (8 MiB blocks) into `streams` files at once, one
    thread each (file writes release the GIL), each file then fsync'd."""
    block = os.urandom(8 << 20)
    blocks = max(streams, nbytes // len(block))

    def write(index: int) -> None:
        with open(f"{path}.{index}", "wb") as f:
            for _ in range(blocks // streams + (index < blocks % streams)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(write, range(streams)))
    seconds = time.perf_counter() - start
    for index in range(streams):
        os.unlink(f"{path}.{index}")
    return seconds


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def _state_tensors(models: list, optimizer: object) -> list:
    """Host copies of everything a checkpoint restores into tensors: the weights, and each inner
    optimizer's parameters (the distributed optimizer's fp32 master shards) and Adam states."""
    from qwen2_megatron.train.optimizer import adam_tensors

    stepped, states = adam_tensors(optimizer)
    tensors = [p for model in models for p in model.parameters()] + stepped + states
    return [t.detach().to("cpu", copy=True) for t in tensors]


def save_rank(directory: str, preset: str, layers: int, repeats: int, seq: int, threads: int, precision: str,
              micro_batches: int, write_threads: int, warmup: int, async_copy: str,
              async_writer: str) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist

    from qwen2_megatron.checkpoint.manager import CheckpointManager
    from qwen2_megatron.checkpoint.train_checkpoint import load_training
    from qwen2_megatron.checkpoint.validate import verify_checksums_collectively
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.parallel.ddp import wrap_ddp
    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime
    from qwen2_megatron.train.config import OptimConfig
    from qwen2_megatron.train.optimizer import build_optimizer

    if threads:
        torch.set_num_threads(threads)
    shape = replace(get_preset(preset), num_hidden_layers=layers)
    runtime = init_runtime(ParallelLayout())
    try:
        # before the model, as the trainer does (a manager forks megatron's results-queue helper)
        sync, background = (
            CheckpointManager(
                CheckpointConfig(dir=f"{directory}/{name}", keep_last=1, async_save=name == "async",
                                 write_threads=write_threads, async_copy=async_copy, async_writer=async_writer),
                shape, runtime.layout, precision,
            )
            for name in ("sync", "async")
        )
        chunks = wrap_ddp(build_model(shape, runtime.layout, precision), use_distributed_optimizer=True)
        optimizer = build_optimizer(OptimConfig(), precision, chunks)
        tokens = torch.randint(0, shape.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq)}
        batch = {key: value.to(runtime.device) for key, value in batch.items()}  # a GPU with --nproc 1

        faults: list[int] = []  # minor page faults of each step (copy-on-write ones included)
        holds: list[float] = []  # host time of background.before_update() in each step

        def train_step() -> float:
            dist.barrier()
            start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(chunks, [batch] * micro_batches)
            hold_start = time.perf_counter()
            background.before_update()  # as the trainer does: a staged save is handed over, or still copying
            holds.append(time.perf_counter() - hold_start)
            optimizer.step()
            dist.barrier()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return time.perf_counter() - start

        for _ in range(warmup):  # Adam's state exists from here on (and a GPU has warmed up)
            train_step()
        times: dict[str, list[float]] = {"step": [train_step() for _ in range(repeats)]}
        times["step_faults"] = faults[-repeats:]
        models = [c.module for c in chunks]
        times["sync_save"], times["raw_write"], times["raw_write_parallel"], times["bytes"] = [], [], [], []
        streams = dist.get_world_size() * write_threads  # as many files at once as the save writes
        tasks = ["sync_save", "raw_write", "raw_write_parallel"]
        for step in range(1, repeats + 1):
            # The same bytes written plainly beside each save (disks drift), in a rotating order: a
            # disk slows down after gigabytes written, so a fixed order would favour one of them.
            shift = (step - 1) % len(tasks)
            for task in tasks[shift:] + tasks[:shift]:
                dist.barrier()
                if task == "sync_save":
                    start = time.perf_counter()
                    path = sync.save(step, models, optimizer, {"step": step})
                    times["sync_save"].append(time.perf_counter() - start)
                    sync.wait()  # retention deletes in the background
                    times["bytes"].append(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()))
                elif dist.get_rank() == 0:
                    times[task].append(raw_write(Path(directory) / "raw.bin", times["bytes"][-1],
                                                 streams if task == "raw_write_parallel" else 1))
            dist.barrier()
        for key in ("async_blocking", "staging", "step_while_writing", "step_while_writing_faults", "async_total",
                    "steps_while_writing", "async_cost", "first_poll", "later_steps_while_writing", "later_steps_faults"):
            times[key] = []
        for step in range(1, repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            background.save(step, models, optimizer, {"step": step})
            times["async_blocking"].append(time.perf_counter() - start)
            steps = [train_step()]  # training goes on, as the trainer's loop does, until published
            times["step_while_writing_faults"].append(faults[-1])
            times["staging"].append(holds[-1])
            poll_start = time.perf_counter()
            background.poll()  # with async_copy=overlap this one starts the writer
            times["first_poll"].append(time.perf_counter() - poll_start)
            while background.writing:
                steps.append(train_step())
                times["later_steps_faults"].append(faults[-1])
                background.poll()
            times["step_while_writing"].append(steps[0])
            times["later_steps_while_writing"].extend(steps[1:])
            times["async_total"].append(time.perf_counter() - start)
            times["steps_while_writing"].append(len(steps))
            # what the save cost training in all: the time until published beyond as many plain steps
            times["async_cost"].append(times["async_total"][-1] - len(steps) * min(times["step"]))
        # The asynchronous save against a synchronous one of the same state: what the background
        # writer wrote (its copy overlapping a step that then changed the state) must be that state.
        step = repeats + 1
        path = sync.save(step, models, optimizer, {"step": step})
        sync.wait()
        background.save(step, models, optimizer, {"step": step})
        train_step()
        background.wait()
        loaded = []
        for source in (path, background.store.path(step)):
            load_training(source, models, optimizer, shape, runtime.layout)
            loaded.append(_state_tensors(models, optimizer))
        counts = torch.tensor([sum(not torch.equal(a, b) for a, b in zip(*loaded, strict=True)), len(loaded[0])],
                              device=runtime.device)
        dist.all_reduce(counts)
        times["async_differs"], times["async_compared"] = [int(counts[0])], [int(counts[1])]
        times["verify_checksums"] = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            problem = verify_checksums_collectively(path)  # what a resume runs; its all-gather waits for all
            times["verify_checksums"].append(time.perf_counter() - start)
            if problem is not None:
                raise problem
        for name, fully_parallel in (("load_every_rank_reads_all", False), ("load_reads_spread", True)):
            times[name], times[name + "_bytes_read"] = [], []
            for _ in range(repeats):
                dist.barrier()
                start, before = time.perf_counter(), _bytes_read()
                load_training(path, models, optimizer, shape, runtime.layout, fully_parallel)
                dist.barrier()
                times[name].append(time.perf_counter() - start)
                times[name + "_bytes_read"].append(_bytes_read() - before)
        background.close()
        return times
    finally:
        shutdown_runtime()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--preset", default="qwen2_0.5b", help="model shape (qwen2-model-info lists them)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per micro-batch of the timed training step")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per training step")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads per rank for training (0: torch's default, all cores); fewer leave cores to the "
        "background writer, as a GPU node does",
    )
    parser.add_argument("--write-threads", type=int, default=CheckpointConfig.write_threads,
                        help="files each rank writes in parallel (checkpoint.write_threads)")
    parser.add_argument("--warmup", type=int, default=1, help="training steps before the timed ones (1 or more)")
    parser.add_argument("--async-copy", choices=("auto", "overlap", "at_save"), default=CheckpointConfig.async_copy,
                        help="the asynchronous save's copy of the state to host memory (checkpoint.async_copy)")
    parser.add_argument("--async-writer", choices=("fork", "persistent"), default=CheckpointConfig.async_writer,
                        help="the asynchronous save's writer process: forked per save, or one for the run "
                        "(checkpoint.async_writer)")
    args = parser.parse_args()
    if args.warmup < 1 or args.write_threads < 1:
        parser.error("--warmup and --write-threads must be >= 1")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory: give a directory on the storage to measure")
    from qwen2_megatron.launch.config import LauncherConfig
    from qwen2_megatron.parallel.local_launch import spawn

    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        times = spawn(
            save_rank, args.nproc, str(work / "ckpt"), args.preset, args.layers, args.repeats, args.seq, args.threads,
            args.precision, args.micro_batches, args.write_threads, args.warmup, args.async_copy,
            args.async_writer, env=LauncherConfig().env,  # the trainer's rank environment
        )[0]
        best = {key: min(values) for key, values in times.items() if values}
        nbytes, raw_s, save_s = best["bytes"], best["raw_write"], best["sync_save"]
        ratios = sorted(raw / save for raw, save in zip(times["raw_write"], times["sync_save"]))
        parallel_ratios = sorted(raw / save for raw, save in zip(times["raw_write_parallel"], times["sync_save"]))
        streams = args.nproc * args.write_threads
        slowed = (best["async_blocking"] + best["step_while_writing"]) / best["step"] - 1
        print(f"checkpoint size       {nbytes / 2**30:.2f} GiB ({args.layers}-layer {args.preset} shape, "
              f"model + Adam, {args.nproc} ranks, {args.write_threads} files per rank written in parallel); "
              f"best of {args.repeats} for every time")
        print(f"checkpoint save       {save_s:.2f} s  -> {nbytes / save_s / 1e9:.2f} GB/s")
        print(f"raw write + fsync     {raw_s:.2f} s  -> {nbytes / raw_s / 1e9:.2f} GB/s")
        print(f"ratio                 {statistics.median(ratios):.2f}x of the raw write speed (median of the "
              f"{len(ratios)} save/raw pairs, range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
        print(f"{f'raw write, {streams} files':<22}{best['raw_write_parallel']:.2f} s  -> "
              f"{nbytes / best['raw_write_parallel'] / 1e9:.2f} GB/s (as many files at once as the save writes, "
              "one thread each, fsync'd)")
        print(f"ratio to that         {statistics.median(parallel_ratios):.2f}x (median, range "
              f"{parallel_ratios[0]:.2f}-{parallel_ratios[-1]:.2f}x)")
        threads = f"{args.threads} CPU threads per rank" if args.threads else "torch's default CPU threads"
        print(f"training step         {best['step']:.2f} s ({args.precision}, {args.micro_batches} micro-batch(es) of "
              f"seq {args.seq}, {threads})")
        in_order = ", ".join(f"{t:.3f}" for t in times["async_blocking"])
        print(f"async save            {best['async_blocking']:.3f} s blocking (checkpoint.async_copy="
              f"{args.async_copy}, async_writer={args.async_writer}), then a step of "
              f"{best['step_while_writing']:.2f} s while writing; published after {best['async_total']:.2f} s")
        print(f"  blocking, by save   {in_order} s (rank 0; the first two plan the files, the later ones reuse "
              "the plans)")
        print(f"  staging at update   {statistics.median(times['staging']):.3f} s (median, rank 0: the host work of "
              "the next step's before_update; with async_copy=overlap megatron's planning and the start of the "
              "copies, which on a GPU run while the device computes that step's forward and backward)")
        print(f"step triggering save  {100 * slowed:+.1f}% vs a plain step (async); rank 0's page faults in "
              f"it: {statistics.median(times['step_while_writing_faults']):,.0f} against "
              f"{statistics.median(times['step_faults']):,.0f} in a plain step (medians)")
        print(f"first poll after it   {statistics.median(times['first_poll']):.3f} s (median; with async_copy=overlap "
              "it waits for the copy and starts the writer: a fork, or a request to the persistent one)")
        later = times["later_steps_while_writing"]
        if later:
            print(f"later steps beside it median {statistics.median(later):.2f} s, slowest {max(later):.2f} s "
                  f"({len(later)} steps in all saves) against a plain step's {best['step']:.2f} s; page faults "
                  f"{statistics.median(times['later_steps_faults']):,.0f} (median)")
        cost = statistics.median(times["async_cost"])
        print(f"async save in all     {statistics.median(times['steps_while_writing']):.0f} steps ran until published "
              f"(median), {cost:.2f} s more than plain steps = {cost / best['step']:.2f} steps lost per save")
        differs, compared = sum(times["async_differs"]), times["async_compared"][0]
        print(f"async = sync save     {'yes' if not differs else 'NO'}: {differs} of {compared} tensors differ between "
              "an asynchronous and a synchronous save of the same step (all ranks), after a step beside the copy")
        for name, label in (("load_every_rank_reads_all", "load"), ("load_reads_spread", "load, fully parallel")):
            print(f"{label:<22}{best[name]:.2f} s, {best[name + '_bytes_read'] / 2**30:.2f} GiB read by rank 0")
        print(f"verify checksums      {best['verify_checksums']:.2f} s (before a resume's load; "
              f"{nbytes / best['verify_checksums'] / 1e9:.2f} GB/s over {args.nproc} ranks)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if differs:
        raise SystemExit("the asynchronous save did not write the state of the step that saved")


if __name__ == "__main__":
    main()
