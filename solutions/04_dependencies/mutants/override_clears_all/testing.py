"""Mutant: clears every override on exit, wiping overrides that other code installed."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

_MISSING = object()


@contextmanager
def override_dependency(app: FastAPI, dependency: Callable[..., Any], replacement: Callable[..., Any]) -> Iterator[None]:
    """Make `app` call `replacement` wherever it would call `dependency`, inside the block only.

    The key is the very function the routes declare in Depends(...). On the way out, whatever
    was there before comes back: nothing (the usual case), or an outer override of the same
    dependency. Other overrides are left alone, and this happens even if the block raises, so
    one test can never leak its fake into the next.
    """
    overrides = app.dependency_overrides
    previous = overrides.get(dependency, _MISSING)
    overrides[dependency] = replacement
    try:
        yield
    finally:
        overrides.clear()
