"""Differential tests for exercise 13: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). Each app,
yours and the reference's, is built as README.md promises: `create_app(Settings(...), clock=...)`,
with limits small enough that the run reaches them (a body limit of 120 bytes, a bucket of 16
requests refilled at 3 a second, a summary cached for 2 seconds) and a clock that moves a quarter
of a second with every request, however often the app reads it. Compared: the status, the JSON
body (a problem's `detail` is free: its wording is yours), `Retry-After`, `X-Cache` and the
fixed security headers, and that an `ETag` and a `Strict-Transport-Security` are there.
"""

from __future__ import annotations

from typing import Any

import pytest

from grader import differential

SETTINGS = {"max_body_bytes": 120, "rate_limit_capacity": 16, "rate_limit_refill_per_second": 3.0,
            "rate_limit_max_clients": 100, "gzip_minimum_size": 1000, "summary_ttl_seconds": 2.0,
            "cors_origins": ["https://shop.example"], "cors_allow_credentials": True}
STEP = 0.25  # seconds the clock moves with each request


class Clock:
    """A monotonic clock the tests move: it reads the same however often the app asks."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def read(self) -> float:
        """What the app gets as its clock: a function (class grading calls it in the tests' process)."""
        return self.now


class Ticking:
    """The app, with its clock moved STEP seconds before each HTTP request; the rest is the app's own."""

    def __init__(self, app: Any, clock: Clock) -> None:
        self.app, self.clock = app, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.clock.now += STEP
        await self.app(scope, receive, send)


def build(module: Any) -> Any:
    """`create_app(Settings(...), clock=...)`, as the README says the tests call it."""
    clock = Clock()
    return Ticking(module.create_app(module.Settings(**SETTINGS), clock=clock.read), clock)


# How a differential run builds 13's apps (tests/test_differential.py uses it too).
SESSION_OPTIONS = {"app": build}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, module="app", **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
