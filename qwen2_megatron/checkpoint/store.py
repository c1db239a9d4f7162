"""The checkpoint directory of a run: naming, atomic publication, discovery and retention.

    <checkpoint dir>/
        step_00000100/          a complete checkpoint (published by a rename)
        .step_00000200.partial/ being written, or left behind by a crash: never read
        latest                  name of the newest complete checkpoint, replaced atomically

A checkpoint is written under a hidden partial name; only after every rank has written and
flushed its shards, and the description files are written, is it renamed into place (an atomic
rename on POSIX file systems), and only then is `latest` replaced. A reader that follows
`latest` or lists step_* directories therefore never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

LATEST = "latest"
TRAIN_STATE = "train_state.json"  # written last inside a checkpoint: its presence marks completeness
_NAME = re.compile(r"^step_(\d{8,})$")
_PARTIAL = re.compile(r"^\.step_(\d{8,})\.partial$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Listing:
    complete: list[Path]  # oldest first
    incomplete: list[Path]  # partial saves and step_* directories without their state file


class CheckpointStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def partial_path(self, step: int) -> Path:
        return self.root / f".{step_name(step)}.partial"

    def path(self, step: int) -> Path:
        return self.root / step_name(step)

    def prepare(self, step: int) -> Path:
        """A fresh partial directory for `step` (a leftover from a crashed save is replaced)."""
        partial = self.partial_path(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def publish(self, step: int) -> Path:
        """Rename the finished partial directory into place, then point `latest` at it."""
        final = self.path(step)
        _fsync_tree(self.partial_path(step))
        if final.exists():  # the same step saved again (e.g. at the end after an interval save)
            shutil.rmtree(final)
        os.replace(self.partial_path(step), final)
        _fsync_dir(self.root)
        marker = self.root / f".{LATEST}.tmp"
        marker.write_text(step_name(step) + "\n")
        with open(marker, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(marker, self.root / LATEST)
        _fsync_dir(self.root)
        return final

    def listing(self) -> Listing:
        complete, incomplete = [], []
        if not self.root.is_dir():
            return Listing([], [])
        for entry in sorted(self.root.iterdir()):
            if _NAME.match(entry.name):
                (complete if (entry / TRAIN_STATE).is_file() else incomplete).append(entry)
            elif _PARTIAL.match(entry.name):
                incomplete.append(entry)
        return Listing(complete, incomplete)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it names one, else the highest step."""
        marker = self.root / LATEST
        complete = self.listing().complete
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if named in complete and named == complete[-1]:
                return named
        return complete[-1] if complete else None

    def retain(self, keep_last: int, keep_every: int) -> list[Path]:
        """Delete complete checkpoints beyond the newest `keep_last`, except multiples of
        `keep_every` steps; never the newest one. Returns what was deleted."""
        complete = self.listing().complete
        doomed = [
            path
            for path in complete[: max(len(complete) - max(keep_last, 1), 0)]
            if not (keep_every and checkpoint_step(path) % keep_every == 0)
        ]
        for path in doomed:
            shutil.rmtree(path)
        return doomed


def checkpoint_step(path: Path) -> int:
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
