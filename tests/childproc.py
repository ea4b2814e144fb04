"""Processes the tests start die with the test process that started them.

A `pigeon run` daemon or relay left behind by an interrupted run (a worker killed by a timeout,
Ctrl-C in the middle of a fixture, `kill` of pytest) would otherwise keep running, holding CPU and
ports, and slow every later run on the machine. Linux's PR_SET_PDEATHSIG (prctl(2)) has the
kernel send SIGKILL to the child when the thread that started it ends; so it is set only when the
process is started from the main thread (a worker thread that ends would kill its child early).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

__all__ = ["die_with_parent"]


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen (or None where it cannot apply: not Linux, or not the
    main thread)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec
