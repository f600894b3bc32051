"""Attacks on the reference solution of exercise 10 (service communication): the defences hold.

Every service runs under a real uvicorn on 127.0.0.1 where the attack needs one: raw request
targets (a literal `../`, which httpx would resolve before sending), an upstream that trickles
its answer a byte at a time, a gateway that gives up while orders would still work. The
gateway forwards nothing but its allow-list and nothing changes behind it; the timeout bounds
the whole answer; no order is placed after its caller was told 504; hostile numbers, headers
and bodies are 4xx, never 5xx.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from grader.live import free_port, http_only, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "10_service_communication"
ORDER = {"sku": "widget", "quantity": 3}


@pytest.fixture(scope="module")
def services() -> dict[str, ModuleType]:
    return {name: load_module(Path(SOLUTION), name) for name in ("inventory", "orders", "gateway")}


class Recorder:
    """An ASGI wrapper that records (method, decoded path) of every HTTP request reaching a service."""

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def raw(base_url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
    """Send `target` byte for byte (no client-side normalisation); return the status code."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers or {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def raw_bytes(base_url: str, request: bytes) -> bytes:
    """Send a hand-written HTTP/1.1 request (bytes no client library would send); return the status line."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536).split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def edge(services: dict[str, ModuleType]) -> Iterator[dict[str, Any]]:
    """The reference inventory and a recording stand-in for orders behind the reference gateway,
    all three on real uvicorn servers."""
    stand_in = FastAPI()

    @stand_in.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(path: str) -> dict[str, str]:
        return {"id": "o-1"}

    stock, orders = Recorder(services["inventory"].create_app()), Recorder(stand_in)
    gateway = services["gateway"]
    with serve_in_thread(stock, ws="none") as stock_url, serve_in_thread(orders, ws="none") as orders_url:
        app = gateway.create_app(gateway.Settings(inventory_url=stock_url, orders_url=orders_url, retries=0))
        with serve_in_thread(app, ws="none") as gateway_url:
            yield {"gateway": gateway_url, "inventory": stock_url, "recorders": (stock, orders)}


# Every spelling of a climb out of a path parameter we know of, and then some.
CLIMBS = [
    "../{t}", "..%2F{t}", "..%2f{t}", "%2e%2e/{t}", "%2E%2E%2F{t}", "%2e%2e%2f{t}", ".%2e/{t}", "%2e./{t}", "..%5C{t}",
    "..%5c{t}", "..\\{t}", "%252e%252e%252f{t}", "%252e%252e/{t}", "..%252F{t}", "..%25252F{t}", "./../{t}",
    ".%2F..%2F{t}", "..;/{t}", "..%3B/{t}", "..%00/{t}", "%00../{t}", ".../{t}", "....//{t}", "..../{t}", "..%20/{t}",
    "%2F..%2F{t}", "/../{t}", "//../{t}", "%c0%ae%c0%ae/{t}", "%c0%af{t}", "%EF%BC%8E%EF%BC%8E/{t}", "%u002e%u002e/{t}",
    "widget/../../{t}", "widget%2F..%2F..%2F{t}", "widget/..%2F..%2F{t}", "..", "%2e%2e", ".", "%2e", "widget/..",
    "widget/.", "widget%2F", "widget/", "%09../{t}", "..%09/{t}", "..%0d%0a/{t}", "~/../{t}", "..#/{t}", "..?/{t}",
]
TARGETS = ["events", "health", "openapi.json"]
METHODS = ["GET", "POST"]
# Other methods and targets, through the commonest climbs (each request opens a connection: keep it fast).
MORE = [(m, f"/api/{r}/{c.format(t=t)}") for m in ("PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
        for r in ("stock", "orders") for c in ("../{t}", "..%2F{t}", "%2e%2e/{t}") for t in ("events", "docs", "orders")]


def test_10_service_communication_no_climb_reaches_a_service(edge: dict[str, Any]) -> None:
    stock, orders = edge["recorders"]
    assert raw(edge["gateway"], "GET", "/api/stock/widget") == 200  # the control: raw requests do work
    stock.seen.clear()
    orders.seen.clear()
    answers: dict[tuple[str, str], int] = {}
    attacks = [(m, f"/api/{r}/{c.format(t=t)}") for r in ("stock", "orders") for c in CLIMBS for t in TARGETS
               for m in METHODS] + MORE
    for number, (method, path) in enumerate(attacks):
        event = {"type": "OrderPlaced", "event_id": f"climb-{number}", "order_id": "o", "sku": "widget",
                 "quantity": 1, "occurred_at": "2030-01-01T00:00:00+00:00"}
        answers[(method, path)] = raw(edge["gateway"], method, path, json.dumps(event).encode())
    # A 405 for HEAD or OPTIONS would be no leak either, but the gateway's catch-all answers them 404 too.
    let_through = {request: code for request, code in answers.items() if code not in (400, 404, 405)}
    assert not let_through, f"{len(let_through)} of {len(answers)} climbs were not refused: {list(let_through.items())[:8]}"
    assert stock.seen == [] and orders.seen == [], f"reached the services: {(stock.seen + orders.seen)[:8]}"
    level = httpx.get(f"{edge['inventory']}/stock/widget", verify=http_only()).json()
    assert level == {"sku": "widget", "available": 10}, f"the stock changed: {level}"


def test_10_service_communication_headers_no_client_sends_are_refused_or_replaced(edge: dict[str, Any]) -> None:
    stock, _ = edge["recorders"]
    stock.seen.clear()
    ids = [b"\xff\xfe\xfd", "ünïcode".encode(), b"a" * 5000, b"<script>", b"id with spaces", b"\x01\x02"]
    for request_id in ids:
        line = raw_bytes(edge["gateway"], b"GET /api/stock/widget HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + request_id
                         + b"\r\nConnection: close\r\n\r\n")
        assert line.split(b" ")[1] in (b"200", b"400"), f"X-Request-ID {request_id[:20]!r}: {line!r}"
    # Smuggled separators in the target itself: the server refuses them, or the gateway does.
    for target in (b"/api/stock/widget%0d%0aX-Injected:%201", b"/api/stock/widget\t", b"/api/stock/wid get"):
        line = raw_bytes(edge["gateway"], b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert line.split(b" ")[1] in (b"400", b"404"), f"{target!r}: {line!r}"
    assert all(path == "/stock/widget" for _, path in stock.seen), stock.seen


# --- Deadlines: a trickling inventory ----------------------------------------------------------------


class Trickle:
    """An inventory whose GET /stock answers one space every 0.05 s for `seconds`, then the JSON."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.over = threading.Event()
        self.ended = threading.Event()
        self.completed = False
        self.app = FastAPI()

        @self.app.get("/stock/{sku}")
        async def stock(sku: str) -> StreamingResponse:
            return StreamingResponse(self.body(sku), media_type="application/json")

    async def body(self, sku: str) -> AsyncIterator[bytes]:
        try:
            ends = time.monotonic() + self.seconds
            while time.monotonic() < ends and not self.over.is_set():
                yield b" "
                await asyncio.sleep(0.05)
            yield json.dumps({"sku": sku, "available": 10}).encode()
            self.completed = True
        finally:
            self.ended.set()


