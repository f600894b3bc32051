"""Differential tests for exercise 12: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). Each app,
yours and the reference's, is built as README.md promises the tests build it:
`create_app(tracer_provider=..., transport=...)`, with `OBS_SECRET_KEY` and a database that
answers set while its lifespan starts, and a warehouse (an `httpx.MockTransport`) that knows
every item. Compared: the status, the content type, the JSON body (a problem's `detail` is free:
its wording is yours), and that an `X-Request-ID` is there (its value is free: a trace ID).

A second test sends a fixed list of requests, errors among them, to a fresh app of each and
compares what the README promises the logs and the metrics show of them: one access line per
request with its method, route and status, and the same counts in `http_requests_total`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from grader import differential
from grader.expect import StartupFailed

ENVIRONMENT = {"OBS_SECRET_KEY": "differential-secret-0123456789", "OBS_DATABASE_URL": "sqlite+aiosqlite://",
               "OBS_LOG_LEVEL": "INFO", "OBS_ENVIRONMENT": "staging", "OBS_APP_NAME": "inventory-diff"}


def warehouse(request: httpx.Request) -> httpx.Response:
    """The warehouse: every item it is asked about has 7 (the service asks only about known items)."""
    item = request.url.path.rsplit("/", 1)[-1]
    return httpx.Response(200, json={"item_id": int(item) if item.isdigit() else item, "quantity": 7})


class WithEnvironment:
    """An ASGI app whose lifespan starts with ENVIRONMENT set (and put back once it has started).

    The README promises that the lifespan reads the settings; the rest of the process never sees
    these variables. Everything else (``openapi()`` among it) is the app's own.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        saved = {name: os.environ.get(name) for name in ENVIRONMENT}
        os.environ.update(ENVIRONMENT)

        def restore() -> None:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            saved.clear()

        async def send_then_restore(message: dict) -> None:
            if message["type"].startswith("lifespan.startup."):
                restore()
            await send(message)

        try:
            await self.app(scope, receive, send_then_restore)
        finally:
            restore()


def build(module: Any) -> Any:
    """`create_app(tracer_provider=..., transport=...)`, as the README says the tests call it."""
    clear = getattr(getattr(module, "get_settings", None), "cache_clear", None)
    if callable(clear):
        clear()
    return WithEnvironment(module.create_app(tracer_provider=TracerProvider(), transport=httpx.MockTransport(warehouse)))


# How a differential run builds 12's apps (tests/test_differential.py uses it too).
SESSION_OPTIONS = {"app": build}


def loaded(loader: Any) -> Any:
    """A fresh copy of app.py, imported while ENVIRONMENT is set: an app.py that reads its settings
    at import (the README says it must not; test_observability.py says why) still imports here.
    What an earlier copy registered on prometheus_client's global REGISTRY is taken out first."""
    forget_global_metrics()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENVIRONMENT.items():
            patch.setenv(name, value)
        return loader("app")


BEFORE: set = set()  # the collectors on prometheus_client's global REGISTRY before this file ran


def forget_global_metrics() -> None:
    from prometheus_client import REGISTRY

    for collector in set(REGISTRY._collector_to_names) - BEFORE:
        REGISTRY.unregister(collector)


@pytest.fixture(scope="module", autouse=True)
def global_registry_untouched():
    """An app.py that registers its metrics on prometheus_client's global REGISTRY (the README says it
    must not) would register them again with every fresh copy imported here: the second import
    would fail, and so would the next test file's. Each copy starts from the registry as it was."""
    from prometheus_client import REGISTRY

    BEFORE.clear()
    BEFORE.update(REGISTRY._collector_to_names)
    yield
    forget_global_metrics()


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    promises = differential.Promises.parse(exercise.extra["differential"], f"{exercise.name}/exercise.toml")
    return differential.Session(lambda: loaded(load), lambda: loaded(reference), promises, **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)


# --------------------------------------------------------------------------- logs and metrics

# Answers of every kind: found, the service's 404, a 422, an unmatched path, a wrong method (405),
# the warehouse's stock, an unknown item's stock, and the probes.
REQUESTS = [("GET", "/items/1"), ("GET", "/items/2"), ("GET", "/items/99"), ("GET", "/items/abc"),
            ("GET", "/items/1/stock"), ("GET", "/items/7/stock"), ("GET", "/no/such/page"), ("POST", "/items/1"),
            ("GET", "/health"), ("GET", "/ready"), ("GET", "/info"), ("DELETE", "/health"), ("GET", "/items/1")]


