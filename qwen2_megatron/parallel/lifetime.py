"""Child processes that end with the process that started them, even when it is killed with
SIGKILL and so cannot stop them itself (Linux: PR_SET_PDEATHSIG; elsewhere nothing changes)."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this multiprocessing child when its parent dies (the
    parent's thread that started it, to be exact: start children from the main thread)."""
    parent = mp.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent.pid:  # it died before the line above
        os.kill(os.getpid(), signum)