@pytest.fixture
def trickle() -> Iterator[tuple[Trickle, str]]:
    server = Trickle()
    with serve_in_thread(server.app, ws="none") as url:
        yield server, url
        server.over.set()


def test_10_service_communication_a_trickle_cannot_outlast_the_timeout(
    services: dict[str, ModuleType], trickle: tuple[Trickle, str]
) -> None:
    server, url = trickle
    server.seconds = 10.0
    orders, gateway = services["orders"], services["gateway"]
    service = orders.create_app(orders.Settings(inventory_url=url, timeout=0.3, retries=5, backoff=0.0))
    edge = gateway.create_app(gateway.Settings(inventory_url=url, orders_url="http://127.0.0.1:1", timeout=0.3,
                                               retries=5, backoff=0.0))
    with serve_in_thread(service, ws="none") as orders_url, serve_in_thread(edge, ws="none") as edge_url:
        with httpx.Client(verify=http_only(), timeout=10) as client:
            for method, url_, body in (("POST", f"{orders_url}/orders", ORDER), ("GET", f"{edge_url}/api/stock/widget", None)):
                started = time.perf_counter()
                response = client.request(method, url_, json=body)
                elapsed = time.perf_counter() - started
                assert response.status_code == 504 and elapsed < 1.5, (url_, response.status_code, f"{elapsed:.2f} s")


