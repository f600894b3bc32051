"""Start ``python -m uvicorn …`` servers by forking a warm process instead of a new interpreter.

A graded test that starts the learner's app as a real server (``grader.live.serve_in_process``)
used to pay for a whole new Python: start the interpreter, import FastAPI, pydantic, uvicorn,
SQLAlchemy… about a second of CPU per server, before the app's own code runs. The capstone
starts four such servers at once.

The launcher is a helper process, forked from the test process while that process still runs a
single thread (at the end of collection), so the fork is safe. It imports what the graded code
will need, in the background, then waits for requests. For each request it forks once more:
the child resets what a new interpreter would not have (signal handlers, warning filters,
logging handlers, standard streams, environment, working directory, the graded folder's own
modules) and runs the module as ``python -m`` would. The test sees the same command line,
environment, output and exit code as with a real ``subprocess.Popen``. One thing differs, on
purpose: uvicorn notices SIGTERM within 5 ms instead of 0.1 s, and with no connection open
skips its fixed 0.1 s pause (``grader.quick_uvicorn.quicken_uvicorn``); a request in flight still gets
uvicorn's own graceful shutdown.

    parent (pytest) ──socket──► launcher ──fork──► server (own session, like start_new_session)

Only ``[sys.executable, "-m", module, …]`` commands are launched this way; anything else, and
every case where no launcher runs (not Linux, ``GRADER_PORTABLE=1``, a notebook kernel with threads,
a launcher that died), goes to ``subprocess.Popen`` as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
REPLY_TIMEOUT = 60.0  # the first reply waits for the launcher's imports


class ForkedServer:
    """A server the launcher forked: the part of ``subprocess.Popen``'s interface that tests use."""

    def __init__(self, launcher: Launcher, pid: int, args: list[str]) -> None:
        self.launcher, self.pid, self.args = launcher, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]


class Launcher:
    """The parent's side: ask the helper for servers, learn when they exit."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self.lock = threading.Lock()
        self.exits: dict[int, int] = {}
        self.alive = True

    # -- messages from the helper: replies to requests, and exit codes at any time
    def _handle(self, data: bytes) -> dict | None:
        if not data:
            self.alive = False
            return None
        try:
            message = json.loads(data)
        except ValueError:
            return None
        if "exit" in message:
            self.exits[int(message["exit"])] = int(message["code"])
            return None
        return message

    def _drain(self) -> None:
        while self.alive:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.alive = False
                return
            self._handle(data)

    def launch(self, args: list[str], cwd: str, env: dict[str, str]) -> ForkedServer | None:
        """Fork a server running ``args``; None if the launcher cannot (use a subprocess then)."""
        request = json.dumps({"args": args, "cwd": cwd, "env": env}).encode()
        with self.lock:
            if not self.alive:
                return None
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                # The server writes where this process writes now (pytest's capture of the test).
                socket.send_fds(self.sock, [request], [1, 2])
                self.sock.settimeout(REPLY_TIMEOUT)
                try:
                    while True:
                        reply = self._handle(self.sock.recv(4096))
                        if not self.alive:
                            return None
                        if reply is not None:
                            break
                finally:
                    self.sock.settimeout(None)
            except OSError:
                self.alive = False
                return None
        if "pid" not in reply:
            return None
        return ForkedServer(self, int(reply["pid"]), args)

    def exit_code(self, pid: int) -> int | None:
        with self.lock:
            self._drain()
            if pid in self.exits:
                return self.exits[pid]
            if self.alive:
                return None
        # The helper is gone (its servers were killed with it, see PR_SET_PDEATHSIG).
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -signal.SIGKILL
        except PermissionError:
            pass
        return None

    def close(self, grace: float = 5.0) -> None:
        """End the helper (it kills any server still running) and reap it."""
        with self.lock:
            self.alive = False
            with contextlib.suppress(OSError):
                self.sock.close()
        deadline = time.monotonic() + grace
        with contextlib.suppress(ChildProcessError, OSError):
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)


_launcher: Launcher | None = None
# Set in the grading zygote, which must not fork a launcher outside each run's sandbox: there
# every run starts its own (``start`` is called again once the run is in its sandbox).
deferred = False


def _forget_in_child() -> None:
    # A process forked from the tests (09 forks its pytest children) must not share the
    # tests' conversation with the launcher.
    global _launcher
    if _launcher is not None:
        with contextlib.suppress(OSError):
            _launcher.sock.close()
        _launcher = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def current() -> Launcher | None:
    return _launcher if _launcher is not None and _launcher.alive else None


def shutdown() -> None:
    """Stop this process's launcher, if it has one (at the end of the test session)."""
    global _launcher
    if _launcher is not None:
        launcher, _launcher = _launcher, None
        launcher.close()


