"""Import ahead of time what a graded run will import, so that processes forked later start warm.

Two places fork many short-lived processes from one warm parent: the grading zygote (one run
per learner and exercise) and the server launcher of ``grader.live`` (one uvicorn per real
server a test starts). Both import the libraries that the course's code needs once, in the
parent, and every fork then finds them in memory instead of importing them again.

Kept free of heavy imports: the launcher uses it inside a learner's own ``pytest`` run.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import warnings
from collections.abc import Iterable
from pathlib import Path

# Modules that a library imports only when first used (so the import lines of the tests and
# solutions do not name them); each forked process would pay for them again. Found by
# comparing sys.modules after collection and after a reference run (see docs/GRADING.md, "Speed").
LAZY_IMPORTS: dict[str, tuple[str, ...]] = {
    # FastAPI checks for pydantic.v1 models the first time a route declares a model;
    # starlette runs sync routes in a thread pool.
    "fastapi": ("pydantic.v1", "concurrent.futures.thread", "pickle"),
    "pydantic": ("email_validator", "pydantic.dataclasses", "pydantic.root_model", "pydantic.alias_generators"),
    "pydantic_settings": ("dotenv",),
    # create_engine("sqlite+aiosqlite://...") imports its dialect, and the async layer greenlet
    "sqlalchemy": ("sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.sqlite.aiosqlite", "greenlet", "aiosqlite"),
    "pwdlib": ("pwdlib.hashers.argon2", "argon2"),
    "asgi_lifespan": ("asgi_lifespan._concurrency.asyncio",),
    # a real HTTP client builds its transport on first use
    "httpx": ("httpcore", "httpcore._sync.connection_pool", "httpcore._async.connection_pool",
              "httpcore._backends.sync", "httpcore._backends.anyio", "h11", "certifi"),
    # real servers on loopback: uvicorn chooses its loop and protocols when it starts
    "grader.live": (
        "uvicorn", "uvicorn.main", "uvicorn.server", "uvicorn.config", "uvicorn.lifespan.on",
        "uvicorn.loops.auto", "uvicorn.loops.uvloop", "uvicorn.protocols.http.auto",
        "uvicorn.protocols.http.h11_impl", "uvicorn.protocols.http.httptools_impl",
        "uvicorn.protocols.websockets.auto", "uvicorn.protocols.websockets.websockets_sansio_impl",
        "uvicorn.middleware.proxy_headers", "logging.config", "httpcore", "h11", "certifi",
    ),
    "websockets": ("websockets.asyncio.client", "websockets.asyncio.connection"),
}
UVICORN_MODULES = LAZY_IMPORTS["grader.live"]


def imports_of(paths: Iterable[Path]) -> set[str]:
    """Modules and packages that ``paths`` import (absolute imports only)."""
    found: set[str] = set()
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


def with_lazy_imports(modules: Iterable[str]) -> set[str]:
    """``modules`` and what each of them imports only on first use."""
    names = set(modules)
    return names | {lazy for name in names for top, later in LAZY_IMPORTS.items()
                    if name == top or name.startswith(top + ".") for lazy in later}


def local_names(folder: Path) -> set[str]:
    """Top-level modules that ``folder`` itself provides: ``app`` for ``app.py``, and packages."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            if entry.suffix == ".py":
                names.add(entry.stem)
            elif entry.name.isidentifier() and (entry / "__init__.py").is_file():
                names.add(entry.name)
    return names


def library_imports(folder: Path, limit: int = 200) -> set[str]:
    """What the Python files under ``folder`` import from outside it, lazy imports included.

    The folder's own modules are left out: a warm process must import them fresh every time.
    """
    folder = Path(folder)
    files = []
    with contextlib.suppress(OSError):
        files = sorted(folder.rglob("*.py"))[:limit]
    local = local_names(folder)
    found = {name for name in imports_of(files) if name.partition(".")[0] not in local}
    return with_lazy_imports(found)


def prewarm(modules: Iterable[str]) -> None:
    """Import each of ``modules`` that imports cleanly; ignore the rest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    gc.collect()