def test_10_service_communication_no_order_after_the_gateway_said_504(
    services: dict[str, ModuleType], trickle: tuple[Trickle, str]
) -> None:
    server, url = trickle
    server.seconds = 1.0
    orders, gateway = services["orders"], services["gateway"]
    published: list[dict[str, Any]] = []
    broker = orders.InProcessBroker()

    async def record(event: dict[str, Any]) -> None:
        published.append(event)

    broker.subscribe("OrderPlaced", record)
    service = orders.create_app(orders.Settings(inventory_url=url, timeout=30.0, retries=0), broker=broker)
    with serve_in_thread(service, ws="none") as orders_url:
        edge = gateway.create_app(gateway.Settings(orders_url=orders_url, inventory_url=url, timeout=0.4, retries=0))
        with serve_in_thread(edge, ws="none") as edge_url:
            answer = httpx.post(f"{edge_url}/api/orders", json=ORDER, verify=http_only(), timeout=10)
            assert answer.status_code == 504, answer.text
            assert server.ended.wait(5)
            time.sleep(0.3)  # had orders stayed for the late answer, it would place the order now
    assert not server.completed, "orders kept waiting for inventory after its caller's budget was spent"
    assert published == [], f"an order was placed after the client was told 504: {published}"


def test_10_service_communication_a_dead_inventory_fails_fast(services: dict[str, ModuleType]) -> None:
    orders = services["orders"]
    dead = f"http://127.0.0.1:{free_port()}"
    service = orders.create_app(orders.Settings(inventory_url=dead, timeout=2.0, retries=2, backoff=0.05))
    with serve_in_thread(service, ws="none") as orders_url:
        started = time.perf_counter()
        response = httpx.post(f"{orders_url}/orders", json=ORDER, verify=http_only(), timeout=10)
        elapsed = time.perf_counter() - started
    assert response.status_code == 503 and elapsed < 1.5, (response.status_code, response.text, f"{elapsed:.2f} s")


# --- Hostile input: 4xx, never 5xx -------------------------------------------------------------------------

HOSTILE_BODIES = [
    b'{"sku": "widget", "quantity": 1e309}', b'{"sku": "widget", "quantity": NaN}', b'{"sku": "widget", "quantity": Infinity}',
    f'{{"sku": "widget", "quantity": {2**63}}}'.encode(), f'{{"sku": "widget", "quantity": {10**400}}}'.encode(),
    b'{"sku": "widget", "quantity": 3.5}', b'{"sku": "widget", "quantity": "3.5"}', b'{"sku": "widget", "quantity": "1e309"}',
    b'{"sku": "' + b"w" * 100_000 + b'", "quantity": 1}', b'{"sku": null, "quantity": 1}', b'{"sku": ["widget"], "quantity": 1}',
    b'{"sku": "widget\\u0000", "quantity": 1}', b'{"sku": "..", "quantity": 1}', b"\xff\xfe", b"[]", b"null", b"",
    b'{"sku": "widget", "quantity": 1', b'{"sku": "widget", "quantity": 1, "quantity": 200}',
]


def test_10_service_communication_hostile_orders_are_4xx(services: dict[str, ModuleType]) -> None:
    # (Pydantic's lax mode reads "3" and true as the integers 3 and 1: accepted, and harmless.)
    orders = services["orders"]
    inventory_app = services["inventory"].create_app()
    settings = orders.Settings(inventory_url="http://inventory", timeout=2.0, retries=0)
    service = orders.create_app(settings, upstream_transport=httpx.ASGITransport(app=inventory_app))
    budgets = ["-1", "1.5", "soon", str(2**63), "1e309", "NaN", "0x10", "", "3600001"]
    with serve_in_thread(service, ws="none") as orders_url, httpx.Client(verify=http_only(), timeout=10) as client:
        codes = {body[:40]: client.post(f"{orders_url}/orders", content=body,
                                        headers={"content-type": "application/json"}).status_code
                 for body in HOSTILE_BODIES}
        codes |= {f"X-Timeout-Ms {value!r}".encode(): client.post(f"{orders_url}/orders", json=ORDER,
                                                                  headers={"X-Timeout-Ms": value}).status_code
                  for value in budgets}
        level = client.get(f"{orders_url}/orders/..%2F..%2Fhealth").status_code
    wrong = {body: code for body, code in codes.items() if not 400 <= code < 500}
    assert not wrong, wrong
    assert level == 404


