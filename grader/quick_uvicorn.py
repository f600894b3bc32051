"""uvicorn servers that stop within milliseconds, for the tests that start and stop many.

Shared by ``grader.live`` (servers in a thread of the test process) and ``grader.launcher``
(servers forked from a warm process in a graded run), which import this module and not each
other. It changes nothing a request sees: only how soon a server notices it is asked to stop,
and the fixed pause at the end when no connection is open.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any


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
def quick_server_class() -> type:
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