def can_launch(command: Sequence[str], env: Mapping[str, str] | None) -> bool:
    """A command the launcher runs just as a new interpreter would."""
    if current() is None or len(command) < 3 or command[0] != sys.executable or command[1] != "-m":
        return False
    # Variables that only a starting interpreter reads (PYTHONPATH, PYTHONHASHSEED…) need one.
    return not any(key.startswith("PYTHON") and os.environ.get(key) != value for key, value in (env or {}).items())


def launch(command: Sequence[str], cwd: Path | str | None, env: Mapping[str, str]) -> ForkedServer | None:
    launcher = current()
    if launcher is None:
        return None
    return launcher.launch(list(command), os.path.abspath(cwd or os.getcwd()), dict(env))


def start(folder: Path | str | None = None) -> Launcher | None:
    """Fork the launcher (once per process) if this process may: Linux, one thread.

    ``folder`` is the graded code: the launcher imports the libraries it imports.
    """
    global _launcher
    if _launcher is not None or deferred:
        return current()
    from grader import platform_support

    if not platform_support.forking() or threading.active_count() != 1:
        return None  # servers start as new interpreters (grader.live), as they would without the launcher
    parent_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: about threads, checked above
        pid = os.fork()
    if pid == 0:
        parent_end.close()
        _helper(helper_end, str(folder) if folder else None)  # never returns
    helper_end.close()
    _launcher = Launcher(parent_end, pid)
    return _launcher


# --------------------------------------------------------------------------- the helper


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0),
                                ctypes.c_ulong(0), ctypes.c_ulong(0))


def _helper(sock: socket.socket, folder: str | None) -> None:
    children: set[int] = set()
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Ctrl-C reaches the whole foreground group: the tests stop their servers themselves,
        # and need the launcher to tell them when the servers have exited.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for number in (signal.SIGTERM, signal.SIGALRM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)

        from grader.warmup import UVICORN_MODULES, library_imports, prewarm

        prewarm([*UVICORN_MODULES, *(sorted(library_imports(Path(folder))) if folder else [])])
        while True:
            readable, _, _ = select.select([sock, wake_read], [], [])
            if wake_read in readable:
                os.read(wake_read, 4096)
            while children:  # report every server that has exited
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
            if sock in readable:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
                if not data:
                    break  # the tests are over
                try:
                    request = json.loads(data)
                    pid = os.fork()
                except Exception as exc:  # noqa: BLE001 - report it; the parent falls back
                    for fd in fds:
                        os.close(fd)
                    sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
                    continue
                if pid == 0:
                    _server(request, fds, [sock.fileno(), wake_read, wake_write])  # never returns
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                sock.send(json.dumps({"pid": pid}).encode())
    except BaseException:  # noqa: BLE001 - the helper never returns into the tests
        pass
    finally:
        for pid in children:  # servers the tests did not stop (the tests were killed)
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        os._exit(0)


def _server(request: dict, fds: list[int], close: list[int]) -> None:
    """In the forked server: become what ``python -m module args…`` would be, and run it."""
    code = 1
    try:
        os.setsid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for fd in close:
            os.close(fd)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGALRM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in {null, *fds}:
            if fd > 2:
                os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        cwd, args = request["cwd"], request["args"]
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(request["env"])
        _fresh_interpreter_state([cwd, *_app_dirs(args)])
        from grader.quick_uvicorn import quicken_uvicorn

        quicken_uvicorn()  # stopped within milliseconds, not 0.1-0.2 s (see its docstring)
        import runpy

        sys.argv = [args[2], *args[3:]]  # run_module puts the module's file in argv[0]
        sys.path.insert(0, cwd)  # what -m does
        runpy.run_module(args[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - print it as the interpreter would, then exit
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _app_dirs(args: list[str]) -> list[str]:
    found = []
    for index, arg in enumerate(args):
        if arg == "--app-dir" and index + 1 < len(args):
            found.append(args[index + 1])
        elif arg.startswith("--app-dir="):
            found.append(arg.partition("=")[2])
    return found


def _fresh_interpreter_state(folders: list[str]) -> None:
    """Undo what the test process changed that a new interpreter would not have."""
    import logging

    # warning filters of a new interpreter (pytest's `error` filter must not follow the server)
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    # no handler left from pytest's log capture: the server configures its own logging
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    # the graded folder's own modules are imported fresh, from the files as they are now
    from grader.warmup import local_names

    local = set()
    for folder in folders:
        local |= local_names(Path(folder))
    for name in list(sys.modules):
        if name.partition(".")[0] in local:
            del sys.modules[name]