def test_10_service_communication_hostile_events_are_4xx(services: dict[str, ModuleType]) -> None:
    inventory = services["inventory"]
    event = '{"type": "OrderPlaced", "event_id": "e-1", "order_id": "o", "sku": "widget", "quantity": %s, "occurred_at": "x"}'
    with serve_in_thread(inventory.create_app(), ws="none") as url, httpx.Client(verify=http_only(), timeout=10) as client:
        codes = {value: client.post(f"{url}/events", content=(event % value).encode(),
                                    headers={"content-type": "application/json"}).status_code
                 for value in ("1e309", "-1e309", "NaN", "Infinity", "0", "-5", "2.5", '"many"')}
        level = client.get(f"{url}/stock/widget").json()
        # A huge quantity is a valid (if odd) fact: it is applied, floored at 0, never a 5xx.
        huge = [client.post(f"{url}/events", content=(event % value).replace("e-1", value).encode(),
                            headers={"content-type": "application/json"}).status_code for value in (str(2**63), str(10**400))]
    assert all(code == 422 for code in codes.values()), codes
    assert level == {"sku": "widget", "available": 10}, level
    assert huge == [202, 202], huge


# --- Hostile upstreams: an answer that cannot be read is a 502, never a 500 ----------------------------------


class Hostile:
    """A raw ASGI upstream under uvicorn: every answer is `self.answer` = (status, headers, body), as bytes."""

    def __init__(self) -> None:
        self.answer: tuple[int, list[tuple[bytes, bytes]], bytes] = (200, [], b"")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        status, headers, body = self.answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


JSON_TYPE = (b"content-type", b"application/json")
STOCK = b'{"sku": "widget", "available": 10}'
GARBLED = {  # answers whose body httpx cannot decode
    "gzip that is not": (200, [JSON_TYPE, (b"content-encoding", b"gzip")], STOCK),
    "deflate that is not": (200, [JSON_TYPE, (b"content-encoding", b"deflate")], STOCK),
    "a gzip header, then garbage": (200, [JSON_TYPE, (b"content-encoding", b"gzip")], b"\x1f\x8b\x08\x00" + b"\xff" * 64),
}
NONSENSE_STOCK = {  # answers orders can decode but not use
    "not JSON": (200, [JSON_TYPE], b'{"sku": '),
    "nested 100000 deep": (200, [JSON_TYPE], b"[" * 100_000),
    "available Infinity": (200, [JSON_TYPE], b'{"sku": "widget", "available": Infinity}'),
    "available 1e400": (200, [JSON_TYPE], b'{"sku": "widget", "available": 1e400}'),
    "available NaN": (200, [JSON_TYPE], b'{"sku": "widget", "available": NaN}'),
    "available -1": (200, [JSON_TYPE], b'{"sku": "widget", "available": -1}'),
    "available true": (200, [JSON_TYPE], b'{"sku": "widget", "available": true}'),
}


