"""Graded tests for exercise 12: the warehouse's answer is read no further than warehouse_max_bytes (P11).

Run: pytest exercises/12_observability
"""

import json
import logging
import re

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id
from pydantic import ValidationError

from grader.environment import settings_environment
from grader.expect import expect_json, expect_problem, explain
from grader.upstreams import Streaming

SECRET = "s3cr3t-value-that-must-never-be-shown-0123456789"
DEFAULT_LIMIT = 65_536
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A clean environment for the whole file: no stray OBS_* variable, no .env from elsewhere."""
    folder = tmp_path_factory.mktemp("warehouse_limit")
    database_url = f"sqlite+aiosqlite:///{folder / 'inventory.db'}"
    with settings_environment("OBS_", folder, OBS_SECRET_KEY=SECRET, OBS_DATABASE_URL=database_url):
        yield folder


@pytest.fixture(autouse=True)
def env(workdir, monkeypatch):
    """What a test changes in the environment is undone after it."""
    return monkeypatch


@pytest.fixture(scope="module", autouse=True)
def clean_loggers():
    """Logging is global to the process: start from unconfigured loggers, restore them after."""
    loggers = [logging.getLogger(name) for name in ("inventory", "inventory.access")]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
        logger.handlers.clear()
        logger.propagate = True
    yield
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.fixture(scope="module")
def module(load):
    return load("app", fresh=False)


@pytest.fixture(autouse=True)
def fresh_settings(module, env):
    """get_settings() reads the environment of this test, whatever an earlier test cached."""
    clear = getattr(getattr(module, "get_settings", None), "cache_clear", None)
    if callable(clear):
        clear()
    yield
    if callable(clear):
        clear()


class JsonLines(logging.Handler):
    """Formats every record with the learner's JsonFormatter, as it is emitted."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def stock_of(size: int) -> bytes:
    """Item 3's stock as JSON of exactly `size` bytes (blanks before the closing brace)."""
    start = b'{"item_id": 3, "quantity": 7'
    return start + b" " * (size - len(start) - 1) + b"}"


def in_chunks(body: bytes, size: int) -> list[bytes]:
    return [body[at:at + size] for at in range(0, len(body), size)]


def streaming_app(module, warehouse: Streaming):
    """A new app whose warehouse is `warehouse` (a streamed answer), its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        app = module.create_app(tracer_provider=provider, transport=warehouse)
    except TypeError as exc:
        pytest.fail(
            "\nexpected: create_app(tracer_provider=provider, transport=transport), as the README promises\n"
            f"got:      TypeError: {exc}",
            pytrace=False,
        )
    return app, exporter


def get_stock(module, warehouse: Streaming):
    """GET /items/3/stock from a new app; the response, its spans and the service's log lines."""
    app, exporter = streaming_app(module, warehouse)
    handler = JsonLines(module.JsonFormatter())
    service = logging.getLogger("inventory")
    with TestClient(app, raise_server_exceptions=False) as client:
        service.addHandler(handler)  # after startup: the lifespan sets the logger's own handlers
        try:
            response = client.get("/items/3/stock")
        finally:
            service.removeHandler(handler)
    return response, exporter, handler.lines


@pytest.mark.task("settings")
@pytest.mark.promise("P1", "P11")
def test_warehouse_max_bytes_is_a_setting(module, env):
    settings = module.Settings()
    got = getattr(settings, "warehouse_max_bytes", "no such field")
    assert got == DEFAULT_LIMIT and isinstance(got, int), (
        f"\nexpected: Settings().warehouse_max_bytes is {DEFAULT_LIMIT} (an int) when OBS_WAREHOUSE_MAX_BYTES is unset"
        f"\ngot:      {got!r}"
    )
    for value, limit in (("1", 1), ("16777216", 16_777_216)):  # the smallest and the largest allowed
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", value)
        got = getattr(module.Settings(), "warehouse_max_bytes", "no such field")
        assert got == limit, f"\nset:      OBS_WAREHOUSE_MAX_BYTES={value} (allowed: 1 to 16777216)\ngot:      {got!r}"
    for value in ("0", "16777217", "many", "1e3"):
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", value)
        with pytest.raises(ValidationError):
            module.Settings()
            pytest.fail(
                f"\nset:      OBS_WAREHOUSE_MAX_BYTES={value}\nexpected: a ValidationError (an int from 1 to 16777216)"
                "\ngot:      Settings() accepted it",
                pytrace=False,
            )


