"""The fork server the tests start `pigeon` processes from (tests/forkserver.py, docs/testing.md
T2): each child is a process of its own that gets the request's arguments, streams, working
directory and environment, reports its exit as subprocess.Popen does, and dies with the server."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node.protocol.content import MAX_TEXT_BYTES
from tests import forkserver
from tests.clitools import Daemon, pigeon_json
from tests.netlab import CAN_MAKE_NAMESPACES, Netlab

pytestmark = pytest.mark.skipif(not forkserver.enabled(),
                                reason="forking is off (PIGEON_TEST_FORK=0) or not Linux")


def test_a_child_gets_the_requests_cwd_environment_and_stdin(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = forkserver.Forked(["init", "--name", "Forked", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "PIGEON_HOME": str(home)})
    assert made.stdout is not None
    account = json.loads(made.stdout.read())
    assert made.wait(30) == 0 and any(home.iterdir())
    assert account["peer_id"] and made.pid != os.getpid()
    # A relative --data-dir is the request's working directory's, not the server's.
    relative = forkserver.Forked(["--data-dir", "rel", "init", "--name", "Rel"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd=tmp_path)
    assert relative.wait(30) == 0 and (tmp_path / "rel").is_dir()
    # stdin reaches the command: the second line is refused by its number.
    lines = "short\n" + "x" * (MAX_TEXT_BYTES + 1) + "\n"
    refused = forkserver.run(["--data-dir", str(home), "send", "nobody", "--stdin"],
                             input=lines, timeout=30)
    assert refused.returncode != 0 and "line 2 of stdin" in refused.stderr
    assert refused.stdout == ""


def test_exit_codes_and_signals_read_as_popen_reports_them(tmp_path: Path) -> None:
    bad = forkserver.run(["no-such-command"], timeout=30)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    pigeon_json(tmp_path / "a", "init", "--name", "A")
    daemon = Daemon(tmp_path / "a")
    assert daemon.process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        daemon.process.wait(timeout=0.05)
    os.kill(daemon.process.pid, signal.SIGKILL)
    assert daemon.process.wait(timeout=10) == -signal.SIGKILL
    # Once reaped, its pid is never signalled again (it may be someone else's by now).
    daemon.process.send_signal(signal.SIGTERM)
    stopped = Daemon(tmp_path / "a")
    stopped.process.terminate()
    assert stopped.process.wait(timeout=15) == 0


def test_poll_in_one_thread_while_another_waits_reads_the_same_exit(tmp_path: Path) -> None:
    """As with Popen, a thread may poll while another waits (tests/test_liveness.py reads a
    daemon's events until poll() says it ended, while the test stops it): both see the exit,
    neither reads from the server's connection after the other closed it."""
    def poll_until_it_ends(process: forkserver.Forked | subprocess.Popen[str],
                           polled: list[int | BaseException]) -> None:
        deadline = time.monotonic() + 30
        try:
            while (code := process.poll()) is None and time.monotonic() < deadline:
                pass
            polled.append(-1 if code is None else code)
        except BaseException as exc:  # reported by the assert below
            polled.append(exc)

    pigeon_json(tmp_path / "a", "init", "--name", "A")
    for _ in range(4):
        daemon = Daemon(tmp_path / "a")
        polled: list[int | BaseException] = []
        poller = threading.Thread(target=poll_until_it_ends, args=(daemon.process, polled))
        poller.start()
        daemon.process.terminate()
        assert daemon.process.wait(timeout=15) == 0
        poller.join(35)
        assert polled == [0]


def test_children_die_with_their_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server of this test process's own: the one a run's workers share serves other tests.
    monkeypatch.delenv(forkserver.SHARED_SERVER_ENV, raising=False)
    pigeon_json(tmp_path / "a", "init", "--name", "A")
    daemon = Daemon(tmp_path / "a")
    server = forkserver._Server.process
    assert server is not None and server.pid != daemon.process.pid
    # A pidfd (pidfd_open(2)) becomes readable when the process ends, whoever reaps it.
    pidfd = os.pidfd_open(daemon.process.pid)
    try:
        server.kill()
        server.wait(10)
        assert daemon.process.wait(timeout=10) == -signal.SIGKILL
        ended, _, _ = select.select([pidfd], [], [], 10)
        assert ended == [pidfd], "the daemon outlived its server"
    finally:
        os.close(pidfd)
    # The next request starts a new server.
    assert forkserver.run(["--help"], timeout=30).returncode == 0


def test_a_shared_server_serves_and_when_it_ends_the_process_starts_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/conftest.py starts one server for a run's xdist workers and names its socket in
    # the environment; a worker whose shared server is gone carries on with one of its own.
    shared, path = forkserver.start_server()
    try:
        forkserver.wait_ready(shared)
        monkeypatch.setenv(forkserver.SHARED_SERVER_ENV, path)
        monkeypatch.setattr(forkserver._Server, "shared_failed", False)
        pigeon_json(tmp_path / "a", "init", "--name", "A")
        daemon = Daemon(tmp_path / "a")
        try:
            assert parent_of(daemon.process.pid) == shared.pid
        finally:
            daemon.stop()
    finally:
        shared.kill()
        shared.wait(10)
    daemon = Daemon(tmp_path / "a")
    try:
        own = forkserver._Server.process
        assert own is not None and own.pid != shared.pid
        assert parent_of(daemon.process.pid) == own.pid
    finally:
        daemon.stop()


def parent_of(pid: int) -> int:
    """The parent's pid of process `pid` (proc(5): /proc/PID/stat, the field after the state)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


@pytest.mark.skipif(not CAN_MAKE_NAMESPACES, reason="making a network namespace needs root and ip")
def test_a_child_runs_in_the_network_namespace_it_asks_for(tmp_path: Path) -> None:
    pigeon_json(tmp_path / "a", "init", "--name", "A")
    with Netlab("x") as lab:
        daemon = Daemon(tmp_path / "a", netns=lab.ns["x"])
        try:
            inside = os.stat(f"/proc/{daemon.process.pid}/ns/net").st_ino
            assert inside == os.stat(f"/var/run/netns/{lab.ns['x']}").st_ino
            assert inside != os.stat("/proc/self/ns/net").st_ino
        finally:
            daemon.stop()