def test_10_service_communication_unreadable_answers_are_502(services: dict[str, ModuleType]) -> None:
    orders, gateway = services["orders"], services["gateway"]
    upstream = Hostile()
    with serve_in_thread(upstream, ws="none") as url:
        service = orders.create_app(orders.Settings(inventory_url=url, retries=1, backoff=0.0))
        edge = gateway.create_app(gateway.Settings(inventory_url=url, orders_url=url, retries=1, backoff=0.0))
        with (serve_in_thread(service, ws="none") as orders_url, serve_in_thread(edge, ws="none") as gateway_url,
              httpx.Client(verify=http_only(), timeout=10) as client):
            codes = {}
            for what, answer in (GARBLED | NONSENSE_STOCK).items():
                upstream.answer = answer
                codes[f"orders, {what}"] = client.post(f"{orders_url}/orders", json=ORDER).status_code
            for what, answer in GARBLED.items():
                upstream.answer = answer
                codes[f"gateway GET, {what}"] = client.get(f"{gateway_url}/api/stock/widget").status_code
                codes[f"gateway POST, {what}"] = client.post(f"{gateway_url}/api/orders", json=ORDER).status_code
            # Shorter than its Content-Length: the connection broke mid-answer, a transport failure (503).
            upstream.answer = (200, [JSON_TYPE, (b"content-length", b"200")], STOCK)
            cut = {"orders": client.post(f"{orders_url}/orders", json=ORDER).status_code,
                   "gateway": client.get(f"{gateway_url}/api/stock/widget").status_code}
            # A problem the gateway cannot parse is a broken answer too: never relayed as it is.
            upstream.answer = (404, [(b"content-type", b"application/problem+json")], b"[" * 100_000)
            deep = client.get(f"{gateway_url}/api/stock/widget")
    assert all(code == 502 for code in codes.values()), codes
    assert cut == {"orders": 503, "gateway": 503}, cut
    assert (deep.status_code, deep.json().get("service")) == (502, "inventory"), deep.text[:200]


# --- What the gateway relays: the service's header bytes, and only problems any client can parse -------------


def strict(body: bytes) -> Any:
    """RFC 8259 JSON as any other client reads it: UTF-8; NaN, Infinity and numbers beyond a float refused."""
    def refuse(word: str) -> Any:
        raise ValueError(word)

    def finite(text: str) -> float:
        if abs(float(text)) == float("inf"):
            raise ValueError(text)
        return float(text)

    return json.loads(body.decode("utf-8"), parse_constant=refuse, parse_float=finite)


PROBLEM_TYPE = (b"content-type", b"application/problem+json")
A_PROBLEM = b'{"type": "about:blank", "title": "Not Found", "status": 404, "detail": "x", "instance": "/stock/widget"'
BROKEN_PROBLEMS = {  # problem bodies that are not strict JSON: each a 502 from the gateway
    "NaN": A_PROBLEM + b', "x": NaN}',
    "Infinity": A_PROBLEM + b', "x": Infinity}',
    "-Infinity": A_PROBLEM + b', "x": -Infinity}',
    "1e400": A_PROBLEM + b', "x": 1e400}',
    "-1e400 in a list": A_PROBLEM + b', "x": [-1e400]}',
    "NaN without an instance": b'{"status": 404, "x": NaN}',
    "an integer of 5000 digits (beyond Python's int parsing limit)": A_PROBLEM + b', "x": ' + b"9" * 5000 + b"}",
    "not UTF-8": A_PROBLEM + b', "x": "caf\xe9"}',
    "UTF-16": (A_PROBLEM + b"}").decode().encode("utf-16"),
    "a UTF-8 byte order mark": b"\xef\xbb\xbf" + A_PROBLEM + b"}",
    "nested 100000 deep, closed": A_PROBLEM + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "cut short": A_PROBLEM,
}
FINE_PROBLEMS = {  # unusual but strict JSON: relayed, only instance changed
    "nested 300 deep": A_PROBLEM + b', "x": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}",
    "1.7976931348623157e308": A_PROBLEM + b', "x": 1.7976931348623157e308}',
    "a lone surrogate escape": A_PROBLEM + b', "x": "\\ud800"}',
    "a problem 20 MB long": A_PROBLEM + b', "x": "' + b"a" * 20_000_000 + b'"}',
}


