"""Crash safety with real processes: `kill -9` of one rank of a running `qwen2-train`.

One run directory, three starts of the installed console script (2 local ranks over gloo, a very
small model with the real Qwen2 vocabulary, the demo corpus with its default data worker per
rank, a checkpoint every 2 steps):

 1. killed during training: once step 2's checkpoint is published and step 3 is logged, rank 1
    is SIGKILLed in step 4, before that step's save begins;
 2. the same command again: it must resume from step 2, train, publish step 4's checkpoint, and
    is then killed during a checkpoint write: rank 0 is SIGKILLed while the hidden
    `.step_00000006.partial` directory exists;
 3. the same command again: it must report and ignore that partial directory, resume from step
    4 (the newest complete checkpoint, written by the resumed run 2) and finish.

Where each kill lands is not left to chance: when the trigger is seen, the ranks are stopped
(SIGSTOP, waiting until the kernel reports them stopped, so no system call such as the final
rename is still in flight), the precondition is checked on disk, and only then is the victim
SIGKILLed (and the other rank continued). During training: the last logged step is 3 and no
partial directory exists, so no rank can be inside a save (the save of step 4 starts after step 4
is logged, and needs both ranks). During a write: the partial directory exists, and rank 0 (the
only rank that publishes, by renaming it) is stopped: it dies with the write unfinished. The
windows (a training step; a whole save) are long next to the reaction (a 2-10 ms poll); if the
test process is starved for all of one, it fails saying so; it does not retry.

After each kill the launcher must notice and exit non-zero within a bounded time, and no process
of the job may be left (ranks, their data workers and anything else they started). Resume at the
same layout is exact, so the steps computed twice must have bit-identical losses
(<run dir>/metrics.jsonl). The module costs about 280-310 s of CPU (megatron's import dominates
each start), i.e. roughly 3 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qwen2_megatron.parallel.local_launch import WorkerError, spawn

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

TRAIN = Path(sys.executable).parent / "qwen2-train"
STEPS, INTERVAL = 8, 2  # checkpoints at steps 2, 4, 6 and 8
RUN_TIMEOUT_S = 600  # a bound for any one wait on a run (a start is ~40 s of CPU)
EXIT_AFTER_KILL_S = 120  # the launcher must exit within this after a kill (7-25 s seen on a loaded machine)
ORPHAN_GRACE_S = 10  # time for the killed job's processes to disappear after the launcher exits
OVERRIDES = [
    # A very small model (the 152k-row embedding dominates: ~5M parameters, 75 MB checkpoints).
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=2", "model.num_key_value_heads=1",
    f"train.steps={STEPS}", "train.seq_length=32", "optim.warmup_steps=1",
    f"checkpoint.interval={INTERVAL}", "log.interval=1", "log.progress_bar=false", "launcher.nproc=2",
]


# ----- processes, from /proc ---------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    start: int  # start time in clock ticks since boot: (pid, start) names one process for good
    state: str
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}, state {self.state}): {self.cmdline[:200]}"


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ")"
    return Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]), fields[0], cmdline.strip())


def _all_procs() -> list[Proc]:
    return [p for e in os.listdir("/proc") if e.isdigit() and (p := _read_proc(int(e))) is not None]


def _descendants(root: int) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for proc in _all_procs():
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def _alive(proc: Proc) -> bool:
    """Still running: the same process (not a reused pid) and not a zombie."""
    now = _read_proc(proc.pid)
    return now is not None and now.start == proc.start and now.state != "Z"


# ----- one start of qwen2-train ------------------------------------------------------------------


class Run:
    """`qwen2-train` in a session of its own; remembers every process of the job it has seen."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.out_path = run_dir.parent / f"{name}.out"
        self.err_path = run_dir.parent / f"{name}.err"
        self.seen: dict[int, Proc] = {}
        self.rank_pids: set[int] = set()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [str(TRAIN), *OVERRIDES, f"run.dir={run_dir}"],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self) -> str:
        return f"--- {self.name} stdout ---\n{self.stdout[-3000:]}\n--- {self.name} stderr ---\n{self.stderr[-3000:]}"

    def remember(self) -> list[Proc]:
        procs = _descendants(self.proc.pid)
        for proc in procs:
            self.seen.setdefault(proc.pid, proc)
        return procs

    def ranks(self, expect: int | None = 2) -> list[Proc]:
        """The rank processes, rank 0 first: the launcher starts them one after the other, in
        rank order (ties of the start time, in clock ticks, are broken by pid)."""
        ranks = [p for p in self.remember() if p.ppid == self.proc.pid and "spawn_main" in p.cmdline]
        ranks.sort(key=lambda p: (p.start, p.pid))
        assert expect is None or len(ranks) == expect, f"{self.name}: expected {expect} ranks, found {ranks}"
        self.rank_pids.update(p.pid for p in ranks)
        return ranks

    def wait_until(self, what: str, ready: Callable[[], Any], poll_s: float, scan: bool = True) -> None:
        """Poll `ready()` until it is true; fails if the run ends first or RUN_TIMEOUT_S passes.
        With `scan`, the job's processes are recorded every 0.5 s meanwhile (a /proc scan:
        too slow for a poll that must react within milliseconds)."""
        deadline, scanned = time.monotonic() + RUN_TIMEOUT_S, 0.0
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {what} after {RUN_TIMEOUT_S} s\n{self.tail()}")
            if scan and time.monotonic() - scanned > 0.5:
                self.remember()
                scanned = time.monotonic()
            time.sleep(poll_s)

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self) -> list[Proc]:
        """Processes of this job still running: every descendant seen, and whatever is in the
        launcher's session or a rank's (the local launcher starts each rank in its own session)."""
        sessions = {self.proc.pid} | self.rank_pids
        found = {p.pid: p for p in _all_procs() if p.session in sessions}
        return [p for p in {**self.seen, **found}.values() if _alive(p)]

    def kill_everything(self) -> None:
        """Clean-up: SIGKILL what is left of this job (each by pid, checked by start time)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for proc in self.leftovers():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Kill:
    """What happened after one rank of a run was SIGKILLed."""

    run: str
    rank: int
    returncode: int | None  # None: the launcher was still running EXIT_AFTER_KILL_S later
    exit_s: float
    leftovers: list[Proc]
    stderr: str = field(repr=False)
    on_disk: Checkpoints | None = None  # the checkpoint directory afterwards


def _freeze(run: Run, procs: list[Proc]) -> None:
    """SIGSTOP, and wait until each is stopped: no system call of theirs is in flight any more."""
    for proc in procs:
        os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    for proc in procs:
        while (now := _read_proc(proc.pid)) is None or now.state not in "Tt":
            if now is None or now.state in "ZX" or time.monotonic() > deadline:
                pytest.fail(f"{run.name}: rank pid {proc.pid} did not stop ({now})\n{run.tail()}")
            time.sleep(0.001)


def _kill_rank(run: Run, rank: int, victim: Proc, stopped: list[Proc]) -> Kill:
    """SIGKILL `victim` (stopped, like the rest of `stopped`, which are continued), then see how
    the launcher reacts and what is left of the job."""
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    for proc in stopped:
        if proc != victim:
            os.kill(proc.pid, signal.SIGCONT)
    returncode = run.wait(EXIT_AFTER_KILL_S)
    exit_s = time.monotonic() - killed
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while (left := run.leftovers()) and returncode is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"{run.name}: launcher exit {returncode} {exit_s:.1f} s after rank {rank} was killed; "
          f"{len(left)} processes left")
    return Kill(run.name, rank, returncode, exit_s, left, run.stderr)


def _last_step(run_dir: Path) -> int:
    starts = _losses(run_dir)
    return max(starts[-1]) if starts else 0


def _losses(run_dir: Path) -> list[dict[int, float]]:
    """metrics.jsonl as one {step: loss} per start (each appends; a resumed one starts lower)."""
    starts: list[dict[int, float]] = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in record:
            if not starts or record["step"] <= max(starts[-1]):
                starts.append({})
            starts[-1][record["step"]] = record["loss"]
    return starts


# ----- the checkpoint directory, as documented in checkpoint/store.py ---------------------------


def _name(step: int) -> str:
    return f"step_{step:08d}"


def _partial(step: int) -> str:
    return f".step_{step:08d}.partial"


@dataclass(frozen=True)
class Checkpoints:
    latest: str | None  # the name in the `latest` marker
    complete: list[str]  # step_* directories with their train_state.json, oldest first
    incomplete: list[str]  # everything else that looks like a checkpoint


def _on_disk(root: Path) -> Checkpoints:
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    steps = [n for n in names if n.startswith("step_") or (n.startswith(".step_") and n.endswith(".partial"))]
    complete = [n for n in steps if n.startswith("step_") and (root / n / "train_state.json").is_file()]
    return Checkpoints(_latest(root), complete, [n for n in steps if n not in complete])


def _latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


# ----- the launcher alone ------------------------------------------------------------------------


def _rank_killed_with_a_child(record: str) -> None:
    """Rank 1 starts a long-lived child (as a data worker or checkpoint writer would be) and is
    then SIGKILLed; rank 0 waits as if in a collective that can no longer complete."""
    if os.environ["RANK"] == "1":
        child = _read_proc(subprocess.Popen(["sleep", "600"]).pid)
        Path(record).write_text(json.dumps({"pid": child.pid, "start": child.start, "killed_at": time.time()}))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def test_launcher_stops_the_other_ranks_and_what_the_dead_one_started(tmp_path: Path) -> None:
    """The same guarantees, in seconds, for spawn() itself (used by qwen2-train and the tools)."""
    record = tmp_path / "child.json"
    child = None
    try:
        with pytest.raises(WorkerError) as failure:
            spawn(_rank_killed_with_a_child, 2, str(record), timeout_s=300)
        known = json.loads(record.read_text())
        took = time.time() - known["killed_at"]
        child = Proc(known["pid"], 0, 0, known["start"], "", "sleep 600")
        deadline = time.monotonic() + ORPHAN_GRACE_S  # SIGKILL takes effect when the target next runs
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"the dead rank's child was left running: {_read_proc(child.pid)}"
    finally:
        if child is not None and _alive(child):
            os.kill(child.pid, signal.SIGKILL)
    assert took < EXIT_AFTER_KILL_S
    assert "rank 1 died with exit code -9 (killed by SIGKILL)" in str(failure.value), failure.value


_LAUNCHER = """
import sys, time
from qwen2_megatron.parallel.local_launch import spawn
from tests.test_checkpoint_faults import _rank_waiting
spawn(_rank_waiting, 2, sys.argv[1])
"""


def _rank_waiting(ready_dir: str) -> None:
    Path(ready_dir, os.environ["RANK"]).write_text(str(os.getpid()))
    time.sleep(600)


def test_ranks_end_with_a_killed_launcher(tmp_path: Path) -> None:
    """kill -9 of the launcher itself (which so cannot stop anything): its ranks get SIGTERM from
    the kernel (the trainer saves and stops on it; this rank function just ends)."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path)], cwd=Path(__file__).parent.parent,
                                start_new_session=True)
    ranks: list[Proc] = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(list(tmp_path.iterdir())) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        ranks = [_read_proc(int(p.read_text())) for p in tmp_path.iterdir()]
        assert all(r is not None and r.ppid == launcher.pid for r in ranks), ranks
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [r for r in ranks if _alive(r)]
        assert not left, f"ranks outlived their killed launcher: {left}"
    finally:
        for rank in ranks:
            if rank is not None and _alive(rank):
                os.kill(rank.pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# ----- the scenario ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    ckpt = run_dir / "checkpoints"
    facts: dict[str, Any] = {"ckpt": ckpt}

    first = Run(run_dir, "1-killed-in-training")
    try:
        first.wait_until("2 ranks", lambda: len(first.ranks(expect=None)) == 2, poll_s=0.2)
        rank0, rank1 = first.ranks()
        first.wait_until("checkpoint of step 2", lambda: _latest(ckpt) == _name(2), poll_s=0.1)
        first.remember()  # the ranks' data workers run by now
        first.wait_until("step 3 in metrics.jsonl", lambda: _last_step(run_dir) >= 3, poll_s=0.01, scan=False)
        _freeze(first, [rank0, rank1])
        at, disk = _last_step(run_dir), _on_disk(ckpt)
        if at != 3 or disk.incomplete or disk.latest != _name(2):
            pytest.fail(f"the test was too slow to stop the ranks in step 4: last step {at}, {disk}")
        facts["training"] = _kill_rank(first, 1, rank1, stopped=[rank0, rank1])
    finally:
        first.kill_everything()
    facts["training"].on_disk = _on_disk(ckpt)

    second = Run(run_dir, "2-resumed-then-killed-in-save")
    facts["second"] = second
    partial = ckpt / _partial(6)
    try:
        second.wait_until("2 ranks", lambda: len(second.ranks(expect=None)) == 2, poll_s=0.2)
        rank0, rank1 = second.ranks()
        second.wait_until("checkpoint of step 4", lambda: _latest(ckpt) == _name(4), poll_s=0.05)
        second.remember()
        second.wait_until(partial.name, partial.exists, poll_s=0.002, scan=False)
        _freeze(second, [rank0])
        if not partial.exists() or _latest(ckpt) != _name(4):
            pytest.fail(f"the test was too slow to stop rank 0 inside the save of step 6: {_on_disk(ckpt)}")
        facts["save"] = _kill_rank(second, 0, rank0, stopped=[rank0])
    finally:
        second.kill_everything()
    facts["save"].on_disk = _on_disk(ckpt)

    third = Run(run_dir, "3-resumed")
    facts["third"] = third
    try:
        facts["third_returncode"] = third.wait(RUN_TIMEOUT_S)
    finally:
        third.kill_everything()
    facts["third_on_disk"] = _on_disk(ckpt)
    facts["losses"] = _losses(run_dir)
    return facts


@pytest.mark.parametrize("when", ["training", "save"])
def test_launcher_exits_soon_after_a_rank_is_killed(scenario: dict, when: str) -> None:
    kill: Kill = scenario[when]
    assert kill.returncode is not None, f"{kill.run}: still running {EXIT_AFTER_KILL_S} s after the kill"
    assert kill.returncode == 1, kill.stderr[-3000:]
    assert "error: training failed on a rank" in kill.stderr, kill.stderr[-3000:]
    # The launcher names the rank killed from outside (whichever failure it saw first).
    assert f"rank {kill.rank} died with exit code -9 (killed by SIGKILL)" in kill.stderr, kill.stderr[-3000:]


@pytest.mark.parametrize("when", ["training", "save"])
def test_no_process_of_the_killed_job_is_left(scenario: dict, when: str) -> None:
    kill: Kill = scenario[when]
    assert not kill.leftovers, f"{kill.run}: left behind:\n" + "\n".join(map(str, kill.leftovers))


def test_kill_during_training_resumes_from_the_newest_complete_checkpoint(scenario: dict) -> None:
    ckpt: Path = scenario["ckpt"]
    disk = scenario["training"].on_disk
    assert disk == Checkpoints(_name(2), [_name(2)], []), disk
    second: Run = scenario["second"]
    out = second.stdout
    assert f"resumed from {ckpt / _name(2)} (step 2)" in out, second.tail()
    assert "ignoring incomplete checkpoint" not in out, second.tail()
    killed, resumed = scenario["losses"][:2]
    assert sorted(killed) == [1, 2, 3] and sorted(resumed) == [3, 4, 5, 6], (killed, resumed)
    assert resumed[3] == killed[3], (killed, resumed)  # bit-identical: step 3 computed again


def test_kill_during_checkpoint_write_leaves_a_partial_that_is_reported_and_ignored(scenario: dict) -> None:
    ckpt: Path = scenario["ckpt"]
    disk = scenario["save"].on_disk
    assert disk.incomplete == [_partial(6)], f"the kill missed the write of step 6's checkpoint: {disk}"
    assert disk.latest == disk.complete[-1] == _name(4), disk
    third: Run = scenario["third"]
    assert scenario["third_returncode"] == 0, third.tail()
    out = third.stdout
    assert f"ignoring incomplete checkpoint {ckpt / _partial(6)} (its save did not finish)" in out, third.tail()
    assert f"resumed from {ckpt / _name(4)} (step 4)" in out, third.tail()
    assert f"over {STEPS - 4} steps" in out, third.tail()
    after = scenario["third_on_disk"]  # step 6 was saved again by the third run: nothing is incomplete
    assert after.latest == _name(STEPS) and after.incomplete == [], after
    killed, resumed = scenario["losses"][1:]
    assert sorted(killed) == [3, 4, 5, 6] and sorted(resumed) == [5, 6, 7, 8], (killed, resumed)
    assert [resumed[5], resumed[6]] == [killed[5], killed[6]], (killed, resumed)  # bit-identical
