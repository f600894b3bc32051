"""Two helpers for the course's notebooks: `check` grades a "Your turn" cell, `forget` makes a
route cell safe to run again.

    from grader.notebook import check, forget

    check(lambda: client.get("/cubes/3").json() == {"number": 3, "cube": 27},
          "GET /cubes/3 answers {'number': 3, 'cube': 27}: annotate `number: int`")

`await acheck(...)` is the same for an answer that runs on the notebook's event loop. A check
prints "Right." or raises `AssertionError("Not yet: <what the lesson teaches>")`, also
when checking the answer raises (a stub left as `...` usually does). The course suite runs every
notebook twice: with the reference answers (each check says "Right.") and as committed, with the
stubs (each check says "Not yet: ...", and every other cell still runs). See "notebooks" in
docs/AUTHORING.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["acheck", "check", "forget"]


def check(ok: Callable[[], Any], lesson: str) -> None:
    """Say whether an answer is right. `ok` returns a true value for a right answer (it may be
    an `async def`: it then runs on an event loop of its own, in a worker thread, because the
    notebook's loop is busy running this cell). `lesson` is what a wrong answer should learn."""
    try:
        right = ok()
        if inspect.iscoroutine(right):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                right = pool.submit(asyncio.run, right).result()
    except Exception as exc:  # a wrong answer may fail in any way: it is still a wrong answer
        raise AssertionError(f"Not yet: {lesson}\n(checking your answer raised {type(exc).__name__}: {exc})") from None
    if not right:
        raise AssertionError(f"Not yet: {lesson}")
    print("Right.")


async def acheck(ok: Callable[[], Any], lesson: str) -> None:
    """`check` for answers that must run on the notebook's own event loop (an async engine, a
    client bound to this loop): `await acheck(lambda: orders_of(...), "...")`. `ok` may return
    an awaitable; it is awaited here."""
    try:
        right = ok()
        if inspect.isawaitable(right):
            right = await right
    except Exception as exc:
        raise AssertionError(f"Not yet: {lesson}\n(checking your answer raised {type(exc).__name__}: {exc})") from None
    if not right:
        raise AssertionError(f"Not yet: {lesson}")
    print("Right.")


def forget(app: Any, path: str, method: str | None = None) -> None:
    """Remove the routes at `path` from `app` (a FastAPI app or an APIRouter), so that running a
    route cell again replaces its route. Without it the second run adds a second route with the
    same path, and the first one, matched first, keeps answering: your edit seems to change
    nothing. With `method`, only the route for that method goes (a POST at the same path stays).
    An included router that serves `path` is removed whole (include it again after)."""
    routes = getattr(app, "router", app).routes
    routes[:] = [route for route in routes
                 if path not in _paths(route) or (method is not None and method not in (getattr(route, "methods", None) or {method}))]
    if hasattr(app, "openapi_schema"):
        app.openapi_schema = None  # the cached schema described the old route


def _paths(route: Any, prefix: str = "") -> list[str]:
    """The full paths a route serves; an included router (FastAPI includes lazily) serves its routes'."""
    included = getattr(route, "original_router", None)
    if included is not None:
        context = getattr(route, "include_context", None)
        inner = prefix + getattr(context, "prefix", "")
        return [p for child in included.routes for p in _paths(child, inner)]
    return [prefix + route.path] if hasattr(route, "path") else []
