"""Attacks on the reference solution of exercise 12 (observability): tracing never breaks a request.

Hostile `traceparent` headers (bytes outside ASCII, a header of kilobytes, two of them, every
malformed field) sent as raw bytes to a real uvicorn server are ignored: a new trace, a 200,
and nothing of the header in the request ID. The stock route asks the warehouse only for
items it has, whatever the path's encoding, and a warehouse answering nonsense gets a 502.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from grader.environment import settings_environment
from grader.live import serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "12_observability"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attacks12")
    database_url = f"sqlite+aiosqlite:///{folder / 'inventory.db'}"
    loggers = [logging.getLogger(name) for name in ("inventory", "inventory.access")]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    with settings_environment("OBS_", folder, OBS_SECRET_KEY="attack-secret", OBS_DATABASE_URL=database_url):
        loaded = load_module(Path(SOLUTION), "app")
        loaded.get_settings.cache_clear()
        yield loaded
        loaded.get_settings.cache_clear()
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def traced(module, answer=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    asked: list[str] = []

    def warehouse(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return answer(request) if answer else httpx.Response(200, json={"item_id": 1, "quantity": 7})

    app = module.create_app(tracer_provider=provider, transport=httpx.MockTransport(warehouse))
    return app, exporter, asked


def raw_get(base_url: str, path: str, headers: list[bytes]) -> bytes:
    """One GET with header lines sent byte for byte (an HTTP client would refuse some of them)."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                     + b"".join(line + b"\r\n" for line in headers) + b"\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_hostile_traceparents_on_a_real_server_start_new_traces(module):
    app, exporter, _ = traced(module)
    hostile = [
        [b"traceparent: 00-" + TRACE.encode() + b"-00f067aa0ba902b7-01\xff\xfe"],
        [b"traceparent: 00-" + TRACE.encode() + b"-00f067aa0ba902b7-01-" + b"a" * 6000],
        [b"traceparent: " + b"-".join([b"00", TRACE.encode(), b"0" * 16, b"01"])],
        [b"traceparent: \t00-" + TRACE.upper().encode() + b"-00f067aa0ba902b7-01"],
        [b"traceparent: 00-" + TRACE.encode() + b"-00f067aa0ba902b7"],
        [b"traceparent: 00--00f067aa0ba902b7-01", b"traceparent: 00-" + b"f" * 32 + b"-00f067aa0ba902b7-01"],
        [b"traceparent: 00-" + TRACE.encode() + b"-00f067aa0ba902b7-01", b"X-Request-ID: " + b"\xc3\xa9" * 10],
    ]
    with serve_in_thread(app, ws="none") as base_url:
        answers = [raw_get(base_url, "/items/1", headers) for headers in hostile]
    for headers, answer in zip(hostile, answers):
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split()[1] == b"200", (headers, answer[:300])
        request_id = re.search(rb"(?im)^x-request-id: (\S+)\r$", rest)
        assert request_id and re.fullmatch(rb"[0-9a-f]{32}", request_id[1]), (headers, answer[:300])
    spans = exporter.get_finished_spans()
    assert len(spans) == len(hostile)
    continued = [format_trace_id(span.context.trace_id) for span in spans if span.parent is not None]
    # Only the last one was a valid traceparent (its X-Request-ID is what was hostile there).
    assert continued == [TRACE], continued


def test_a_strangers_tracestate_never_reaches_the_log(module, caplog):
    """The service keeps no `tracestate`: OpenTelemetry's propagator logs a malformed one whole
    (a warning through the root logger, hence stderr under uvicorn), so a stranger's kilobytes
    would land in the log on every request. The trace is still continued from `traceparent`."""
    app, exporter, _ = traced(module)
    marker = "stranger" + "x" * 6000
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        response = client.get("/items/1", headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
                                                   "tracestate": f"{marker}=not w3c,{'k' * 300}=v"})
    assert response.status_code == 200, response.text
    logged = [record.getMessage() for record in caplog.records if "stranger" in record.getMessage()]
    assert not logged, f"a request's tracestate reached the log: {logged[0][:120]}..."
    assert [format_trace_id(span.context.trace_id) for span in exporter.get_finished_spans() if span.parent] == [TRACE]


@pytest.mark.parametrize("path", ["/items/%2e%2e/stock", "/items/4/stock", "/items/%2e%2e%2f1/stock", "/items/9223372036854775808/stock",
                                  "/items/-1/stock", "/items/1e309/stock", "/items/NaN/stock", "/items/0x1/stock"])
def test_the_warehouse_is_asked_only_about_items_the_service_has(module, path):
    app, _, asked = traced(module)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(path)
    assert response.status_code in (404, 422), (path, response.status_code, response.text)
    assert asked == [], (path, asked)


@pytest.mark.parametrize("body", [b'{"item_id": 1, "quantity": NaN}', b'{"item_id": 1, "quantity": 1e309}',
                                  b'{"item_id": 1, "quantity": "7"}', b'{"item_id": 1, "quantity": 7.5}', b'{"item_id": true, "quantity": 7}', b'{"item_id": 1}', b"[]", b"",
                                  b'{"item_id": 1, "quantity": 7', "\u00e9".encode("latin-1")])
def test_a_warehouse_answering_nonsense_gets_a_502(module, body):
    app, _, _ = traced(module, lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"}))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/items/1/stock")
    assert response.status_code == 502, (body, response.status_code, response.text)
