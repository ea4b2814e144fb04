"""What the tests that build network namespaces share.

Some labs put addresses on interfaces of the machine's own (root) namespace, where every test
process sees them: two such labs at once (two xdist workers, or two test runs side by side)
would put the same subnet on two interfaces and break each other's routes. `root_namespace_lock`
lets one lab at a time hold those addresses, across processes.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["root_namespace_lock"]

LOCK_FILE = Path(tempfile.gettempdir()) / "pigeon-tests-root-namespace.lock"


@contextmanager
def root_namespace_lock() -> Iterator[None]:
    """Hold the machine-wide lock for labs with addresses in the root namespace (blocks until
    the lab before it is torn down; the lock dies with its process)."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
