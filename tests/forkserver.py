"""`pigeon` processes for tests, forked from a server that has already imported the node.

Most of the suite's CPU went into starting `pigeon` processes: a daemon spends ~0.9 s of its
~1.3 s of CPU importing trio, libp2p and the node before it does anything, and a test of the
command line starts dozens of them (docs/testing.md T1, T2). A fork server pays the imports
once per test process: it imports `node` and everything a command loads, then for each request
forks a child that runs `node.cli.main` with the request's arguments, environment, working
directory, standard streams and, if asked, network namespace.

The child is a real process of its own, running the real command: its own pid (kill -9 works as
on any process), its own sockets, files and event loop, nothing shared with the test process.
What it skips is the interpreter's start and the imports, so the tests that are about those run
`python -m node` by exec as before (tests/test_layers.py, tests/test_cli_newcomer.py's import
checks, the demo in tests/test_cli.py). `PIGEON_TEST_FORK=0` makes every test start its
processes by exec, as a user would.

Requests, on a Unix socket: the client sends one message, a 4-byte big-endian length and a JSON
object `{"argv": [...], "cwd": str, "env": {...}, "netns": str | null}`, with its stdin, stdout
and stderr attached (SCM_RIGHTS); the server answers `pid N\n` once forked and `exit S\n` when
the child has ended, where S is a `subprocess.Popen.returncode` (negative for a signal).
Closing the connection early does not stop the child.

`Forked` is the client's side, with the part of `subprocess.Popen` the tests use.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import gc
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from tests.childproc import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
#: The modules a `pigeon` command may load, imported by the server before it forks.
PRELOAD = ("node.cli", "node.cli.device", "node.cli.relay", "node.cli.chat", "node.cli.files",
           "node.rpc", "node.device.control", "node.device.node", "node.device.setup",
           "node.device.linking", "node.relay.service", "node.net.host", "node.net.mdns")
_MAX_REQUEST = 1 << 20
#: Environment variable naming the socket of the fork server shared by a run's xdist workers.
SHARED_SERVER_ENV = "PIGEON_FORK_SERVER"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PRCTL = _LIBC.prctl if _LIBC is not None else None


def enabled() -> bool:
    """Whether tests fork their `pigeon` processes (`PIGEON_TEST_FORK=0`: exec them)."""
    return os.environ.get("PIGEON_TEST_FORK", "1") != "0" and sys.platform.startswith("linux")


# --- the server ---------------------------------------------------------------------------------


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        if len(data) > _MAX_REQUEST:
            raise ValueError("request too long")
        more = conn.recv(65536)
        if not more:
            raise ValueError("request cut short")
        data += more
    return json.loads(data[4:]), list(fds)


def _enter_netns(name: str) -> None:
    """Join network namespace `name` of `ip netns` (ip-netns(8): /var/run/netns/NAME), as
    `ip netns exec` does for the network; setns(2) with CLONE_NEWNET."""
    fd = os.open(os.path.join("/var/run/netns", name), os.O_RDONLY)
    try:
        if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


def _child(request: dict[str, Any], fds: list[int], keep_closed: list[int], server: int) -> None:
    """In the forked child: become the command, run it, exit with its code. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if _PRCTL is not None:  # die with the server, as tests/childproc.py
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server:
            os._exit(1)
        for fd in keep_closed:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        if request.get("netns"):
            _enter_netns(request["netns"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # The streams as a fresh interpreter makes them for these descriptors (never closed).
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = ["pigeon", *request["argv"]]
        from node.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        atexit._run_exitfuncs()
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:  # wait for non-daemon threads, as interpreter exit does
            shutdown()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    """The server's loop (`python -m tests.forkserver PATH`): preload, listen, fork on request,
    report each child's end; ends with its parent."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    parent, server = os.getppid(), os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    # With PIGEON_FORK_LOG=FILE, one JSON line per child: its command, test and CPU seconds.
    log_path = os.environ.get("PIGEON_FORK_LOG")
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - open while serving
    commands: dict[int, list[str]] = {}
    tests: dict[int, str] = {}
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive_request(conn)
                except (OSError, ValueError) as error:
                    conn.sendall(f"error {error}\n".encode())
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                # The preloaded modules' objects go to the collector's permanent generation
                # ("gc.freeze" in the Python documentation): the child's collections no longer
                # walk them (nor touch their pages, which stay shared with this process).
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    own = [listener.fileno(), wake_r, wake_w, conn.fileno(), selector.fileno(),
                           *(c.fileno() for c in children.values())]
                    _child(request, fds, own + ([log.fileno()] if log is not None else []),
                           server)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                commands[pid] = request["argv"]
                tests[pid] = request["env"].get("PYTEST_CURRENT_TEST", "")
                with contextlib.suppress(OSError):
                    conn.sendall(f"pid {pid}\n".encode())
            else:
                os.read(wake_r, 4096)  # SIGCHLD woke the loop: its children are reaped below
        while children:
            try:
                pid, wait_status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if log is not None:
                log.write(json.dumps({"argv": commands.pop(pid, []), "test": tests.pop(pid, ""),
                                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}) + "\n")
                log.flush()
            conn = children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(wait_status)}\n".encode())
                conn.close()


# --- the client ---------------------------------------------------------------------------------


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    """A fork server, child of this process and of the calling thread (it ends with either:
    PR_SET_PDEATHSIG, tests/childproc.py), and the path of its socket. It serves once
    `wait_ready` returned."""
    path = os.path.join(tempfile.mkdtemp(prefix="pigeon-fork-"), "s")
    process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", path], cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               preexec_fn=die_with_parent())
    return process, path


def wait_ready(process: subprocess.Popen[bytes]) -> None:
    """Until the server started by `start_server` listens; RuntimeError if it ended first."""
    assert process.stdout is not None
    if process.stdout.readline() != b"ready\n":
        process.kill()
        raise RuntimeError("the fork server did not start")


class _Server:
    """The fork server this test process uses: the one shared by every xdist worker of the run
    (its socket in `SHARED_SERVER_ENV`, started by tests/conftest.py before the workers), else
    one of its own, started on first use. Each server costs ~1.2 s of CPU to import the node,
    once per worker when each had its own (docs/testing.md T4)."""

    lock = threading.Lock()
    process: subprocess.Popen[bytes] | None = None
    path = ""
    shared_failed = False  # the shared server refused a connection: use one of our own

    @classmethod
    def socket_path(cls) -> str:
        shared = os.environ.get(SHARED_SERVER_ENV, "")
        if shared and not cls.shared_failed:
            return shared
        with cls.lock:
            if cls.process is None or cls.process.poll() is not None:
                cls.process, cls.path = start_server()
                atexit.register(cls.process.kill)
                wait_ready(cls.process)
            return cls.path

    @classmethod
    def connect(cls) -> socket.socket:
        """A connection to the server, for one request."""
        path = cls.socket_path()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            conn.close()
            if path != os.environ.get(SHARED_SERVER_ENV):
                raise
            cls.shared_failed = True  # it ended (a run's end, or a crash): carry on with ours
            return cls.connect()
        return conn


class Forked:
    """A `pigeon` process from the fork server: the part of subprocess.Popen tests use."""

    def __init__(self, argv: list[str], *, stdin: Any = None, stdout: Any = None,
                 stderr: Any = None, text: bool = False, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, netns: str | None = None) -> None:
        """`argv`: the arguments after `pigeon`; stdin/stdout/stderr: None (this process's),
        subprocess.PIPE, subprocess.DEVNULL or an open file, as for subprocess.Popen; `netns`:
        the `ip netns` namespace to run in (as `ip netns exec` would)."""
        self.args = [sys.executable, "-m", "node", *argv]
        self.returncode: int | None = None
        self._exit_lock = threading.Lock()
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        ends: list[int] = []  # the child's descriptors, closed here once sent
        give: list[int] = []
        mine: list[tuple[str, int, str]] = []
        for index, spec in enumerate((stdin, stdout, stderr)):
            if spec is None:
                give.append(index)
            elif spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                ends.append(fd)
                give.append(fd)
            elif spec == subprocess.PIPE:
                read, write = os.pipe()
                child_end, own_end = (read, write) if index == 0 else (write, read)
                ends.append(child_end)
                give.append(child_end)
                mine.append((("stdin", "stdout", "stderr")[index], own_end,
                             "w" if index == 0 else "r"))
            else:
                give.append(spec.fileno())
        request = json.dumps({"argv": argv, "cwd": str(cwd or os.getcwd()), "netns": netns,
                              "env": dict(os.environ if env is None else env)}).encode()
        try:
            self._conn = _Server.connect()
            message = struct.pack(">I", len(request)) + request
            sent = self._conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", give).tobytes())])
            if sent < len(message):
                self._conn.sendall(message[sent:])
            self._buffer = b""
            first = self._line(None) or ""
        finally:
            for fd in ends:
                os.close(fd)
        if not first.startswith("pid "):
            for _name, fd, _mode in mine:
                os.close(fd)
            raise OSError(f"the fork server refused: {first.strip()!r}")
        self.pid = int(first.split()[1])
        for name, fd, mode in mine:
            setattr(self, name, open(fd, mode if text else mode + "b",  # noqa: SIM115 - as Popen's
                                     buffering=-1 if text or mode == "r" else 0))

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line ("" once it closed), or None if none came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._conn.settimeout(left)
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return None
            if not chunk:
                return ""
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def _read_exit(self, timeout: float | None) -> None:
        # One reader at a time, as Popen's waitpid lock: a thread may poll while another waits,
        # and the first to read the exit closes the connection under the other.
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._exit_lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            if self.returncode is not None:
                return
            line = self._line(None if deadline is None
                              else max(0.0, deadline - time.monotonic()))
            if line is None:
                return
            self._conn.close()
            if line.startswith("exit "):
                self.returncode = int(line.split()[1])
            else:  # the server died, and the child with it (tests/childproc.py)
                self.returncode = -signal.SIGKILL
        finally:
            self._exit_lock.release()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_exit(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that may already be someone else's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def pigeon_process(argv: list[str], *, netns: str | None = None,
                   **options: Any) -> Forked | subprocess.Popen[Any]:
    """`pigeon ARGV...` in a new process, in network namespace `netns` if given (one of
    `ip netns`'s, made by the test: tests/netlab.py): forked from the server, or by exec (under
    `ip netns exec`) when forking is off."""
    if enabled():
        return Forked(argv, netns=netns, **options)
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    return subprocess.Popen([*prefix, sys.executable, "-m", "node", *argv],
                            preexec_fn=die_with_parent(), **options)


def run(argv: list[str], *, input: str | None = None, timeout: float) -> subprocess.CompletedProcess[str]:
    """`pigeon ARGV...` to completion, its output captured (as subprocess.run(..., text=True,
    capture_output=True))."""
    if not enabled():
        return subprocess.run([sys.executable, "-m", "node", *argv], input=input,
                              capture_output=True, text=True, timeout=timeout)
    process = Forked(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}

    def drain(name: str, stream: IO[str]) -> None:
        out[name] = stream.read()
        stream.close()

    readers = [threading.Thread(target=drain, args=(name, stream), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
               if stream is not None]
    for reader in readers:
        reader.start()
    if process.stdin is not None:
        try:
            process.stdin.write(input or "")
            process.stdin.close()
        except BrokenPipeError:
            pass
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()) + 5.0)
    return subprocess.CompletedProcess(process.args, process.wait(), out.get("stdout", ""),
                                       out.get("stderr", ""))


if __name__ == "__main__":
    serve(sys.argv[1])
