"""Real servers on loopback for graded tests and lessons.

Some lessons are about serving: a WebSocket client library talking to uvicorn, two services
calling each other over TCP, an app started exactly as a Dockerfile says. These helpers start
such servers on a free port of 127.0.0.1, wait until they answer, and always stop them.

    with serve_in_thread(app) as base_url:          # uvicorn in a thread of this process
        httpx.get(f"{base_url}/health", verify=http_only())

    with serve_in_process([sys.executable, "-m", "uvicorn", "app:app", "--port", "{port}"],
                          cwd=folder) as base_url:   # a real child process
        httpx.get(f"{base_url}/health", verify=http_only())
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from grader import platform_support
from grader.quick_uvicorn import quick_server_class, quicken_uvicorn  # noqa: F401 - quicken_uvicorn: still reachable here

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any, *, timeout: float = 10.0, **config: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yield its base URL."""
    import uvicorn

    server = quick_server_class()(uvicorn.Config(app, host=HOST, port=0, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, name="uvicorn-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start: the app failed during startup (see the log above).")
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def wait_until_up(url: str, *, timeout: float, process: Any = None) -> None:
    """Poll ``url`` until any HTTP answer comes back; fail early if ``process`` exits.

    Plain ``http.client``: an httpx client would first load its whole CA bundle (40-90 ms of
    CPU, for TLS this URL never uses), and several servers start at once.
    """
    parts = urllib.parse.urlsplit(url)
    target = f"{parts.path or '/'}{'?' + parts.query if parts.query else ''}"
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before answering {url}")
        connection = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=0.5)
        try:
            connection.request("GET", target)
            connection.getresponse().read()
            return
        except (OSError, http.client.HTTPException):  # not listening yet, or hung up before answering
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered at {url} within {timeout:.0f} s") from None
            time.sleep(0.02)
        finally:
            connection.close()


def http_only() -> ssl.SSLContext:
    """The ``verify=`` of an httpx client that speaks plain HTTP to servers on this machine.

    A new httpx client loads its whole CA bundle (40-90 ms of CPU) for the TLS that an
    ``http://`` URL never uses. This context trusts no certificate at all: an ``https://`` URL
    fails verification, where ``verify=False`` would skip it.

        httpx.Client(base_url=base_url, verify=http_only())
    """
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@contextlib.contextmanager
def serve_in_process(
    command: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    ready_path: str = "/",
    timeout: float = 20.0,
) -> Iterator[str]:
    """Start ``command`` as a child process (``{port}`` in it is replaced); yield its base URL.

    The child runs in its own process group, which is terminated (then killed) on exit,
    so a server that forks workers leaves nothing behind (``grader.platform_support``).

    In a graded run whose tests are marked ``servers``, a ``python -m …`` command is forked
    from a warm launcher process instead of starting a new interpreter (``grader.launcher``):
    same command line, environment, output and exit code, a fraction of the start-up time.
    """
    from grader import launcher

    port = port or free_port()
    args = [part.replace("{port}", str(port)) for part in command]
    full_env = {**os.environ, **(env or {})}
    process: Any = None
    if launcher.can_launch(args, env):
        process = launcher.launch(args, cwd, full_env)
    if process is None:
        process = platform_support.leads_group(subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            **platform_support.new_group(),
        ))
    base_url = f"http://{HOST}:{port}"
    try:
        wait_until_up(base_url + ready_path, timeout=timeout, process=process)
        yield base_url
    finally:
        stop_process_group(process)


def stop_process_group(process: Any, grace: float = 5.0) -> None:
    """Stop a ``subprocess.Popen`` (or a launcher's server) and everything it started.

    As a deployment does: a request to stop (SIGTERM to the process group; CTRL_BREAK on
    Windows, which uvicorn handles the same way), then a kill after ``grace`` seconds.
    """
    platform_support.stop_tree(process, grace)