@pytest.mark.task("tracing")
@pytest.mark.promise("P9", "P11")
@pytest.mark.parametrize(("limit", "chunk"), [(None, 4096), (64, 8)], ids=["default", "64"])
def test_an_answer_of_exactly_the_limit_is_served(module, env, limit, chunk):
    if limit is not None:
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", str(limit))
    size = limit or DEFAULT_LIMIT
    response, _, _ = get_stock(module, Streaming(in_chunks(stock_of(size), chunk)))
    expect_json(response, {"item_id": 3, "quantity": 7},
                f"the warehouse's answer is {size} bytes, exactly warehouse_max_bytes: it is read and served", exact=True)


@pytest.mark.task("tracing")
@pytest.mark.promise("P6", "P9", "P10", "P11")
@pytest.mark.parametrize(("limit", "chunk"), [(None, 4096), (64, 8)], ids=["default", "64"])
def test_one_byte_past_the_limit_is_a_502_that_says_why(module, env, limit, chunk):
    if limit is not None:
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", str(limit))
    size = (limit or DEFAULT_LIMIT) + 1
    warehouse = Streaming(in_chunks(stock_of(size), chunk))
    response, exporter, lines = get_stock(module, warehouse)
    why = f"the warehouse's answer is {size} bytes, one more than warehouse_max_bytes"
    expect_problem(response, 502, f"{why}: a 502 problem")
    assert "warehouse_max_bytes" not in response.text, explain(
        response, "the cause goes to the log, never to the client: the problem does not name the setting"
    )

    sent = [request.headers.get("traceparent") or "" for request in warehouse.requests]
    match = TRACEPARENT.fullmatch(sent[0]) if len(sent) == 1 else None
    assert match is not None, explain(response, f"one call to the warehouse carrying a W3C traceparent; got {sent}")
    caller = [span for span in exporter.get_finished_spans() if format_span_id(span.context.span_id) == match[2]]
    assert caller and caller[0].status.status_code == StatusCode.ERROR, explain(
        response,
        f"{why}: the span the call to the warehouse names as its parent ({match[2]}) is ended with status ERROR; "
        f"got {[(span.name, span.status.status_code.name) for span in caller] or 'no such span ended'}",
    )

    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(explain(response, f"every log line to be JSON (JsonFormatter); got:\n    {line}"), pytrace=False)
    ids = ("timestamp", "trace_id", "span_id", "request_id")
    named = [entry for entry in entries if entry.get("level") == "WARNING"
             and "warehouse_max_bytes" in json.dumps({k: v for k, v in entry.items() if k not in ids}, default=str)]
    assert named, explain(
        response,
        f"{why}: a line at WARNING on the service's logger that names the cause, the setting 'warehouse_max_bytes' "
        f"(e.g. in the exception's message); the service logged {entries}",
    )


@pytest.mark.task("tracing")
@pytest.mark.promise("P9", "P11")
def test_an_endless_answer_is_cut_off_after_the_limit(module, env):
    env.setenv("OBS_WAREHOUSE_MAX_BYTES", "64")
    chunks = [b'{"item_id": 3, "quantity": 7'] + [b" " * 64] * 100_000  # 6.4 MB of blanks, never a "}"
    warehouse = Streaming(chunks)
    response, _, _ = get_stock(module, warehouse)
    expect_problem(response, 502, "the warehouse's answer goes on far past warehouse_max_bytes (64): a 502 problem")
    pulled = [answer.pulled for answer in warehouse.answers]
    # The limit is passed at the 2nd chunk; reading ahead a little is allowed, reading on is not.
    assert len(pulled) == 1 and pulled[0] <= 100, explain(
        response,
        "the answer is read as it streams in (client.stream, aiter_bytes) and no further than one byte past "
        f"warehouse_max_bytes (64 bytes here, passed at the 2nd of {len(chunks)} chunks of at most 64 bytes); "
        f"the service pulled {pulled} chunks",
    )
