"""The checkpoint directory of a run: naming, atomic publication, discovery and retention.

    <checkpoint dir>/
        step_00000100/          a complete checkpoint (published by a rename)
        .step_00000200.partial/ being written, or left behind by a crash: never read
        latest                  name of the newest complete checkpoint, replaced atomically

A checkpoint is written under a hidden partial name; only after every rank has written and
flushed its shards, and the description files are written, is it renamed into place (an atomic
rename on POSIX file systems), and only then is `latest` replaced. A reader that follows
`latest` or lists step_* directories therefore never sees a half-written checkpoint.

On an object store (checkpoint dir s3://...; see location.py) there is no rename: the shards go
straight into step_NNNNNNNN/, and the checkpoint counts as complete only once train_state.json,
written last in one PUT, is there; `latest` is written after it. Before a step is (re)written
and before it is deleted, its train_state.json is removed first, so a stale marker never vouches
for other shards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qwen2_megatron.checkpoint.location import Location, is_remote, location, remove_tree, write_text_atomic

LATEST = "latest"
TRAIN_STATE = "train_state.json"  # written last inside a checkpoint: its presence marks completeness
_NAME = re.compile(r"^step_(\d{8,})$")
_PARTIAL = re.compile(r"^\.step_(\d{8,})\.partial$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Listing:
    complete: list[Location]  # oldest first
    incomplete: list[Location]  # partial saves and step_* directories without their state file


class CheckpointStore:
    def __init__(self, root: str | Path) -> None:
        self.remote = is_remote(root)
        self.root = location(root)

    def partial_path(self, step: int) -> Location:
        """Where a save of `step` writes (on an object store: the final prefix itself)."""
        return self.path(step) if self.remote else self.root / f".{step_name(step)}.partial"

    def path(self, step: int) -> Location:
        return self.root / step_name(step)

    def prepare(self, step: int) -> Location:
        """A fresh place to write `step` (a leftover from a crashed save is removed)."""
        partial = self.partial_path(step)
        remove_tree(partial, first=TRAIN_STATE)
        partial.mkdir(parents=True)
        return partial

    def publish(self, step: int) -> Location:
        """Make the finished save of `step` the newest complete checkpoint, then point `latest`
        at it (locally: flush everything and rename the partial directory into place)."""
        final = self.path(step)
        if not self.remote:
            _fsync_tree(self.partial_path(step))
            remove_tree(final, first=TRAIN_STATE)  # the same step saved again (interval, then end)
            os.replace(self.partial_path(step), final)
            _fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, step_name(step) + "\n")
        if not self.remote:
            _fsync_dir(self.root)
        return final

    def listing(self) -> Listing:
        complete, incomplete = [], []
        if not self.root.is_dir():
            return Listing([], [])
        for entry in sorted(self.root.iterdir(), key=lambda e: e.name):
            if _NAME.match(entry.name):
                (complete if (entry / TRAIN_STATE).is_file() else incomplete).append(self.root / entry.name)
            elif _PARTIAL.match(entry.name):
                incomplete.append(entry)
        return Listing(complete, incomplete)

    def latest(self) -> Location | None:
        """The newest complete checkpoint: `latest` if it names one, else the highest step."""
        marker = self.root / LATEST
        complete = self.listing().complete
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if named in complete and named == complete[-1]:
                return named
        return complete[-1] if complete else None

    def retire(self, keep_last: int, keep_every: int) -> list[Location]:
        """Unpublish complete checkpoints beyond the newest `keep_last`, except multiples of
        `keep_every` steps; never the newest one. Only their markers are deleted here (from now
        on they count as incomplete); `remove_tree` deletes the rest. Returns them."""
        complete = self.listing().complete
        doomed = [
            path
            for path in complete[: max(len(complete) - max(keep_last, 1), 0)]
            if not (keep_every and checkpoint_step(path) % keep_every == 0)
        ]
        for path in doomed:
            (path / TRAIN_STATE).unlink(missing_ok=True)
        return doomed


def checkpoint_step(path: Location) -> int:
    match = _NAME.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory name (step_NNNNNNNN)")
    return int(match.group(1))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (the shard writers flush their own files; the
    small ones written beside them are not), so a published checkpoint survives a power loss."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
