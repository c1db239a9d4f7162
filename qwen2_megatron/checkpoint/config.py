"""The `checkpoint` section of the trainer's config (apart from the manager, so that reading a
config, as the launcher and the data workers do, does not import megatron-core)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"  # a path on shared storage
    interval: int = 100  # steps between saves; 0 = only at the end and on request
    resume: str = "auto"  # auto | none | a checkpoint directory
    fallback: bool = True  # resume=auto: skip a damaged newest checkpoint for the one before
    keep_last: int = 3  # complete checkpoints kept (the newest is never deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    save_at_end: bool = True
    async_save: bool = False  # write shards in a background process while training goes on
    # async_save's copy of the state to host memory: overlap (during the next step's forward and
    # backward, on a side CUDA stream; the step's update waits for it; the writer starts after that
    # step) | at_save (megatron-core's: the saving step waits for the copy; on a CPU no copy, the
    # writer reads the trainer's memory copy-on-write) | auto (overlap where the state is on a GPU)
    async_copy: str = "auto"
    # async_save's writer: fork (megatron-core's default: a process forked at every save, sharing the
    # trainer's memory copy-on-write) | persistent (one process per rank for the whole run, started
    # with the trainer, reading the shards from staging buffers in shared memory that are kept from
    # save to save: /dev/shm must hold one copy of the node's shards; checkpoint/writer_process.py)
    async_writer: str = "fork"
    # files each rank writes in parallel threads (torch.save and the writes release the GIL); a
    # disk or a parallel file system takes several streams faster than one (README, Checkpoints)
    write_threads: int = 4
    # resume: data-parallel ranks read disjoint parts of the weights and exchange them, so shared
    # storage serves each byte once per replica group instead of once per DP rank (slower on one
    # node's local disk, where the exchange costs more than the reads: README, Checkpoints)
    fully_parallel_load: bool = False
    # resume: read every shard back and check the CRC-32 each record was written with, the files
    # spread over the ranks (a changed byte would otherwise load silently as a wrong weight)
    verify_checksums: bool = True
