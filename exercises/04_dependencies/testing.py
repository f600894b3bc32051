"""Helpers for tests of the catalogue: swap a dependency for the length of a `with` block."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI


@contextmanager
def override_dependency(app: FastAPI, dependency: Callable[..., Any], replacement: Callable[..., Any]) -> Iterator[None]:
    """Make `app` call `replacement` wherever it would call `dependency`, inside the block only.

    TODO: install the override in app.dependency_overrides, and on the way out (even when
    the block raises) restore exactly what was there before: nothing, or an outer override
    of the same dependency. Leave every other override alone.
    """
    yield
