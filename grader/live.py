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

import asyncio
import contextlib
import functools
import http.client
import logging
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

    server = _quick_server_class()(uvicorn.Config(app, host=HOST, port=0, log_level="warning", lifespan="on", **config))
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


async def _quick_main_loop(self: Any) -> None:
    """uvicorn's main loop, noticing ``should_exit`` within 5 ms instead of 100 ms.

    uvicorn polls its exit flag ten times a second, which is fine for a service and adds up
    to seconds over a test suite that starts and stops a server per test.
    """
    ticks = 0
    should_exit = await self.on_tick(0)
    while not should_exit:
        await asyncio.sleep(0.005)
        ticks += 1
        # on_tick's counter still advances ten times a second (it refreshes the Date header)
        should_exit = await self.on_tick(ticks // 20) if ticks % 20 == 0 else self.should_exit


def _quick_shutdown(original: Any) -> Any:
    """uvicorn's shutdown, without its fixed 0.1 s pause when no connection is open.

    uvicorn pauses 0.1 s after asking open connections to close. With none open and no task
    running there is nothing to wait for: close the listeners, run the lifespan's shutdown,
    done. Otherwise (a request in flight, a WebSocket open), uvicorn's own graceful shutdown.
    """

    async def shutdown(self: Any, sockets: Any = None) -> None:
        if self.server_state.connections or self.server_state.tasks or sockets:
            return await original(self, sockets)
        logging.getLogger("uvicorn.error").info("Shutting down")
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    return shutdown


@functools.cache
def _quick_server_class() -> type:
    import uvicorn

    class QuickServer(uvicorn.Server):
        """A uvicorn server that stops within milliseconds (see ``quicken_uvicorn``)."""

        main_loop = _quick_main_loop
        shutdown = _quick_shutdown(uvicorn.Server.shutdown)

    return QuickServer


def quicken_uvicorn() -> None:
    """Make every uvicorn server of this process stop as soon as it is asked to.

    For a server the launcher forked (``python -m uvicorn …``): SIGTERM is noticed within
    5 ms, and with no connection open it stops without uvicorn's fixed pause, instead of
    0.1-0.2 s later. Nothing else changes: a request in flight still gets uvicorn's graceful
    shutdown, with its ``--timeout-graceful-shutdown``.
    """
    import uvicorn

    if not getattr(uvicorn.Server, "_grader_quick", False):
        uvicorn.Server.shutdown = _quick_shutdown(uvicorn.Server.shutdown)  # type: ignore[method-assign]
        uvicorn.Server.main_loop = _quick_main_loop  # type: ignore[method-assign]
        uvicorn.Server._grader_quick = True  # type: ignore[attr-defined]


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
