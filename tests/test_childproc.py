"""The processes tests start die with the process that started them (tests/childproc.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: A parent that starts a long sleeper the way tests/clitools.py starts a daemon, prints the
#: sleeper's pid, and then waits to be killed.
PARENT = """
import subprocess, sys, time
from tests.childproc import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def test_a_child_is_killed_when_the_test_process_that_started_it_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30  # a hang guard: the kernel kills it at once
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived the process that started it"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_without_it_the_child_would_outlive_its_parent() -> None:
    """The control: the same parent without the setting leaves its child running."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.replace("die_with_parent()", "None")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        time.sleep(0.5)  # the kernel's SIGKILL would have landed by now; nothing should come
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