class Lines(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def observe(module: Any) -> tuple[list[tuple], dict]:
    """What each request shows in the access log (method, route, status, request ID = header?) and
    the counts of http_requests_total, for a fresh app of ``module``."""
    access = logging.getLogger("inventory.access")
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate)
             for logger in (logging.getLogger("inventory"), access)]
    try:
        app = build(module)
        with TestClient(app, raise_server_exceptions=False) as client:
            seen: list[tuple] = []
            for method, path in REQUESTS:
                handler = Lines(module.JsonFormatter())
                access.addHandler(handler)
                try:
                    response = client.request(method, path)
                finally:
                    access.removeHandler(handler)
                lines = []
                for line in handler.lines:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        entry = {"not JSON": line}
                    if not isinstance(entry, dict):
                        entry = {"not a JSON object": line}
                    lines.append((entry.get("method"), entry.get("route"), entry.get("status"),
                                  entry.get("request_id") == response.headers.get("x-request-id") is not None))
                seen.append((method, path, response.status_code, lines))
            scrape = client.get("/metrics")
        return seen, counted(scrape)
    finally:
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def counted(scrape: Any) -> dict:
    """The samples of http_requests_total by (method, route, status), or what went wrong."""
    if scrape.status_code != 200:
        return {"GET /metrics answered": scrape.status_code}
    try:
        families = list(text_string_to_metric_families(scrape.text))
    except Exception as exc:  # noqa: BLE001 - the parser raises plain ValueErrors on a bad exposition
        return {"GET /metrics is not the Prometheus text format": str(exc)[:80]}
    counts: dict = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "http_requests_total":
                labels = sample.labels
                counts[(labels.get("method"), labels.get("route"), labels.get("status"))] = sample.value
    counts.pop(("GET", "/metrics", "200"), None)  # the scrape itself is counted after it answers, or not
    return counts


def observed(load_module: Any) -> tuple[list[tuple], dict] | StartupFailed:
    try:
        return observe(load_module())
    except Exception as exc:  # noqa: BLE001 - the learner's app failed to build, start or answer: say so
        return StartupFailed(f"\nexpected: your app starts and answers as the README says\ngot:      {type(exc).__name__}: {exc}")


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
@pytest.mark.promise("P10")
def test_every_answer_errors_included_is_logged_like_the_reference(load, reference):
    expected, ours = observed(lambda: loaded(reference)), observed(lambda: loaded(load))
    if isinstance(ours, StartupFailed):
        ours.fail
    for (method, path, status, lines), (_, _, got_status, got_lines) in zip(expected[0], ours[0], strict=True):
        if (got_status, got_lines) != (status, lines):
            pytest.fail(
                f"\nsent:     {method} {path} (after {REQUESTS[:REQUESTS.index((method, path))] or 'nothing'})"
                f"\nexpected: status {status}, access lines (method, route, status, request_id = the X-Request-ID header) "
                f"{lines}\ngot:      status {got_status}, access lines {got_lines}"
                "\nEvery answer, an error too, writes one access line with the route template ('unmatched' when no route "
                "matched) and the status sent (README: Request IDs and logs).",
                pytrace=False,
            )


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
@pytest.mark.promise("P10")
def test_every_answer_errors_included_is_counted_like_the_reference(load, reference):
    expected, ours = observed(lambda: loaded(reference)), observed(lambda: loaded(load))
    if isinstance(ours, StartupFailed):
        ours.fail
    if ours[1] != expected[1]:
        missing = {k: v for k, v in expected[1].items() if ours[1].get(k) != v}
        extra = {k: v for k, v in ours[1].items() if k not in expected[1]}
        pytest.fail(
            f"\nsent:     {', '.join(f'{m} {p}' for m, p in REQUESTS)}, then GET /metrics"
            f"\nexpected: http_requests_total by (method, route, status) {expected[1]}"
            f"\ngot:      {ours[1]}\ndiffering: {missing}; not expected: {extra}"
            "\nEvery answer, an error too, is counted once with its route template and status (README: Metrics).",
            pytrace=False,
        )