def test_10_service_communication_the_gateway_relays_only_strict_json_problems(services: dict[str, ModuleType]) -> None:
    gateway = services["gateway"]
    upstream = Hostile()
    with serve_in_thread(upstream, ws="none") as url:
        # breaker_failures: each broken problem is a failed call (README), and this test sends many in a row;
        # max_body_bytes: one problem is 20 MB long, past the default limit of 1 MiB (a 502 otherwise).
        edge = gateway.create_app(gateway.Settings(inventory_url=url, orders_url=url, retries=1, backoff=0.0, timeout=10,
                                                   breaker_failures=1000, max_body_bytes=32 * 1024 * 1024))
        with serve_in_thread(edge, ws="none") as gateway_url, httpx.Client(verify=http_only(), timeout=30) as client:
            broken, fine = {}, {}
            for what, body in BROKEN_PROBLEMS.items():
                upstream.answer = (404, [PROBLEM_TYPE], body)
                for method in ("GET", "POST"):
                    path = "/api/stock/widget" if method == "GET" else "/api/orders"
                    response = client.request(method, f"{gateway_url}{path}", json=ORDER if method == "POST" else None)
                    broken[f"{method}, {what}"] = (response.status_code, strict(response.content).get("type"))
            for what, body in FINE_PROBLEMS.items():
                upstream.answer = (404, [PROBLEM_TYPE], body)
                response = client.get(f"{gateway_url}/api/stock/widget")
                relayed = strict(response.content)
                sent = json.loads(body)
                fine[what] = (response.status_code, relayed == sent | {"instance": "/api/stock/widget"})
            # A body that is not a problem is not read at all: relayed byte for byte, whatever it holds.
            upstream.answer = (200, [JSON_TYPE], b'{"x": NaN}')
            unread = client.get(f"{gateway_url}/api/stock/widget")
    bad = "https://course.example/problems/bad-upstream"
    assert {k: v for k, v in broken.items() if v != (502, bad)} == {}, broken
    assert {k: v for k, v in fine.items() if v != (404, True)} == {}, fine
    assert (unread.status_code, unread.content) == (200, b'{"x": NaN}')


RAW_LOCATIONS = [  # what the service sent -> what the gateway must send, byte for byte
    ("/orders/€".encode(), b"/api" + "/orders/€".encode()),
    (b"/orders/caf\xe9", b"/api/orders/caf\xe9"),
    ("/orders/😀".encode(), b"/api" + "/orders/😀".encode()),
    ("http://shop.example/€".encode(), "http://shop.example/€".encode()),
]


def test_10_service_communication_header_bytes_that_are_not_latin_1_pass_through(services: dict[str, ModuleType]) -> None:
    gateway = services["gateway"]
    upstream = Hostile()
    with serve_in_thread(upstream, ws="none") as url:
        edge = gateway.create_app(gateway.Settings(inventory_url=url, orders_url=url, retries=0))
        with serve_in_thread(edge, ws="none") as gateway_url:
            got = []
            for sent, expected in RAW_LOCATIONS:
                upstream.answer = (201, [JSON_TYPE, (b"location", sent), (b"location", b"/orders/second"),
                                         (b"x-not-forwarded", "€".encode())], b'{"id": "x"}')
                for method, path in (("POST", "/api/orders"), ("GET", "/api/orders/x"), ("GET", "/api/stock/widget")):
                    parts = urlsplit(gateway_url)
                    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
                    try:
                        connection.request(method, path, body=b"{}", headers={"content-type": "application/json"})
                        response = connection.getresponse()
                        response.read()
                        headers = [(k.lower(), v.encode("latin-1")) for k, v in response.getheaders()]
                    finally:
                        connection.close()
                    locations = [v for k, v in headers if k == "location"]
                    leaked = [k for k, _ in headers if k == "x-not-forwarded"]
                    got.append((method, path, response.status, locations, leaked,
                                expected, [expected, b"/api/orders/second"]))
            # Retry-After and Content-Type too, on a 503 the gateway passes on.
            upstream.answer = (503, [(b"content-type", "application/json; x=€".encode()), (b"retry-after", "1 €".encode())], b"{}")
            passed_on = httpx.get(f"{gateway_url}/api/stock/widget", verify=http_only())
    wrong = [g for g in got if g[2:5] != (201, g[6], [])]
    assert not wrong, wrong
    kept = {k.lower(): v for k, v in passed_on.headers.raw if k.lower() in (b"content-type", b"retry-after")}
    assert (passed_on.status_code, kept) == (
        503, {b"content-type": "application/json; x=€".encode(), b"retry-after": "1 €".encode()}), passed_on.headers.raw
