"""Graded tests for exercise 10. Run: pytest exercises/10_service_communication

Most tests run the services in this process: httpx.ASGITransport connects one app to another
in memory, and asgi_lifespan.LifespanManager runs each app's lifespan. Failures (a service
that is down, slow, or broken) are injected with a fake upstream transport or with a real
server on 127.0.0.1. One test starts inventory and orders as real uvicorn processes.
"""

import asyncio
import gzip
import http.client
import json
import re
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from grader.expect import expect_header, expect_json, expect_problem, expect_status, explain, json_of
from grader.live import free_port, http_only, serve_in_process, serve_in_thread
from grader.upstreams import Streaming

ORDER = {"sku": "widget", "quantity": 3}
PROBLEMS = "https://course.example/problems/"  # the README's problem types: PROBLEMS + slug


# --- Fixtures and helpers ----------------------------------------------------------------------


# Each service module is imported once for this file: every test builds new apps with
# create_app(), which the README promises makes all of an app's state (stock, orders, clients).


@pytest.fixture
def inventory(load) -> ModuleType:
    return load("inventory", fresh=False)


@pytest.fixture
def orders(load) -> ModuleType:
    return load("orders", fresh=False)


@pytest.fixture
def gateway(load) -> ModuleType:
    return load("gateway", fresh=False)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[Any]:
    """Run the app's lifespan (ASGITransport alone never does); yield the running app.

    Send requests to the yielded app, not to `app`: it is the one that hands the state the
    lifespan yielded to every request.
    """
    async with LifespanManager(app) as manager:
        yield manager.app


def client_for(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", **kwargs)


def asgi(app: Any) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=app)


def tcp() -> httpx.AsyncHTTPTransport:
    """httpx's real network transport, for the plain-HTTP servers on 127.0.0.1 in these tests.

    http_only(): nothing here speaks HTTPS, so the transport does not load the CA bundle (tens of
    milliseconds for every client that loads it).
    """
    return httpx.AsyncHTTPTransport(verify=http_only())


class FakeUpstream(httpx.AsyncBaseTransport):
    """A scripted upstream: each request takes the next step (the last one repeats).

    A step is "down" (connection refused), "slow" (the read timed out), (status, json) or
    (status, json, headers). An error status (4xx, 5xx) is answered as a problem, as every
    service of this course answers: `json` gives its members on top of the `about:blank` ones.
    Every request is recorded, and using the transport after it was closed is an error,
    as it is for a real one.
    """

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps) or [(200, {"sku": "widget", "available": 10})]
        self.requests: list[httpx.Request] = []
        self.arrived: list[float] = []  # time.perf_counter() of each request
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.closed:
            raise RuntimeError("this transport was used after its client had been closed")
        self.requests.append(request)
        self.arrived.append(time.perf_counter())
        step = self.steps[min(len(self.requests), len(self.steps)) - 1]
        if step == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if step == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        status_code, body, *headers = step
        if status_code >= 400:
            body = {"type": "about:blank", "title": HTTPStatus(status_code).phrase, "status": status_code,
                    "detail": "As scripted.", "instance": request.url.path, **body}
            content = json.dumps(body).encode()
            return httpx.Response(status_code, content=content, request=request,
                                  headers={"content-type": "application/problem+json", **(headers[0] if headers else {})})
        return httpx.Response(status_code, json=body, headers=headers[0] if headers else None, request=request)

    async def aclose(self) -> None:
        self.closed += 1


def orders_settings(orders: ModuleType, **overrides: Any) -> Any:
    defaults = {"inventory_url": "http://inventory.test", "retries": 2, "backoff": 0.0, "timeout": 1.0}
    return orders.Settings(**(defaults | overrides))


async def place(orders: ModuleType, upstream: httpx.AsyncBaseTransport, **settings: Any) -> httpx.Response:
    async with serving(orders.create_app(orders_settings(orders, **settings), upstream_transport=upstream)) as app:
        async with client_for(app) as client:
            return await client.post("/orders", json=ORDER)


UPSTREAM_PROBLEMS = {  # status -> the README's problem type and title for a failing upstream
    502: ("bad-upstream", "Bad answer from an upstream service"),
    503: ("upstream-unavailable", "Upstream service unavailable"),
    504: ("upstream-timeout", "Upstream service timed out"),
}


def expect_typed_problem(response: httpx.Response, status: int, slug: str, title: str, why: str = "", **members: Any) -> dict:
    """A problem of one of the README's types: its type URI, its fixed title and its members."""
    body = expect_problem(response, status, why, type=PROBLEMS + slug)
    wanted = {"title": title, **members}
    got = {name: body.get(name, "(missing)") for name in wanted}
    assert got == wanted, explain(response, f"a {slug} problem with {wanted}" + (f" ({why})" if why else "") + f"; it had {got}")
    return body


def expect_upstream_problem(response: httpx.Response, status: int, service: str, why: str = "", instance: str | None = None) -> dict:
    """The README's problem for a failing upstream: 503, 504 or 502, naming the service that failed."""
    slug, title = UPSTREAM_PROBLEMS[status]
    if instance is not None:
        expect_problem(response, status, why, instance=instance)
    return expect_typed_problem(response, status, slug, title, why, service=service)


async def eventually(check: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Poll `check` (a function, sync or async) until it returns something true, or `seconds`
    pass; return its last result. Events leave through the outbox after the answer: soon, not at once."""
    ends = time.monotonic() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > ends:
            return result
        await asyncio.sleep(0.01)


class LoopbackInventory:
    """A stand-in inventory that uvicorn serves on 127.0.0.1, for the tests that need real TCP.

    One server for the whole file (starting and stopping uvicorn costs 0.1-0.2 s); the
    `loopback` fixture gives each test a clean state. `delay` makes GET /stock answer only
    after that many seconds (or once the test is over), `trickle` makes it send its answer one
    byte at a time over that many seconds; POST /events answers 503 to the first delivery of
    each test, then accepts.
    """

    def __init__(self) -> None:
        self.reset()
        self.app = FastAPI()

        @self.app.get("/stock/{sku}")
        async def stock(sku: str) -> Any:
            if self.trickle:
                return StreamingResponse(self.trickled(sku), media_type="application/json")
            if self.delay:
                # Answers after `delay` seconds, or as soon as the test ended: it then has its
                # answer, and the server need not wait the delay out before it can stop.
                await asyncio.to_thread(self.test_over.wait, self.delay)
            return {"sku": sku, "available": 10}

        @self.app.post("/events", status_code=202)
        async def consume(payload: dict[str, Any]) -> Any:
            self.deliveries.append(payload)
            if len(self.deliveries) == 1:
                return JSONResponse({"detail": "busy, try again"}, status_code=503)
            return {"event_id": payload.get("event_id"), "applied": True}

    def reset(self) -> None:
        self.delay = 0.0
        self.trickle = 0.0
        self.deliveries: list[dict[str, Any]] = []
        self.test_over = threading.Event()
        self.trickle_ended = threading.Event()
        self.trickle_completed = False

    async def trickled(self, sku: str) -> AsyncIterator[bytes]:
        """One space every 0.05 s for `trickle` seconds (or until the test is over), then the JSON.

        Every read gets a byte long before any read timeout, so only a deadline on the whole
        call stops waiting for it. It records whether the caller stayed until the end.
        """
        try:
            ends = time.monotonic() + self.trickle
            while time.monotonic() < ends and not self.test_over.is_set():
                yield b" "
                await asyncio.sleep(0.05)
            yield b'{"sku": "%s", "available": 10}' % sku.encode()
            self.trickle_completed = True
        finally:
            self.trickle_ended.set()


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[tuple[LoopbackInventory, str]]:
    server = LoopbackInventory()
    with serve_in_thread(server.app, ws="none") as url:  # plain HTTP: no WebSocket library to load
        yield server, url


@pytest.fixture
def loopback(loopback_server: tuple[LoopbackInventory, str]) -> Iterator[tuple[LoopbackInventory, str]]:
    server, url = loopback_server
    server.reset()
    yield server, url
    server.test_over.set()


# --- Inventory ------------------------------------------------------------------------------------


@pytest.mark.task("inventory")
@pytest.mark.promise("P1")
@pytest.mark.asyncio
async def test_inventory_reports_stock(inventory: ModuleType) -> None:
    async with serving(inventory.create_app()) as app, client_for(app) as client:
        expect_json(await client.get("/health"), {"status": "ok", "service": "inventory"}, exact=True)
        expect_json(await client.get("/stock/widget"), {"sku": "widget", "available": 10}, exact=True)
        missing = await client.get("/stock/unobtainium")
        expect_problem(missing, 404, "an unknown SKU", type="about:blank")


@pytest.mark.task("inventory")
@pytest.mark.promise("P1")
@pytest.mark.asyncio
async def test_inventory_takes_its_stock_from_create_app(inventory: ModuleType) -> None:
    async with serving(inventory.create_app({"bolt": 4})) as app, client_for(app) as client:
        expect_json(await client.get("/stock/bolt"), {"sku": "bolt", "available": 4}, exact=True)
        expect_status(await client.get("/stock/widget"), 404, "create_app(stock) replaces the default stock")


# --- Calling inventory from orders: one client, settings from the environment ------------------------


@pytest.mark.task("shared_client")
@pytest.mark.promise("P3")
@pytest.mark.asyncio
async def test_place_an_order_through_inventory(inventory: ModuleType, orders: ModuleType) -> None:
    async with (
        serving(inventory.create_app()) as stock,
        serving(orders.create_app(orders_settings(orders), upstream_transport=asgi(stock))) as app,
        client_for(app) as client,
    ):
        expect_json(await client.get("/health"), {"status": "ok", "service": "orders"}, exact=True)
        created = await client.post("/orders", json=ORDER)
        expect_status(created, 201, "inventory has 10 widgets, so 3 can be ordered")
        body = expect_json(created, {"sku": "widget", "quantity": 3, "status": "placed"})
        assert isinstance(body.get("id"), str) and body["id"], explain(created, "a non-empty string id")
        expect_header(created, "location", f"/orders/{body['id']}")
        expect_json(await client.get(f"/orders/{body['id']}"), body, "the stored order", exact=True)
        expect_problem(await client.get("/orders/no-such-order"), 404, "an unknown order", type="about:blank")


@pytest.mark.task("shared_client")
@pytest.mark.promise("P3", "P17")
@pytest.mark.asyncio
async def test_orders_answers_from_what_inventory_says(inventory: ModuleType, orders: ModuleType) -> None:
    async with (
        serving(inventory.create_app({"widget": 2})) as stock,
        serving(orders.create_app(orders_settings(orders), upstream_transport=asgi(stock))) as app,
        client_for(app) as client,
    ):
        too_many = await client.post("/orders", json=ORDER)
        expect_typed_problem(too_many, 409, "out-of-stock", "Not enough stock", "3 widgets ordered, 2 in stock", available=2)
        expect_status(await client.post("/orders", json={"sku": "widget", "quantity": 2}), 201, "2 widgets ordered, 2 in stock: enough")
        unknown = await client.post("/orders", json={"sku": "unobtainium", "quantity": 1})
        expect_typed_problem(unknown, 422, "unknown-sku", "Unknown SKU", "inventory answered 404 for the SKU: the order cannot be placed")
        for quantity, rule in ((0, "quantity ≥ 1"), (101, "quantity ≤ 100")):
            refused = await client.post("/orders", json={"sku": "widget", "quantity": quantity})
            errors = expect_problem(refused, 422, rule).get("errors")
            assert isinstance(errors, list) and errors and all(
                isinstance(error, dict) and set(error) == {"loc", "msg", "type"} for error in errors), explain(
                refused, f"a 422 problem whose errors are each {{loc, msg, type}} (never the refused input); got {errors}")
        for number in ("1e309", "NaN", "-Infinity"):
            hostile = await client.post("/orders", content=f'{{"sku": "widget", "quantity": {number}}}'.encode(),
                                        headers={"content-type": "application/json"})
            expect_problem(hostile, 422, f"quantity {number}: not a whole number (a 422 must not echo the infinite or NaN "
                           "input: JSON cannot carry it, and the answer would become a 500)")


@pytest.mark.task("shared_client")
@pytest.mark.promise("P2")
@pytest.mark.asyncio
async def test_one_client_lives_as_long_as_the_app(orders: ModuleType) -> None:
    upstream = FakeUpstream()
    app = orders.create_app(orders_settings(orders), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        for _ in range(3):
            response = await client.post("/orders", json=ORDER)
            expect_status(response, 201, "three orders in a row through the same upstream client")
        assert upstream.closed == 0, explain(
            response, "the upstream client still open while the app runs (create it once, in the lifespan, "
            "not `async with httpx.AsyncClient()` per request)"
        )
    assert upstream.closed == 1, (
        f"\nexpected: the upstream client closed exactly once when the app stopped (lifespan teardown)\n"
        f"got:      closed {upstream.closed} times"
    )


@pytest.mark.task("shared_client")
@pytest.mark.promise("P2")
@pytest.mark.asyncio
async def test_inventory_url_comes_from_the_environment(orders: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INVENTORY_URL", "EVENTS_URL", "TIMEOUT", "RETRIES", "BACKOFF"):
        monkeypatch.delenv(f"ORDERS_{name}", raising=False)
    promised = {"inventory_url": "http://127.0.0.1:8001", "events_url": None, "timeout": 2.0, "retries": 2, "backoff": 0.05}
    defaults = {name: getattr(orders.Settings(), name, "(missing)") for name in promised}
    assert defaults == promised, (
        f"\nsent:     Settings() with no ORDERS_* variable set\nexpected: the defaults {promised}\ngot:      {defaults}"
    )
    monkeypatch.setenv("ORDERS_INVENTORY_URL", "http://inventory.internal:9000")
    upstream = FakeUpstream()
    app = orders.create_app(upstream_transport=upstream)  # no settings: they come from ORDERS_*
    async with serving(app) as running, client_for(running) as client:
        response = await client.post("/orders", json=ORDER)
    expect_status(response, 201)
    called = [str(request.url) for request in upstream.requests]
    assert called[:1] == ["http://inventory.internal:9000/stock/widget"], explain(
        response, f"a GET of http://inventory.internal:9000/stock/widget, the URL in ORDERS_INVENTORY_URL; "
        f"inventory was called at {called}"
    )


# Each setting's range (README): what must be accepted (the ends that are included, and just
# inside the ones that are not) and what must be refused (just outside, NaN and infinity).
COMMON_RANGES = {
    "timeout": ([0.001, 60], [0, -1, 60.5, float("nan"), float("inf")]),
    "retries": ([0, 10], [-1, 11]),
    "backoff": ([0, 10], [-0.01, 10.5, float("nan")]),
}
GATEWAY_RANGES = COMMON_RANGES | {
    "breaker_failures": ([1, 1000], [0, 1001]),
    "breaker_reset": ([0.001, 3600], [0, -1, 3600.5, float("nan")]),
    "max_concurrent": ([1, 10_000], [0, 10_001]),
    "max_body_bytes": ([1, 1_073_741_824], [0, 1_073_741_825]),
}


def settings_out_of_range(settings_class: Any, ranges: dict[str, tuple[list[Any], list[Any]]]) -> list[str]:
    """What Settings(...) got wrong: a value in range refused, or one out of range accepted."""
    wrong = []
    for name, (accepted, refused) in ranges.items():
        for value in accepted:
            try:
                made = getattr(settings_class(**{name: value}), name, "(missing)")
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                wrong.append(f"{name}={value!r} refused ({type(exc).__name__}), but it is in range")
            else:
                if made != value:
                    wrong.append(f"{name}={value!r} became {made!r}")
        for value in refused:
            try:
                settings_class(**{name: value})
            except ValueError:
                continue
            wrong.append(f"{name}={value!r} accepted, but it is out of range")
    return wrong


@pytest.mark.task("shared_client")
@pytest.mark.promise("P21")
def test_orders_settings_refuse_values_out_of_range(orders: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INVENTORY_URL", "EVENTS_URL", "TIMEOUT", "RETRIES", "BACKOFF"):
        monkeypatch.delenv(f"ORDERS_{name}", raising=False)
    wrong = settings_out_of_range(orders.Settings, COMMON_RANGES)
    assert not wrong, (
        "\nsent:     orders' Settings(...) with each setting at the ends of its range and just outside them\n"
        "expected: in range accepted; out of range (and NaN, infinity) refused when Settings is made, a ValidationError "
        "(Field(gt=0, le=60) ...): a wrong ORDERS_* variable stops the service at startup, not at its first request\n"
        f"got:      {'; '.join(wrong)}"
    )


@pytest.mark.task("gateway")
@pytest.mark.promise("P21")
def test_gateway_settings_have_their_defaults_and_ranges(gateway: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    promised = {"orders_url": "http://127.0.0.1:8002", "inventory_url": "http://127.0.0.1:8001", "timeout": 2.0,
                "retries": 1, "backoff": 0.05, "breaker_failures": 5, "breaker_reset": 10.0, "max_concurrent": 64,
                "max_body_bytes": 1_048_576}
    for name in promised:
        monkeypatch.delenv(f"GATEWAY_{name.upper()}", raising=False)
    defaults = {name: getattr(gateway.Settings(), name, "(missing)") for name in promised}
    assert defaults == promised, (
        f"\nsent:     the gateway's Settings() with no GATEWAY_* variable set\nexpected: the defaults {promised}\ngot:      {defaults}"
    )
    monkeypatch.setenv("GATEWAY_MAX_CONCURRENT", "7")
    from_env = getattr(gateway.Settings(), "max_concurrent", "(missing)")
    assert from_env == 7, f"\nsent:     GATEWAY_MAX_CONCURRENT=7, then Settings()\nexpected: max_concurrent 7\ngot:      {from_env!r}"
    monkeypatch.delenv("GATEWAY_MAX_CONCURRENT")
    wrong = settings_out_of_range(gateway.Settings, GATEWAY_RANGES)
    assert not wrong, (
        "\nsent:     the gateway's Settings(...) with each setting at the ends of its range and just outside them\n"
        "expected: in range accepted; out of range (and NaN, infinity) refused when Settings is made, a ValidationError "
        "(Field(ge=1, le=1000) ...)\n"
        f"got:      {'; '.join(wrong)}"
    )


# --- Failures upstream ---------------------------------------------------------------------------------


@pytest.mark.task("failures")
@pytest.mark.promise("P4")
@pytest.mark.asyncio
async def test_inventory_down_is_503(orders: ModuleType) -> None:
    closed_port = free_port()  # nothing listens there: the connection is refused
    settings = orders_settings(orders, inventory_url=f"http://127.0.0.1:{closed_port}", retries=0)
    app = orders.create_app(settings, upstream_transport=tcp())
    async with serving(app) as running, client_for(running) as client:
        response = await client.post("/orders", json=ORDER)
    expect_upstream_problem(response, 503, "inventory", "inventory refused the connection: the service is unavailable")


@pytest.mark.task("failures")
@pytest.mark.promise("P4")
@pytest.mark.asyncio
async def test_slow_inventory_is_504_after_the_timeout(
    orders: ModuleType, gateway: ModuleType, loopback: tuple[LoopbackInventory, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slow, slow_url = loopback
    slow.delay = 0.6  # a real server on 127.0.0.1 that answers after 0.6 s
    monkeypatch.setenv("ORDERS_INVENTORY_URL", slow_url)
    monkeypatch.setenv("ORDERS_TIMEOUT", "0.05")
    monkeypatch.setenv("ORDERS_RETRIES", "0")
    async with serving(orders.create_app(upstream_transport=tcp())) as app, client_for(app) as client:
        started = time.perf_counter()
        response = await client.post("/orders", json=ORDER)
        elapsed = time.perf_counter() - started
    expect_upstream_problem(response, 504, "inventory", "inventory took 0.6 s and ORDERS_TIMEOUT is 0.05 s")
    assert elapsed < 0.5, explain(response, f"an answer after about 0.05 s (the timeout), not {elapsed:.2f} s")
    # The client's own timeout (httpx.ReadTimeout, a TransportError too) is a 504 as well.
    response = await place(orders, FakeUpstream("slow"), retries=0)
    expect_upstream_problem(response, 504, "inventory", "the call to inventory raised httpx.ReadTimeout: it timed out")
    # The gateway too: its clients take the timeout from its Settings.
    settings = gateway.Settings(inventory_url=slow_url, timeout=0.05, retries=0)
    app = gateway.create_app(settings, transports={"orders": FakeUpstream(), "inventory": tcp()})
    async with serving(app) as running, client_for(running) as client:
        started = time.perf_counter()
        response = await client.get("/api/stock/widget")
        elapsed = time.perf_counter() - started
    expect_upstream_problem(response, 504, "inventory", "through the gateway: inventory took 0.6 s and the gateway's timeout is 0.05 s")
    assert elapsed < 0.5, explain(response, f"an answer after about 0.05 s (the gateway's timeout), not {elapsed:.2f} s")


@pytest.mark.task("failures")
@pytest.mark.promise("P4", "P5")
@pytest.mark.asyncio
async def test_inventory_error_is_502_and_not_retried(orders: ModuleType) -> None:
    upstream = FakeUpstream((500, {"detail": "Internal Server Error"}))
    response = await place(orders, upstream)
    expect_upstream_problem(response, 502, "inventory", "inventory answered 500: a bad answer from upstream is 502 Bad Gateway")
    assert len(upstream.requests) == 1, explain(
        response, f"one call: a 500 is a bug upstream, not a transient failure; got {len(upstream.requests)} calls"
    )
    busy = FakeUpstream((503, {"detail": "busy"}))
    response = await place(orders, busy, retries=2)
    expect_upstream_problem(response, 502, "inventory", "inventory answered 503 to every attempt: its answer was bad, so 502 Bad Gateway")
    assert len(busy.requests) == 3, explain(
        response, f"3 calls: a 503 is transient, so it is retried (retries=2); got {len(busy.requests)} calls"
    )


class Unreadable(httpx.AsyncBaseTransport):
    """An upstream that answers, but with something that cannot be read: `body` sent as it is (a
    stream, so that httpx decodes it only when the client reads it, as it does off the network),
    with `headers`. Every request is recorded."""

    def __init__(self, status_code: int, body: bytes, headers: Any) -> None:
        self.status_code, self.body, self.headers = status_code, body, headers
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status_code, headers=self.headers, stream=httpx.ByteStream(self.body), request=request)


JSON = {"content-type": "application/json"}
UNDECODABLE = {  # what was sent -> (body, headers): each a 200 whose body its Content-Encoding does not decode
    "Content-Encoding: gzip on a body that is not gzip": (b'{"sku": "widget", "available": 10}', JSON | {"content-encoding": "gzip"}),
    "Content-Encoding: deflate on a body that is not deflate": (b"\x00\x01 not deflate", JSON | {"content-encoding": "deflate"}),
    "Content-Encoding: gzip on a gzip header followed by garbage": (b"\x1f\x8b\x08\x00" + b"\xff" * 40, JSON | {"content-encoding": "gzip"}),
}
UNREADABLE_STOCK = {  # more 200s orders cannot read: not JSON, or no whole number of at least 0 as `available`
    "a body that is not JSON": (b'{"sku": "widget", "avail', JSON),
    "JSON nested 100000 deep": (b"[" * 100_000, JSON),
    "JSON without available": (b'{"sku": "widget"}', JSON),
    "available: Infinity": (b'{"sku": "widget", "available": Infinity}', JSON),
    "available: NaN": (b'{"sku": "widget", "available": NaN}', JSON),
    'available: "lots"': (b'{"sku": "widget", "available": "lots"}', JSON),
    "available: 1e400": (b'{"sku": "widget", "available": 1e400}', JSON),
    "available: -5": (b'{"sku": "widget", "available": -5}', JSON),
    "a JSON list": (b"[10]", JSON),
}


def as_a_client_sees(app: Any) -> httpx.AsyncClient:
    """A client that gets what the app sent (its 500 too) before an exception went on to the
    server's log, as a real client does: the test then says which status came back."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test")


@pytest.mark.task("failures")
@pytest.mark.promise("P20", "P4")
@pytest.mark.asyncio
async def test_an_answer_that_cannot_be_read_is_502(orders: ModuleType, gateway: ModuleType) -> None:
    for what, (body, headers) in (UNDECODABLE | UNREADABLE_STOCK).items():
        upstream = Unreadable(200, body, headers)
        app = orders.create_app(orders_settings(orders, retries=2), upstream_transport=upstream)
        async with serving(app) as running, as_a_client_sees(running) as client:
            response = await client.post("/orders", json=ORDER)
        why = f"inventory answered GET /stock/widget with 200 and {what}: an answer that cannot be read is a broken answer, 502 Bad Gateway"
        if what in UNDECODABLE:
            why += " (httpx raises httpx.DecodingError for a body it cannot decode, and that is not an httpx.TransportError)"
        expect_upstream_problem(response, 502, "inventory", why)
        assert len(upstream.requests) == 1, explain(
            response, f"one call to inventory, which answered {what}: a broken answer is not retried, like a 500; "
            f"got {len(upstream.requests)} calls"
        )
    for what, (body, headers) in UNDECODABLE.items():
        for method, path, service in (("GET", "/api/stock/widget", "inventory"), ("POST", "/api/orders", "orders")):
            broken = Unreadable(200, body, headers)
            app = gateway.create_app(gateway.Settings(retries=0), transports={service: broken})
            async with serving(app) as running, as_a_client_sees(running) as client:
                response = await client.request(method, path, json=ORDER)
            expect_upstream_problem(response, 502, service, f"{method} {path}: the {service} service answered 200 with "
                                    f"{what}, which the gateway cannot read (httpx.DecodingError)")


def a_problem(status_code: int, **members: Any) -> dict[str, Any]:
    return {"type": "about:blank", "title": HTTPStatus(status_code).phrase, "status": status_code,
            "detail": "As the service wrote it.", "instance": "/stock/widget", **members}


def with_member(problem: dict[str, Any], raw_value: bytes) -> bytes:
    """`problem` as JSON with one more member, "extra", whose value is `raw_value` written as it is."""
    return json.dumps(problem).encode()[:-1] + b', "extra": ' + raw_value + b"}"


NOT_STRICT_JSON = {  # what the problem body holds -> the body (application/problem+json)
    "NaN": with_member(a_problem(404), b"NaN"),
    "Infinity": with_member(a_problem(404), b"Infinity"),
    "-Infinity": with_member(a_problem(409), b"-Infinity"),
    "1e400 (too large for a float: Python reads it as infinity)": with_member(a_problem(404), b"1e400"),
    "-1e999": with_member(a_problem(422), b"[-1e999]"),
    "NaN, and no instance to rewrite": b'{"type": "about:blank", "status": 404, "extra": NaN}',
    "bytes that are not UTF-8": with_member(a_problem(404), b'"caf\xe9"'),
    "UTF-16": json.dumps(a_problem(404)).encode("utf-16"),
    "text that is not JSON": b"Not Found (and not JSON)",
    "JSON cut short": json.dumps(a_problem(404)).encode()[:-9],
    "JSON nested 100000 deep, never closed": b"[" * 100_000,
    "JSON nested 100000 deep": b'{"type": "about:blank", "status": 404, "instance": "/stock/widget", "extra": '
                               + b"[" * 100_000 + b"]" * 100_000 + b"}",
}
STRICT_JSON = {  # problems the gateway must relay (only `instance` changed): strict JSON, if unusual
    "a float at the edge of the range": a_problem(404, extra=1.7976931348623157e308),
    "a large integer": a_problem(404, extra=10**40),
    "-0.0 and 1e-400": a_problem(404, extra=[-0.0, 0.0]),
    "text in many scripts": a_problem(404, detail="Pas de « widget » €, 在庫なし"),
    "nesting 40 deep": a_problem(404, extra=json.loads("[" * 40 + "]" * 40)),
}


@pytest.mark.task("failures")
@pytest.mark.promise("P20", "P8")
@pytest.mark.asyncio
async def test_the_gateway_relays_only_problems_any_client_can_parse(gateway: ModuleType) -> None:
    def strict(body: bytes) -> Any:
        """RFC 8259 JSON as any client reads it: UTF-8, and NaN, Infinity and out-of-range numbers refused."""
        def refuse(text: str) -> Any:
            raise ValueError(f"{text} is not JSON")

        def finite(text: str) -> float:
            if abs(float(text)) == float("inf"):
                raise ValueError(f"{text} is out of range")
            return float(text)

        return json.loads(body.decode("utf-8"), parse_constant=refuse, parse_float=finite)

    # The media type as services write it: with a parameter, in any case (RFC 9110).
    media_types = ["application/problem+json", "application/problem+json; charset=utf-8", "Application/Problem+JSON"]
    for number, (what, body) in enumerate(NOT_STRICT_JSON.items()):
        for method, path, service in (("GET", "/api/stock/widget", "inventory"), ("POST", "/api/orders", "orders")):
            broken = Unreadable(404, body, {"content-type": media_types[number % len(media_types)]})
            app = gateway.create_app(gateway.Settings(retries=1, backoff=0.0), transports={service: broken})
            async with serving(app) as running, as_a_client_sees(running) as client:
                response = await client.request(method, path, json=ORDER if method == "POST" else None)
            why = (f"{method} {path}: the {service} service answered 404 with an application/problem+json body holding "
                   f"{what}. Not strict JSON: Python's json reads it (NaN, Infinity, 1e400 as infinity), but "
                   f"json.dumps would write it back as NaN or Infinity, which no other client parses. A problem the "
                   f"gateway cannot read is a broken answer: 502 Bad Gateway, never relayed and never a 500")
            expect_upstream_problem(response, 502, service, why)
            try:
                strict(response.content)
            except (ValueError, RecursionError) as exc:
                raise AssertionError(explain(response, f"{why}; the body sent back is not strict JSON ({exc})")) from None
            assert len(broken.requests) == 1, explain(
                response, f"{why}; one call: a broken answer is not retried (got {len(broken.requests)} calls)")
    problem = {"content-type": "application/problem+json"}
    for what, sent in STRICT_JSON.items():
        app = gateway.create_app(gateway.Settings(retries=0), transports={"inventory": Unreadable(404, json.dumps(sent).encode(), problem)})
        async with serving(app) as running, as_a_client_sees(running) as client:
            response = await client.get("/api/stock/widget")
        why = (f"inventory answered 404 with a problem holding {what}: strict JSON, so relayed as the service wrote it, "
               f"with the gateway's path as its instance")
        expect_problem(response, 404, why, instance="/api/stock/widget")
        try:
            relayed = strict(response.content)
        except (ValueError, RecursionError) as exc:
            raise AssertionError(explain(response, f"{why}; the body sent back is not strict JSON ({exc})")) from None
        assert relayed == sent | {"instance": "/api/stock/widget"}, explain(response, f"{why}: {sent}")
    # A body that is not a problem is not read: relayed byte for byte, whatever it holds.
    unread = b'{ "sku":"widget",  "available": 10, "note": NaN }'
    app = gateway.create_app(gateway.Settings(retries=0), transports={"inventory": Unreadable(200, unread, {"content-type": "application/json"})})
    async with serving(app) as running, as_a_client_sees(running) as client:
        response = await client.get("/api/stock/widget")
    assert (response.status_code, response.content) == (200, unread), explain(
        response, f"inventory answered 200 with the application/json body {unread.decode()}: the gateway reads only "
        f"problems; any other body is relayed byte for byte (200 and the same bytes)")
    # Strict JSON that is not an object has no instance to rewrite: relayed as it is, never a 500.
    for body in (b"[1, 2]", b'"Not Found"', b"null"):
        app = gateway.create_app(gateway.Settings(retries=0), transports={"inventory": Unreadable(404, body, problem)})
        async with serving(app) as running, as_a_client_sees(running) as client:
            response = await client.get("/api/stock/widget")
        assert (response.status_code, response.content) == (404, body), explain(
            response, f"inventory answered 404 with an application/problem+json body of {body.decode()}: JSON, but no "
            f"object, so no instance to rewrite: relayed as it is (404 and the same body), never a 500")


@pytest.mark.task("failures")
@pytest.mark.promise("P20", "P8")
@pytest.mark.asyncio
async def test_the_gateway_relays_no_answer_longer_than_its_limit(gateway: ModuleType) -> None:
    limit = 1000
    cases = {  # what the service streams -> the bytes it sends, the headers, and whether it is relayed
        "exactly max_body_bytes (1000), in 10 chunks": ([b"x" * 100] * 10, None, True),
        "one byte more than max_body_bytes, in 11 chunks": ([b"x" * 100] * 10 + [b"x"], None, False),
        "200 chunks of 100 bytes": ([b"x" * 100] * 200, None, False),
        "a 5000-byte body gzipped to a few dozen bytes (Content-Encoding: gzip)":
            ([gzip.compress(b"x" * 5000)], {"content-type": "application/json", "content-encoding": "gzip"}, False),
    }
    for what, (chunks, headers, relayed) in cases.items():
        for method, path, service in (("GET", "/api/stock/widget", "inventory"), ("POST", "/api/orders", "orders")):
            upstream = Streaming(chunks, headers)
            settings = gateway.Settings(retries=2, backoff=0.0, max_body_bytes=limit)
            app = gateway.create_app(settings, transports={service: upstream})
            async with serving(app) as running, as_a_client_sees(running) as client:
                response = await client.request(method, path, json=ORDER if method == "POST" else None)
            why = (f"{method} {path} with max_body_bytes={limit}: the {service} service answered 200 with a body of "
                   f"{what}")
            if relayed:
                assert (response.status_code, response.content) == (200, b"".join(chunks)), explain(
                    response, f"{why}: at the limit, so relayed as it is (200 and the same {limit} bytes)")
                continue
            expect_upstream_problem(response, 502, service, f"{why}: longer than the gateway relays (once decoded), "
                                    f"a broken answer: 502 Bad Gateway")
            pulled = [answer.pulled for answer in upstream.answers]
            assert pulled and max(pulled) <= 14 and len(upstream.requests) == 1, explain(
                response, f"{why}: the body is read as it streams in, and no further than the limit (a service "
                f"streaming gigabytes must not fill the gateway's memory): stream it, count, stop one byte past the "
                f"limit; one call, not retried. The service handed over {pulled} of its {len(chunks)} chunks"
                f" in {len(upstream.requests)} calls")


@pytest.mark.task("gateway")
@pytest.mark.promise("P8", "P17")
@pytest.mark.asyncio
async def test_the_gateway_forwards_no_request_longer_than_its_limit(gateway: ModuleType) -> None:
    limit = 1000

    async def chunked(size: int) -> AsyncIterator[bytes]:  # no Content-Length: the length shows only as it streams
        for start in range(0, size, 100):
            yield b"x" * min(100, size - start)

    for how in ("with its Content-Length", "chunked, without a Content-Length"):
        for size, forwarded in ((limit, True), (limit + 1, False), (50 * limit, False)):
            placing = FakeUpstream((201, {"id": "abc"}))
            app = gateway.create_app(gateway.Settings(max_body_bytes=limit), transports={"orders": placing})
            async with serving(app) as running, as_a_client_sees(running) as client:
                body = b"x" * size if how.startswith("with") else chunked(size)
                response = await client.post("/api/orders", content=body, headers={"content-type": "application/json"})
            why = f"POST /api/orders with a body of {size} bytes, {how}, to a gateway with max_body_bytes={limit}"
            if forwarded:
                expect_status(response, 201, f"{why}: at the limit, forwarded")
                got = [len(request.content) for request in placing.requests]
                assert got == [size], explain(response, f"{why}: forwarded once, all {size} bytes; orders got {got}")
                continue
            expect_problem(response, 413, f"{why}: longer than the limit, 413 Content Too Large, a problem")
            assert not placing.requests, explain(response, f"{why}: refused, so nothing is sent to orders; it got "
                                                           f"{len(placing.requests)} requests")


# Response headers that Starlette cannot write from a str (it encodes header text as Latin-1): the
# gateway passes on the bytes the service sent. Each: (status, the header's name as the service
# wrote it, its bytes, what the client must get). Names are case-insensitive: some servers write
# "Location", others "location".
RAW_HEADERS = [
    (201, b"location", "/orders/€".encode(), b"/api" + "/orders/€".encode()),
    (201, b"Location", "/orders/ключ-😀".encode(), b"/api" + "/orders/ключ-😀".encode()),
    (303, b"LOCATION", b"/orders/caf\xe9", b"/api/orders/caf\xe9"),
    (201, b"location", "https://shop.example/orders/€".encode(), "https://shop.example/orders/€".encode()),
    (200, b"Content-Type", "application/json; profile=\"/schémas/€\"".encode(), "application/json; profile=\"/schémas/€\"".encode()),
    (503, b"Retry-After", "1 €".encode(), "1 €".encode()),
]


@pytest.mark.task("gateway")
@pytest.mark.promise("P8")
def test_the_gateway_passes_headers_on_as_the_service_sent_them(gateway: ModuleType) -> None:
    upstream = Unreadable(200, b'{"id": "o-1"}', {})  # both services; each case sets its answer
    app = gateway.create_app(gateway.Settings(retries=0), transports={"orders": upstream, "inventory": upstream})
    with serve_in_thread(app, ws="none") as url:
        parts = urlsplit(url)
        for status_code, name, value, expected in RAW_HEADERS:
            upstream.status_code = status_code
            upstream.headers = [(name, value)] if name.lower() == b"content-type" else [(b"content-type", b"application/json"), (name, value)]
            for method, path, service in (("POST", "/api/orders", "orders"), ("GET", "/api/orders/o-1", "orders"),
                                          ("GET", "/api/stock/widget", "inventory")):
                connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
                try:
                    connection.request(method, path, body=json.dumps(ORDER).encode() if method == "POST" else None,
                                       headers={"content-type": "application/json"})
                    response = connection.getresponse()
                    body = response.read()
                    # http.client reads header bytes as Latin-1: encoding them back gives the bytes sent.
                    got = [v.encode("latin-1") for k, v in response.getheaders() if k.lower() == name.decode().lower()]
                finally:
                    connection.close()
                assert (response.status, got) == (status_code, [expected]), (
                    f"\nsent:     {method} {path} to the gateway on a real server; the {service} service answered "
                    f"{status_code} with {name.decode()}: {value!r} (bytes that are not Latin-1 text)\n"
                    f"expected: {status_code} with {name.decode()}: {expected!r}, the service's bytes (a Location "
                    f"path with /api in front): copy the headers from upstream.headers.raw into the response's raw_headers; "
                    f"Starlette writes a str header as Latin-1 and cannot write '€' (a 500)\n"
                    f"got:      {response.status} with {name.decode()}: {got}; body {body[:200]!r}"
                )


# --- Retries -------------------------------------------------------------------------------------------


@pytest.mark.task("retries")
@pytest.mark.promise("P5")
@pytest.mark.asyncio
async def test_transient_failures_are_retried_with_backoff(orders: ModuleType) -> None:
    upstream = FakeUpstream("down", "slow", (200, {"sku": "widget", "available": 10}))
    response = await place(orders, upstream, retries=2, backoff=0.02)
    expect_status(response, 201, "inventory failed twice, then answered: two retries are allowed")
    assert len(upstream.requests) == 3, explain(response, f"3 calls to inventory, got {len(upstream.requests)}")
    waits = [later - earlier for earlier, later in zip(upstream.arrived, upstream.arrived[1:])]
    # Each wait is at least the sleep before it (less 1 ms for clock rounding); without one it
    # is about 1 ms, and with a backoff that does not double the second is about 0.02 s.
    assert waits[0] >= 0.019 and waits[1] >= 0.039, explain(
        response, "backoff before each retry: 0.02 s, then 0.04 s (backoff=0.02, doubled each time); "
        f"the retries came {' and '.join(f'{wait:.3f} s' for wait in waits)} after the call before them"
    )


class FailsOncePerCaller(httpx.AsyncBaseTransport):
    """An upstream that refuses the first call of each request ID and answers the second; it
    records when each call of each ID arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        calls = self.arrivals.setdefault(request.headers.get("x-request-id", ""), [])
        calls.append(time.perf_counter())
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"sku": "widget", "available": 10}, request=request)


@pytest.mark.task("retries")
@pytest.mark.promise("P5")
@pytest.mark.asyncio
async def test_callers_that_failed_together_do_not_retry_together(orders: ModuleType) -> None:
    upstream = FailsOncePerCaller()
    app = orders.create_app(orders_settings(orders, retries=1, backoff=1.0, timeout=5.0), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        answers = await asyncio.gather(*(client.post("/orders", json=ORDER, headers={"X-Request-ID": f"caller-{n}"})
                                         for n in range(16)))
    expect_status(answers[0], 201, "inventory refused each caller's first call and answered the retry")
    waits = sorted(calls[1] - calls[0] for calls in upstream.arrivals.values() if len(calls) == 2)
    # With jitter the waits are spread over 1.0 to 1.5 s: the 14 in the middle of 16 span 0.1 s or
    # more but about once in ten million runs. Without it they are all 1.0 s, give or take what a
    # busy machine adds to a few of them (the shortest and longest wait are left out for that).
    assert len(waits) == 16 and waits[0] >= 0.999 and waits[14] - waits[1] >= 0.1, explain(
        answers[-1], "16 orders failed at the same moment; each retried after its backoff (1.0 s here) stretched by a random "
        "jitter of up to half as much again, so that they do not all come back at the same instant: the waits spread "
        f"over 0.1 s or more; the waits before the retries were {', '.join(f'{wait:.3f}' for wait in waits)} s"
    )


@pytest.mark.task("retries")
@pytest.mark.promise("P5")
@pytest.mark.asyncio
async def test_retries_give_up(orders: ModuleType) -> None:
    upstream = FakeUpstream("down")
    response = await place(orders, upstream, retries=2)
    expect_status(response, 503, "inventory stayed down through every retry")
    assert len(upstream.requests) == 3, explain(response, f"1 call + 2 retries = 3, got {len(upstream.requests)}")


@pytest.mark.task("retries")
@pytest.mark.promise("P6", "P8")
@pytest.mark.asyncio
async def test_retry_after_is_honoured_and_sent(orders: ModuleType, gateway: ModuleType) -> None:
    busy = FakeUpstream((503, {"detail": "restarting"}, {"Retry-After": "3"}))
    started = time.perf_counter()
    response = await place(orders, busy, retries=2, backoff=0.0, timeout=1.0)
    elapsed = time.perf_counter() - started
    expect_status(response, 502, "inventory answered 503 and asked for 3 s (Retry-After: 3)")
    assert len(busy.requests) == 1 and elapsed < 2.5, explain(
        response, "one call, answered at once: inventory asked not to be called again for 3 s (Retry-After: 3), "
        f"and the request has 1 s; a retry before then would ignore what it asked, and waiting 3 s would outlast the "
        f"deadline; got {len(busy.requests)} calls in {elapsed:.2f} s (the app's start included)"
    )
    reading = FakeUpstream((503, {"detail": "restarting"}, {"Retry-After": "3"}))
    app = gateway.create_app(gateway.Settings(timeout=1.0, retries=2, backoff=0.0),
                             transports={"orders": FakeUpstream(), "inventory": reading})
    async with serving(app) as running, client_for(running) as client:
        passed_on = await client.get("/api/stock/widget")
    relayed = expect_problem(passed_on, 503, "the gateway: inventory's 503 problem, passed on (its instance the gateway's path)")
    assert relayed.get("detail") == "restarting", explain(passed_on, "inventory's own problem relayed as it is (its detail kept)")
    expect_header(passed_on, "retry-after", "3", "inventory's Retry-After, passed on to the client")
    assert len(reading.requests) == 1, explain(passed_on, f"one call from the gateway too; got {len(reading.requests)}")
    down = await place(orders, FakeUpstream("down"), retries=0)
    expect_upstream_problem(down, 503, "inventory", "inventory cannot be reached")
    waited = expect_header(down, "retry-after", why="a 503 says when to try again (whole seconds)")
    assert waited.isdigit() and 1 <= int(waited) <= 3600, explain(down, f"Retry-After in whole seconds, 1 to 3600; got {waited!r}")
    app = gateway.create_app(transports={"orders": FakeUpstream("down"), "inventory": FakeUpstream()})
    async with serving(app) as running, client_for(running) as client:
        unreachable = await client.post("/api/orders", json=ORDER)
    expect_upstream_problem(unreachable, 503, "orders", "orders cannot be reached")
    waited = expect_header(unreachable, "retry-after", why="the gateway's own 503 says when to try again too")
    assert waited.isdigit() and 1 <= int(waited) <= 3600, explain(unreachable, f"Retry-After in whole seconds; got {waited!r}")


@pytest.mark.task("retries")
@pytest.mark.promise("P6", "P19")
@pytest.mark.asyncio
async def test_a_retry_after_that_means_nothing_is_no_crash(orders: ModuleType, gateway: ModuleType) -> None:
    # Not whole seconds nor an HTTP date: "²" and "١" are digits to str.isdigit(), which float() or int() refuse or
    # read as 1; the rest overflow or are no number. Each is a Retry-After that says nothing: the backoff applies.
    for value in ("²", "١٢", "9" * 5000, "-1", "1.5", "1e3", "Mon, 99 Foo 2030 99:99:99 GMT", ""):
        stock = FakeUpstream((503, {"detail": "busy"}, {"Retry-After": value.encode()}), (200, {"sku": "widget", "available": 10}))
        app = orders.create_app(orders_settings(orders, retries=1, backoff=0.0, timeout=5.0), upstream_transport=stock)
        async with serving(app) as running, as_a_client_sees(running) as client:
            placed = await client.post("/orders", json=ORDER)
        expect_status(placed, 201, f"inventory answered 503 with Retry-After: {value!r}, which is neither whole seconds nor "
                                   f"an HTTP date, then 200: the retry after the backoff succeeds, never a 500")
        reading = FakeUpstream((503, {"detail": "busy"}, {"Retry-After": value.encode()}), (200, {"sku": "widget", "available": 10}))
        app = gateway.create_app(gateway.Settings(retries=1, backoff=0.0, timeout=5.0), transports={"inventory": reading})
        async with serving(app) as running, as_a_client_sees(running) as client:
            read = await client.get("/api/stock/widget")
        expect_status(read, 200, f"the gateway: inventory answered 503 with Retry-After: {value!r}, which is neither whole "
                                 f"seconds nor an HTTP date, then 200: the retry after the backoff succeeds, never a 500")


@pytest.mark.task("retries")
@pytest.mark.promise("P5")
@pytest.mark.asyncio
async def test_gateway_retries_get_but_never_post(gateway: ModuleType) -> None:
    settings = gateway.Settings(orders_url="http://orders.test", inventory_url="http://inventory.test", retries=1, backoff=0.0)
    posting = FakeUpstream("slow", (201, {"id": "abc"}))
    app = gateway.create_app(settings, transports={"orders": posting, "inventory": FakeUpstream()})
    async with serving(app) as running, client_for(running) as client:
        response = await client.post("/api/orders", json=ORDER)
    expect_upstream_problem(response, 504, "orders", "orders timed out on a POST")
    assert len(posting.requests) == 1, explain(
        response, "no retry of a POST: it may have been carried out before the timeout, and a retry would "
        f"place the order twice; the gateway sent it {len(posting.requests)} times"
    )
    reading = FakeUpstream("down", (503, {"detail": "busy"}), (200, {"sku": "widget", "available": 10}))
    app = gateway.create_app(settings.model_copy(update={"retries": 2}), transports={"orders": FakeUpstream(), "inventory": reading})
    async with serving(app) as running, client_for(running) as client:
        response = await client.get("/api/stock/widget")
    expect_status(response, 200, "a GET is safe to repeat: with retries=2 the gateway retries a refused connection, then a 503")
    assert len(reading.requests) == 3, explain(response, f"3 calls (down, 503, 200), got {len(reading.requests)}")


# --- Request IDs -----------------------------------------------------------------------------------------


@pytest.mark.task("request_id")
@pytest.mark.promise("P7")
@pytest.mark.asyncio
async def test_orders_passes_the_request_id_upstream(orders: ModuleType) -> None:
    upstream = FakeUpstream()
    app = orders.create_app(orders_settings(orders), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        response = await client.post("/orders", json=ORDER, headers={"X-Request-ID": "trace-123"})
        rejected = await client.post("/orders", json={"sku": "widget", "quantity": 11}, headers={"X-Request-ID": "trace-124"})
    expect_header(response, "x-request-id", "trace-123", "the caller's request id comes back")
    expect_status(rejected, 409, "11 widgets ordered, 10 in stock")
    expect_header(rejected, "x-request-id", "trace-124", "every response carries the id, an error too")
    seen = [request.headers.get("x-request-id") for request in upstream.requests]
    assert seen[:1] == ["trace-123"], explain(response, f"the call to inventory carrying X-Request-ID: trace-123; it carried {seen[:1]}")


@pytest.mark.task("request_id")
@pytest.mark.promise("P7")
@pytest.mark.asyncio
async def test_orders_creates_a_request_id_when_there_is_none(orders: ModuleType) -> None:
    upstream = FakeUpstream()
    app = orders.create_app(orders_settings(orders), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        first = await client.post("/orders", json=ORDER)
        second = await client.post("/orders", json=ORDER)
    created = expect_header(first, "x-request-id", why="created when the caller sent none")
    assert re.fullmatch(r"[0-9a-f]{32}", created) and created != expect_header(second, "x-request-id"), explain(
        second, f"a new id for every request, uuid4().hex (32 hexadecimal digits); got {created!r}")
    seen = upstream.requests[0].headers.get("x-request-id")
    assert seen == created, explain(first, f"the same id ({created}) on the call to inventory; it carried {seen}")


MALFORMED_IDS = ["x" * 65, "a b", "<script>", "id\tx", "ünï", "a;b", "a/b", "a=b", "a:b", "trace-1\n", "a+b", "a%20b"]
WELL_FORMED_ID = "A-z_0.9." * 8  # 64 characters, every kind allowed


@pytest.mark.task("request_id")
@pytest.mark.promise("P7")
@pytest.mark.asyncio
async def test_a_malformed_request_id_is_replaced(orders: ModuleType, gateway: ModuleType) -> None:
    upstream = FakeUpstream()
    answers = {}
    app = orders.create_app(orders_settings(orders), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        for given in MALFORMED_IDS:
            answers[f"orders, X-Request-ID {given!r}"] = (given, await client.post("/orders", json={"sku": "widget", "quantity": 11},
                                                                                 headers={"X-Request-ID": given.encode()}))
        kept = await client.post("/orders", json={"sku": "widget", "quantity": 11}, headers={"X-Request-ID": WELL_FORMED_ID})
    reading = FakeUpstream()
    app = gateway.create_app(transports={"orders": FakeUpstream(), "inventory": reading})
    async with serving(app) as running, client_for(running) as client:
        for given in MALFORMED_IDS:
            answers[f"gateway, X-Request-ID {given!r}"] = (given, await client.get("/api/stock/widget",
                                                                                  headers={"X-Request-ID": given.encode()}))
        kept_at_the_edge = await client.get("/api/stock/widget", headers={"X-Request-ID": WELL_FORMED_ID})
    for where, (given, response) in answers.items():
        returned = response.headers.get("x-request-id", "")
        assert re.fullmatch(r"[0-9a-f]{32}", returned), explain(
            response, f"{where}: a new request ID (uuid4().hex: 32 hexadecimal digits) instead of one that is not "
            f"1 to 64 letters, digits, - _ . (it is written into every log line); the answer carried {returned!r}"
        )
    expect_header(kept, "x-request-id", WELL_FORMED_ID, "a well-formed ID of 64 characters is kept")
    expect_header(kept_at_the_edge, "x-request-id", WELL_FORMED_ID, "the gateway keeps a well-formed ID of 64 characters")
    assert reading.requests[-1].headers.get("x-request-id") == WELL_FORMED_ID, explain(
        kept_at_the_edge, "the caller's well-formed ID passed on to inventory")
    seen = [request.headers.get("x-request-id") for request in upstream.requests]
    assert seen and all(value and value not in MALFORMED_IDS for value in seen), explain(
        kept, f"the replacement ID, not the malformed one, on the calls to inventory; they carried {seen}"
    )


@pytest.mark.task("request_id")
@pytest.mark.promise("P7")
@pytest.mark.asyncio
async def test_the_gateway_creates_the_id_at_the_edge_and_passes_it_on(gateway: ModuleType) -> None:
    upstream = FakeUpstream()
    app = gateway.create_app(transports={"orders": FakeUpstream(), "inventory": upstream})
    async with serving(app) as running, client_for(running) as client:
        given = await client.get("/api/stock/widget", headers={"X-Request-ID": "edge-7"})
        made = await client.get("/api/stock/widget")
    expect_header(given, "x-request-id", "edge-7", "the caller's id comes back")
    made_id = expect_header(made, "x-request-id", why="the gateway creates one at the edge when there is none")
    seen = [request.headers.get("x-request-id") for request in upstream.requests]
    assert seen == ["edge-7", made_id] and made_id, explain(
        made, f"both ids passed on to inventory as X-Request-ID: {['edge-7', made_id]}; it received {seen}"
    )


class Crashing(httpx.AsyncBaseTransport):
    """A transport that raises what no service expects (not an httpx error): a stand-in for a bug."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug below the service, planted by the test")


@pytest.mark.task("request_id")
@pytest.mark.promise("P19")
@pytest.mark.asyncio
async def test_a_crash_is_a_500_problem_that_carries_the_request_id(orders: ModuleType, gateway: ModuleType) -> None:
    answers: dict[str, tuple[str | None, httpx.Response]] = {}

    async def crash(app: FastAPI, service: str, method: str, path: str) -> None:
        async with serving(app) as running:
            # raise_app_exceptions=False: the client gets what the service sent before the exception
            # went on to the server's log, as a real client would.
            transport = httpx.ASGITransport(app=running, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for given in ("crash-7", None):
                    headers = {"X-Request-ID": given} if given else {}
                    response = await client.request(method, path, json=ORDER, headers=headers)
                    answers[f"{service}: {method} {path}" + (f" with X-Request-ID: {given}" if given else "")] = (given, response)

    await crash(orders.create_app(orders_settings(orders), upstream_transport=Crashing()), "orders", "POST", "/orders")
    for method, path in (("GET", "/api/stock/widget"), ("POST", "/api/orders")):
        app = gateway.create_app(gateway.Settings(retries=0), transports={"orders": Crashing(), "inventory": Crashing()})
        await crash(app, "gateway", method, path)
    for where, (given, response) in answers.items():
        why = f"{where}, whose upstream call raised RuntimeError (a bug): the 500 of an unexpected exception"
        expect_problem(response, 500, why)
        returned = response.headers.get("x-request-id")
        wanted = given or "a new one (32 hexadecimal digits)"
        ok = returned == given if given else bool(returned and re.fullmatch(r"[0-9a-f]{32}", returned))
        assert ok, explain(
            response,
            f"{why} carrying X-Request-ID: {wanted}, like every other answer. Starlette answers an unhandled "
            f"exception in its outermost middleware, outside yours, so your request-ID middleware must answer the "
            f"500 itself (README 'Request IDs'); it carried {returned!r}",
        )


# --- The gateway ---------------------------------------------------------------------------------------------


@pytest.mark.task("gateway")
@pytest.mark.promise("P8", "P9")
@pytest.mark.asyncio
async def test_gateway_routes_by_path(gateway: ModuleType) -> None:
    to_orders = FakeUpstream((201, {"id": "abc", "sku": "widget", "quantity": 3, "status": "placed"}))
    to_inventory = FakeUpstream((200, {"sku": "widget", "available": 10}))
    app = gateway.create_app(transports={"orders": to_orders, "inventory": to_inventory})
    async with serving(app) as running, client_for(running) as client:
        expect_json(await client.get("/health"), {"status": "ok", "service": "gateway"}, exact=True)
        posted = await client.post("/api/orders", json=ORDER)
        read = await client.get("/api/stock/widget", params=[("fresh", "1"), ("tag", "a"), ("tag", "b")])
        nowhere = await client.get("/api/payments/1")
    expect_status(posted, 201, "the status code of orders, passed through")
    expect_json(posted, {"id": "abc"})
    sent = to_orders.requests[:1]
    assert [(r.method, r.url.path, r.headers.get("content-type"), r.content) for r in sent] == [
        ("POST", "/orders", "application/json", posted.request.content)
    ], explain(posted, "POST /orders at the orders service, with the same JSON body and content type")
    expect_json(read, {"sku": "widget", "available": 10}, exact=True)
    expect_header(read, "content-type", "application/json", "the Content-Type of the inventory's answer, kept")
    forwarded = [(r.method, r.url.path, r.url.query) for r in to_inventory.requests]
    assert forwarded == [("GET", "/stock/widget", b"fresh=1&tag=a&tag=b")], explain(
        read, f"GET /stock/widget?fresh=1&tag=a&tag=b at the inventory service (every value of a repeated "
        f"parameter); it received {forwarded}"
    )
    expect_problem(nowhere, 404, "no service owns /api/payments", type="about:blank")


@pytest.mark.task("gateway")
@pytest.mark.promise("P8", "P17")
@pytest.mark.asyncio
async def test_gateway_rewrites_location_and_reports_a_down_service(gateway: ModuleType, orders: ModuleType, inventory: ModuleType) -> None:
    async with (
        serving(inventory.create_app()) as stock,
        serving(orders.create_app(orders_settings(orders), upstream_transport=asgi(stock))) as service,
        serving(gateway.create_app(transports={"orders": asgi(service), "inventory": asgi(stock)})) as app,
        client_for(app) as client,
    ):
        created = await client.post("/api/orders", json=ORDER)
        expect_status(created, 201)
        order_id = json_of(created).get("id")
        expect_header(created, "location", f"/api/orders/{order_id}", "the Location of orders, as a gateway path")
        expect_json(await client.get(f"/api/orders/{order_id}"), {"id": order_id, "status": "placed"})
        # A service's problem is relayed as the service wrote it; only its instance becomes the gateway's path.
        too_many = await client.post("/api/orders", json={"sku": "gadget", "quantity": 4})
        relayed = expect_typed_problem(too_many, 409, "out-of-stock", "Not enough stock",
                                       "orders' 409 through the gateway (3 gadgets in stock, 4 ordered)", available=3)
        async with client_for(service) as orders_client:
            direct = await orders_client.post("/orders", json={"sku": "gadget", "quantity": 4})
        mine = {k: v for k, v in relayed.items() if k != "instance"}
        theirs = {k: v for k, v in json_of(direct).items() if k != "instance"}
        assert mine == theirs, explain(too_many, f"orders' own problem, relayed unchanged but for its instance: {theirs}")
        unknown = await client.get("/api/orders/no-such-order")
        expect_problem(unknown, 404, "orders' 404 for an unknown order, relayed with the gateway's path as instance",
                       type="about:blank")
    down = gateway.create_app(transports={"orders": FakeUpstream("down"), "inventory": FakeUpstream("down")})
    async with serving(down) as running, client_for(running) as client:
        response = await client.post("/api/orders", json=ORDER)
    expect_upstream_problem(response, 503, "orders", "the orders service cannot be reached")


# --- Events ---------------------------------------------------------------------------------------------------


def event(event_id: str = "evt-1", quantity: int = 3) -> dict[str, Any]:
    return {"type": "OrderPlaced", "event_id": event_id, "order_id": "o-1", "sku": "widget", "quantity": quantity,
            "occurred_at": "2030-01-01T00:00:00+00:00"}


@pytest.mark.task("events")
@pytest.mark.promise("P15")
@pytest.mark.asyncio
async def test_inventory_applies_an_event_once(inventory: ModuleType) -> None:
    async with serving(inventory.create_app()) as app, client_for(app) as client:
        first = await client.post("/events", json=event())
        expect_status(first, 202, "an event is accepted")
        expect_json(first, {"event_id": "evt-1", "applied": True}, exact=True)
        again = await client.post("/events", json=event())
        expect_json(again, {"event_id": "evt-1", "applied": False}, "the same event delivered twice", exact=True)
        expect_json(await client.get("/stock/widget"), {"available": 7}, "3 taken from 10, once")
        expect_status(await client.post("/events", json=event("evt-2", quantity=9)), 202, "an event that oversells")
        expect_json(await client.get("/stock/widget"), {"available": 0}, "9 taken from 7: stock never goes below 0")
        expect_problem(await client.post("/events", json={"type": "OrderPlaced"}), 422, "an event without its fields")
        nan = await client.post("/events", content=json.dumps(event("evt-3")).replace('"quantity": 3', '"quantity": NaN').encode(),
                                headers={"content-type": "application/json"})
        expect_problem(nan, 422, "an event whose quantity is NaN (the 422 must not echo it: JSON cannot carry NaN)")


@pytest.mark.task("events")
@pytest.mark.promise("P16")
@pytest.mark.asyncio
async def test_orders_publishes_order_placed(orders: ModuleType) -> None:
    broker = orders.InProcessBroker()
    received: list[dict[str, Any]] = []

    async def record(payload: dict[str, Any]) -> None:
        received.append(payload)

    also: list[dict[str, Any]] = []
    other_topic: list[dict[str, Any]] = []

    async def record_also(payload: dict[str, Any]) -> None:
        also.append(payload)

    async def record_other(payload: dict[str, Any]) -> None:
        other_topic.append(payload)

    broker.subscribe("OrderPlaced", record)
    broker.subscribe("OrderPlaced", record_also)  # a second consumer of the same topic
    broker.subscribe("OrderCancelled", record_other)  # a consumer of another topic
    app = orders.create_app(orders_settings(orders), upstream_transport=FakeUpstream(), broker=broker)
    async with serving(app) as running, client_for(running) as client:
        created = await client.post("/orders", json=ORDER)
        rejected = await client.post("/orders", json={"sku": "widget", "quantity": 11})
    body = expect_json(created, {"status": "placed"})
    expect_status(rejected, 409)
    counts = (len(received), len(also), len(other_topic))
    assert counts == (1, 1, 0), explain(
        rejected, "one OrderPlaced event for the one placed order (none for the rejected one), handed by "
        "InProcessBroker.publish to every handler subscribed to the topic and only to those: 1 event for each of the "
        f"two OrderPlaced handlers, 0 for the OrderCancelled one; they got {counts[0]}, {counts[1]} and {counts[2]}"
    )
    published = received[0]
    expected = {"type": "OrderPlaced", "order_id": body.get("id"), "sku": "widget", "quantity": 3}
    assert {key: published.get(key) for key in expected} == expected and published.get("event_id"), explain(
        created, f"an event with {expected} and an event_id; got {published}"
    )


@pytest.mark.task("events")
@pytest.mark.promise("P16")
@pytest.mark.asyncio
async def test_services_connected_by_a_broker(orders: ModuleType, inventory: ModuleType) -> None:
    broker = orders.InProcessBroker()
    async with (
        serving(inventory.create_app(broker=broker)) as stock,  # it subscribes to OrderPlaced in its lifespan
        serving(orders.create_app(orders_settings(orders), upstream_transport=asgi(stock), broker=broker)) as app,
        client_for(app) as client,
        client_for(stock) as stock_client,
    ):
        await client.post("/orders", json={"sku": "widget", "quantity": 2})
        await client.post("/orders", json={"sku": "widget", "quantity": 3})

        async def five_left() -> bool:
            return json_of(await stock_client.get("/stock/widget")).get("available") == 5

        await eventually(five_left)
        after_orders = await stock_client.get("/stock/widget")
        expect_json(after_orders, {"available": 5}, "10 widgets, orders of 2 and 3, delivered as events (waited 5 s for them)")
        await broker.publish("OrderPlaced", event("evt-dup", quantity=1))
        await broker.publish("OrderPlaced", event("evt-dup", quantity=1))  # at-least-once: a redelivery
        expect_json(await stock_client.get("/stock/widget"), {"available": 4}, "one event delivered twice counts once")


@pytest.mark.task("events")
@pytest.mark.promise("P16")
@pytest.mark.asyncio
async def test_events_posted_over_http_are_retried(orders: ModuleType, loopback: tuple[LoopbackInventory, str]) -> None:
    consumer, url = loopback  # a real inventory on loopback whose /events refuses the first delivery with a 503
    settings = orders_settings(orders, inventory_url=url, events_url=f"{url}/events", retries=2, backoff=0.0)
    async with serving(orders.create_app(settings, upstream_transport=tcp())) as app, client_for(app) as client:
        created = await client.post("/orders", json=ORDER)
        expect_status(created, 201, "the order is placed; its event leaves through the outbox")
        await eventually(lambda: len(consumer.deliveries) >= 2)
    ids = [delivery.get("event_id") for delivery in consumer.deliveries]
    assert len(ids) == 2 and ids[0] and ids[0] == ids[1], explain(
        created, "the OrderPlaced POST to ORDERS_EVENTS_URL retried after the 503 (waited 5 s for it), with the "
        f"same event_id (the consumer deduplicates on it); the consumer received event_ids {ids}"
    )


# --- The gateway's allow-list, and paths built from input -------------------------------------------------------


class Recorder:
    """An ASGI wrapper around a service: records the method and decoded path of every HTTP
    request that reaches it (what the service routes on)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def stand_in_orders() -> FastAPI:
    """An orders service that answers 200 to everything: whatever reaches it is recorded."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(path: str) -> dict[str, str]:
        return {"id": "o-1", "status": "placed"}

    return app


def raw_call(base_url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
    """Send `target` exactly as written (httpx would resolve `..` before sending); return the status."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        connection.request(method, target, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# Ways to climb from a parameter of an allowed route to another route of the same service. {t} is
# that other route: inventory's POST /events (it changes stock), GET /health, /openapi.json.
CLIMBS = [
    "../{t}", "..%2F{t}", "..%2f{t}", "%2e%2e/{t}", "%2E%2E%2F{t}", ".%2e/{t}", "%2e./{t}", "..%5C{t}", "..\\{t}",
    "%252e%252e%252f{t}", "..%252F{t}", "./../{t}", ".%2F..%2F{t}", "..;/{t}", "..%00/{t}", ".../{t}",
    "....//{t}", "%2F..%2F{t}", "/../{t}", "%c0%ae%c0%ae/{t}", "%EF%BC%8E%EF%BC%8E/{t}", "widget/../../{t}",
    "widget%2F..%2F..%2F{t}", "..", "%2e%2e", ".", "%2e", "widget/..", "widget/.", "widget%2F",
]
ATTACKS = [
    (method, f"/api/{resource}/{climb.format(t=target)}")
    for resource in ("stock", "orders")
    for climb in CLIMBS
    for target in ("events", "health", "openapi.json")
    for method in ("GET", "POST")
]


@pytest.mark.slow
@pytest.mark.task("allow_list")
@pytest.mark.promise("P9")
def test_no_path_reaches_a_route_that_is_not_on_the_allow_list(inventory: ModuleType, gateway: ModuleType) -> None:
    stock = Recorder(inventory.create_app())
    orders = Recorder(stand_in_orders())
    with serve_in_thread(stock, ws="none") as stock_url, serve_in_thread(orders, ws="none") as orders_url:
        settings = gateway.Settings(inventory_url=stock_url, orders_url=orders_url, retries=0)
        with serve_in_thread(gateway.create_app(settings), ws="none") as gateway_url:
            # A control: the allowed routes work when sent the same way.
            control = [raw_call(gateway_url, "GET", "/api/stock/widget"), raw_call(gateway_url, "GET", "/api/orders/o-1")]
            assert control == [200, 200] and stock.seen[-1:] == [("GET", "/stock/widget")], (
                f"\nsent:     GET /api/stock/widget and GET /api/orders/o-1 to the gateway on a real server\n"
                f"expected: 200 and 200, forwarded as GET /stock/widget and GET /orders/o-1\n"
                f"got:      {control}; inventory received {stock.seen}"
            )
            stock.seen.clear()
            orders.seen.clear()
            answers = {}
            for number, (method, target) in enumerate(ATTACKS):
                event = {"type": "OrderPlaced", "event_id": f"attack-{number}", "order_id": "o-x", "sku": "widget",
                         "quantity": 1, "occurred_at": "2030-01-01T00:00:00+00:00"}
                answers[(method, target)] = raw_call(gateway_url, method, target, body=json.dumps(event).encode())
    let_through = {request: status for request, status in answers.items() if status not in (400, 404, 405)}
    reached = [("inventory", *seen) for seen in stock.seen] + [("orders", *seen) for seen in orders.seen]
    assert not let_through and not reached, (
        f"\nsent:     {len(ATTACKS)} requests whose path climbs out of /api/stock/{{sku}} or /api/orders/{{id}} "
        f"(a literal ../, %2F, %2e%2e, %5C, double encoding, empty and dot segments ...), raw, to a real server\n"
        f"expected: each refused with 404 (or 400, or 405 for a method the path does not have) and nothing sent to any service: a gateway forwards only the "
        f"routes on its allow-list, and a path parameter is one plain segment\n"
        f"got:      {len(let_through)} answered otherwise, e.g. {dict(list(let_through.items())[:4])}; the services "
        f"received {reached[:6]}"
    )
    with serve_in_thread(inventory.create_app(), ws="none") as fresh_url:
        untouched = httpx.get(f"{fresh_url}/stock/widget", verify=http_only())
    expect_json(untouched, {"available": 10}, "a fresh inventory, to compare: 10 widgets")


@pytest.mark.task("allow_list")
@pytest.mark.promise("P9")
@pytest.mark.asyncio
async def test_the_gateway_forwards_only_its_routes(gateway: ModuleType) -> None:
    to_orders, to_inventory = FakeUpstream((200, {"id": "abc"})), FakeUpstream()
    app = gateway.create_app(transports={"orders": to_orders, "inventory": to_inventory})
    refused = [("DELETE", "/api/orders/abc"), ("PATCH", "/api/orders/abc"), ("PUT", "/api/stock/widget"),
               ("POST", "/api/stock/widget"), ("GET", "/api/orders/abc/items"), ("GET", "/api/stock"),
               ("GET", "/api/stock/"), ("GET", "/api/orders/"), ("GET", "/api/events"), ("POST", "/api/events"),
               ("GET", "/api/health"), ("GET", "/api/openapi.json"), ("GET", "/api//stock/widget"),
               ("GET", "/api/stock/.hidden"), ("GET", "/api/stock/" + "x" * 65), ("GET", "/api/stock/a%20b")]
    wrong_methods = {"DELETE /api/orders/abc": "GET", "PATCH /api/orders/abc": "GET", "PUT /api/stock/widget": "GET",
                     "POST /api/stock/widget": "GET", "PATCH /api/orders": "POST"}
    async with serving(app) as running, client_for(running) as client:
        answers = {f"{method} {path}": (await client.request(method, path)).status_code for method, path in refused}
        for request, allow in wrong_methods.items():
            method, path = request.split(" ")
            response = await client.request(method, path)
            expect_problem(response, 405, f"{request}: the path is on the allow-list, the method is not", type="about:blank")
            expect_header(response, "allow", allow, f"{request}: a 405 says which methods the path has")
        allowed = await client.get("/api/stock/wid.get_2~x")
    expect_status(allowed, 200, "GET /api/stock/{sku} is on the allow-list, and wid.get_2~x is one plain segment")
    expect_json(allowed, {"sku": "widget", "available": 10}, "the inventory's answer, passed on", exact=True)
    forwarded = [(r.method, r.url.raw_path.decode()) for r in to_inventory.requests]
    assert forwarded == [("GET", "/stock/wid.get_2~x")], explain(allowed, f"GET /stock/wid.get_2~x at inventory; it received {forwarded}")
    to_inventory.requests.clear()
    wrong = {request: status for request, status in answers.items()
             if status not in ((405,) if request in wrong_methods else (400, 404))}
    sent = [(r.method, r.url.raw_path.decode()) for r in to_orders.requests + to_inventory.requests]
    assert not wrong and not sent, (
        f"\nsent:     {', '.join(answers)}\n"
        f"expected: 405 for a method the path does not have, else 404 (or 400), nothing forwarded: only GET /api/stock/{{sku}}, POST /api/orders and "
        f"GET /api/orders/{{id}} are on the allow-list, with one plain segment per parameter\n"
        f"got:      {wrong or 'the right statuses'}; forwarded {sent}"
    )


NASTY_SKUS = ["..", ".", "../events", "..%2Fevents", "a/b", "a\\b", "%2e%2e", "", ".hidden", "x" * 65, "a b",
              "widget?admin=1", "widget#x", "wídget", "widget\n"]


@pytest.mark.task("allow_list")
@pytest.mark.promise("P9")
@pytest.mark.asyncio
async def test_orders_puts_the_sku_into_inventorys_path_as_one_segment(orders: ModuleType) -> None:
    upstream = FakeUpstream()
    longest = "A-z_0.9~" * 8  # 64 characters, every kind allowed
    app = orders.create_app(orders_settings(orders), upstream_transport=upstream)
    async with serving(app) as running, client_for(running) as client:
        answers = {sku: (await client.post("/orders", json={"sku": sku, "quantity": 1})).status_code for sku in NASTY_SKUS}
        good = await client.post("/orders", json={"sku": longest, "quantity": 1})
    wrong = {sku: status for sku, status in answers.items() if status != 422}
    called = [request.url.raw_path.decode() for request in upstream.requests]
    assert not wrong and called == [f"/stock/{longest}"], explain(
        good, f"422 for each SKU that is not one plain path segment ({NASTY_SKUS!r}), with no call to inventory, and "
        f"GET /stock/{longest} for the 64-character SKU made of allowed characters; got {wrong or 'all 422'}, "
        f"inventory was called at {called}"
    )
    expect_status(good, 201, "a 64-character SKU of letters, digits, - _ . ~")


# --- One deadline for the whole call --------------------------------------------------------------------------------


@pytest.mark.task("deadline")
@pytest.mark.promise("P10")
@pytest.mark.asyncio
async def test_the_timeout_bounds_the_whole_call(
    orders: ModuleType, gateway: ModuleType, loopback: tuple[LoopbackInventory, str]
) -> None:
    trickling, url = loopback
    trickling.trickle = 8.0  # a byte every 0.05 s for 8 s: no single read ever waits long
    results = {}
    settings = orders_settings(orders, inventory_url=url, timeout=0.3, retries=9, backoff=0.0)
    async with serving(orders.create_app(settings, upstream_transport=tcp())) as app, client_for(app) as client:
        started = time.perf_counter()
        results["orders, POST /orders"] = (await client.post("/orders", json=ORDER), time.perf_counter() - started)
    settings = gateway.Settings(inventory_url=url, timeout=0.3, retries=9, backoff=0.0)
    app = gateway.create_app(settings, transports={"orders": FakeUpstream(), "inventory": tcp()})
    async with serving(app) as running, client_for(running) as client:
        started = time.perf_counter()
        results["gateway, GET /api/stock/widget"] = (await client.get("/api/stock/widget"), time.perf_counter() - started)
    for where, (response, elapsed) in results.items():
        expect_upstream_problem(response, 504, "inventory", f"{where}: inventory trickles its answer for 8 s, the timeout is 0.3 s")
        assert elapsed < 1.5, explain(
            response, f"{where}: a 504 about 0.3 s after the request: the timeout bounds the whole call, every read "
            f"and all 9 retries together (a client timeout alone bounds each read, and a byte every 0.05 s resets it; "
            f"a timeout per attempt lets 10 attempts take 3 s); it came after {elapsed:.2f} s"
        )


@pytest.mark.task("deadline")
@pytest.mark.promise("P10")
@pytest.mark.asyncio
async def test_no_backoff_sleeps_past_the_deadline(orders: ModuleType) -> None:
    upstream = FakeUpstream("down")
    settings = orders_settings(orders, timeout=0.3, retries=2, backoff=2.0)
    async with serving(orders.create_app(settings, upstream_transport=upstream)) as app, client_for(app) as client:
        started = time.perf_counter()
        response = await client.post("/orders", json=ORDER)
        elapsed = time.perf_counter() - started
    assert response.status_code in (503, 504) and elapsed < 1.5, explain(
        response, "503 or 504 within about 0.3 s: inventory is down, the next retry would come after a 2 s backoff, "
        f"and the whole call has 0.3 s; waiting past the deadline only delays the failure (it took {elapsed:.2f} s)"
    )


@pytest.mark.task("deadline")
@pytest.mark.promise("P10")
@pytest.mark.asyncio
async def test_the_gateway_passes_its_remaining_budget_on(gateway: ModuleType) -> None:
    reading = FakeUpstream("down", (503, {"detail": "busy"}), (200, {"sku": "widget", "available": 10}))
    placing = FakeUpstream((201, {"id": "abc"}))
    settings = gateway.Settings(timeout=2.0, retries=2, backoff=0.01)
    app = gateway.create_app(settings, transports={"orders": placing, "inventory": reading})
    async with serving(app) as running, client_for(running) as client:
        read = await client.get("/api/stock/widget")
        placed = await client.post("/api/orders", json=ORDER)
    expect_status(read, 200)
    expect_status(placed, 201)
    budgets = [request.headers.get("x-timeout-ms") for request in reading.requests + placing.requests]
    numbers = [int(value) if value and value.isdigit() else None for value in budgets]
    first_three = numbers[:3]
    assert (
        len(numbers) == 4 and None not in numbers
        and all(0 < number <= 2000 for number in numbers)
        and first_three == sorted(first_three, reverse=True)  # type: ignore[type-var]
    ), explain(
        placed, "X-Timeout-Ms on every call the gateway makes: the milliseconds it will still wait, an integer "
        "above 0 and at most 2000 (its timeout is 2 s), never more on a retry than on the attempt before; "
        f"the three attempts of GET /stock/widget and the POST /orders carried {budgets}"
    )
    # What is passed on is what is left: a first attempt that spent 0.3 s leaves 0.3 s less for the retry.
    stalling = Stalling(0.3)
    app = gateway.create_app(gateway.Settings(timeout=5.0, retries=1, backoff=0.0),
                             transports={"orders": FakeUpstream(), "inventory": stalling})
    async with serving(app) as running, client_for(running) as client:
        retried = await client.get("/api/stock/widget")
    expect_status(retried, 200, "inventory failed the first attempt after 0.3 s and answered the retry")
    budgets = [request.headers.get("x-timeout-ms", "") for request in stalling.requests]
    numbers = [int(value) for value in budgets if value.isdigit()]
    assert len(numbers) == 2 and numbers[1] <= numbers[0] - 200, explain(
        retried, "X-Timeout-Ms is the budget that remains, not the whole timeout: the first attempt took 0.3 s, so "
        f"the retry carries at least 200 ms less than the first attempt did (timeout 5 s); they carried {budgets}"
    )


class Stalling(httpx.AsyncBaseTransport):
    """An upstream whose first call fails after `seconds` (the connection breaks); later calls are answered."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) == 1:
            await asyncio.sleep(self.seconds)
            raise httpx.RemoteProtocolError("the connection broke", request=request)
        return httpx.Response(200, json={"sku": "widget", "available": 10}, request=request)


@pytest.mark.task("deadline")
@pytest.mark.promise("P11")
@pytest.mark.asyncio
async def test_orders_stops_when_its_caller_stops_waiting(orders: ModuleType, loopback: tuple[LoopbackInventory, str]) -> None:
    trickling, url = loopback
    trickling.trickle = 8.0
    settings = orders_settings(orders, inventory_url=url, timeout=10.0, retries=0)
    async with serving(orders.create_app(settings, upstream_transport=tcp())) as app, client_for(app) as client:
        started = time.perf_counter()
        response = await client.post("/orders", json=ORDER, headers={"X-Timeout-Ms": "300"})
        elapsed = time.perf_counter() - started
    expect_upstream_problem(response, 504, "inventory", "the caller will wait 300 ms (X-Timeout-Ms: 300); inventory trickles for 8 s")
    assert elapsed < 1.5, explain(
        response, "a 504 about 0.3 s after the request: the caller's X-Timeout-Ms shortens orders' own budget "
        f"(ORDERS_TIMEOUT 10 s here); it came after {elapsed:.2f} s"
    )
    upstream = FakeUpstream()
    async with serving(orders.create_app(orders_settings(orders), upstream_transport=upstream)) as app:
        async with client_for(app) as client:
            spent = await client.post("/orders", json=ORDER, headers={"X-Timeout-Ms": "0"})
            bad = [(value, (await client.post("/orders", json=ORDER, headers={"X-Timeout-Ms": value})).status_code)
                   for value in ("soon", "-5", "1.5", str(2**63))]
    expect_upstream_problem(spent, 504, "inventory", "X-Timeout-Ms: 0: the caller has no time left")
    assert not upstream.requests, explain(spent, f"no call to inventory for a spent budget; it was called {len(upstream.requests)} times")
    assert all(status == 422 for _, status in bad), explain(
        spent, f"422 for an X-Timeout-Ms that is not a whole number of milliseconds from 0 to 3600000; got {bad}"
    )


@pytest.mark.slow
@pytest.mark.task("deadline")
@pytest.mark.promise("P11")
@pytest.mark.asyncio
async def test_no_order_is_placed_after_the_caller_got_504(
    orders: ModuleType, gateway: ModuleType, loopback: tuple[LoopbackInventory, str]
) -> None:
    trickling, url = loopback
    trickling.trickle = 1.2  # inventory does answer, 1.2 s late: long after the gateway gave up
    published: list[dict[str, Any]] = []
    broker = orders.InProcessBroker()

    async def record(payload: dict[str, Any]) -> None:
        published.append(payload)

    broker.subscribe("OrderPlaced", record)
    service = orders.create_app(orders_settings(orders, inventory_url=url, timeout=10.0, retries=0),
                                upstream_transport=tcp(), broker=broker)
    with serve_in_thread(service, ws="none") as orders_url:  # a real server: the gateway giving up does not cancel it
        app = gateway.create_app(gateway.Settings(orders_url=orders_url, timeout=0.4, retries=0),
                                 transports={"inventory": FakeUpstream()})
        async with serving(app) as running, client_for(running) as client:
            response = await client.post("/api/orders", json=ORDER)
        # Orders, told the gateway's budget, usually gives up first (its 504 names inventory, and the
        # gateway relays it); else the gateway's own 504 names orders. Both tell the caller the same.
        timed_out = expect_problem(response, 504, "the gateway waits 0.4 s; inventory answers orders after 1.2 s",
                                   type=PROBLEMS + "upstream-timeout")
        assert timed_out.get("service") in ("orders", "inventory"), explain(response, "a 504 naming the service that timed out")
        await asyncio.to_thread(trickling.trickle_ended.wait, 5)
        if trickling.trickle_completed:  # orders stayed for inventory's late answer: did it then place the order?
            await eventually(lambda: published, seconds=1.0)
    assert not published, explain(
        response, "no order placed after its caller was told 504 (its retry would order twice): the gateway passes "
        "its remaining budget on (X-Timeout-Ms), and orders places nothing once that budget is spent; "
        f"yet orders published {published}"
    )


# --- A circuit breaker and a bulkhead per service ----------------------------------------------------------------


def retry_after_of(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else None


@pytest.mark.task("resilience")
@pytest.mark.promise("P12")
@pytest.mark.asyncio
async def test_a_failing_service_opens_its_circuit(gateway: ModuleType) -> None:
    stock = FakeUpstream("down", "down", "down", "down", (200, {"sku": "widget", "available": 10}))
    placing = FakeUpstream((201, {"id": "abc"}))
    settings = gateway.Settings(retries=0, breaker_failures=3, breaker_reset=1.5)
    app = gateway.create_app(settings, transports={"orders": placing, "inventory": stock})
    async with serving(app) as running, client_for(running) as client:
        failing = [(await client.get("/api/stock/widget")).status_code for _ in range(3)]
        refused = [await client.get("/api/stock/widget") for _ in range(3)]
        calls_while_open = len(stock.requests)
        placed = await client.post("/api/orders", json=ORDER)
        await asyncio.sleep(1.7)
        failed_trial = await client.get("/api/stock/widget")
        refused_again = await client.get("/api/stock/widget")
        calls_after_failed_trial = len(stock.requests)
        await asyncio.sleep(1.7)
        good_trial = await client.get("/api/stock/widget")
        closed = await client.get("/api/stock/widget")
    assert failing == [503, 503, 503] and calls_while_open == 3 and all(r.status_code == 503 for r in refused), explain(
        refused[-1], "with breaker_failures=3: three failed calls reach inventory (503 each), then its circuit is "
        "open and the next calls are answered 503 at once, without calling it; got "
        f"{failing + [r.status_code for r in refused]} with {calls_while_open} calls to inventory"
    )
    for response in refused:
        expect_upstream_problem(response, 503, "inventory", "the circuit of inventory is open: refused at once")
    waits = [retry_after_of(response) for response in refused]
    assert all(wait is not None and 1 <= wait <= 3600 for wait in waits), explain(
        refused[-1], f"each refusal says when to come back: Retry-After in whole seconds (1 to 3600); got {waits}"
    )
    expect_status(placed, 201, "orders is another service with its own circuit: inventory's open circuit does not stop it")
    assert failed_trial.status_code == 503 and refused_again.status_code == 503 and calls_after_failed_trial == 4, explain(
        refused_again, "after breaker_reset (1.5 s) one trial call reaches inventory; it failed, so the circuit opens "
        f"again and the next call is refused at once; inventory was called {calls_after_failed_trial} times in all "
        "(expected 4)"
    )
    expect_status(good_trial, 200, "after another 1.5 s a trial call goes through, and inventory answers")
    expect_status(closed, 200, "the trial succeeded: the circuit is closed again")
    assert len(stock.requests) == 6, explain(closed, f"6 calls to inventory in all; got {len(stock.requests)}")


@pytest.mark.task("resilience")
@pytest.mark.promise("P12", "P20")
@pytest.mark.asyncio
async def test_an_answer_the_gateway_cannot_read_counts_against_the_circuit(gateway: ModuleType) -> None:
    garbled = Unreadable(404, NOT_STRICT_JSON["NaN"], {"content-type": "application/problem+json"})
    too_long = Streaming([b"x" * 600] * 2)  # 1200 bytes, over max_body_bytes=1000
    settings = gateway.Settings(retries=0, breaker_failures=2, breaker_reset=30, max_body_bytes=1000)
    app = gateway.create_app(settings, transports={"inventory": garbled, "orders": too_long})
    async with serving(app) as running, as_a_client_sees(running) as client:
        for path, upstream, what in (("/api/stock/widget", garbled, "a problem holding NaN"),
                                     ("/api/orders/o-1", too_long, "a body longer than max_body_bytes")):
            broken = [await client.get(path) for _ in range(2)]
            refused = await client.get(path)
            why = (f"GET {path} three times, with breaker_failures=2: the service answered {what} twice, each a 502 of the "
                   f"gateway. A service that answers what cannot be read is failing, like one that is down: two "
                   f"failures in a row open its circuit, and the third request is refused at once (503, nothing sent)")
            assert [r.status_code for r in broken] == [502, 502], explain(broken[-1], why)
            expect_upstream_problem(refused, 503, "inventory" if upstream is garbled else "orders", why)
            assert len(upstream.requests) == 2, explain(refused, f"{why}; the service got {len(upstream.requests)} calls")


class Held(httpx.AsyncBaseTransport):
    """An upstream that holds every request until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await self.release.wait()
        return httpx.Response(200, json={"sku": "widget", "available": 10}, request=request)


@pytest.mark.task("resilience")
@pytest.mark.promise("P13")
@pytest.mark.asyncio
async def test_a_bulkhead_bounds_the_calls_to_each_service(gateway: ModuleType) -> None:
    held, placing = Held(), FakeUpstream((201, {"id": "abc"}))
    settings = gateway.Settings(max_concurrent=2, timeout=3.0, retries=0)
    app = gateway.create_app(settings, transports={"orders": placing, "inventory": held})
    async with serving(app) as running, client_for(running) as client:
        waiting = [asyncio.create_task(client.get("/api/stock/widget")) for _ in range(2)]
        try:
            await eventually(lambda: len(held.requests) >= 2)
            started = time.perf_counter()
            third = await client.get("/api/stock/widget")
            elapsed = time.perf_counter() - started
            placed = await client.post("/api/orders", json=ORDER)
            in_flight = len(held.requests)
        finally:
            held.release.set()
        first_two = [(await task).status_code for task in waiting]
        later = await client.get("/api/stock/widget")
    assert third.status_code == 503 and in_flight == 2 and elapsed < 2.0, explain(
        third, "with max_concurrent=2 and two calls to inventory in flight, a third is answered 503 at once and "
        f"never sent; got {third.status_code} after {elapsed:.2f} s, with {in_flight} requests at inventory"
    )
    expect_upstream_problem(third, 503, "inventory", "the bulkhead of inventory is full: refused at once")
    wait = retry_after_of(third)
    assert wait is not None and 1 <= wait <= 3600, explain(third, f"Retry-After in whole seconds (1 to 3600); got {wait}")
    expect_status(placed, 201, "orders has its own bulkhead: a saturated inventory does not stop orders")
    assert first_two == [200, 200], explain(later, f"the two calls in flight answered 200 once released; got {first_two}")
    expect_status(later, 200, "the calls in flight are over: the bulkhead has room again")


# --- The contract: every status code in the OpenAPI schema ---------------------------------------------------------

DOCUMENTED = {
    "inventory": {("get", "/stock/{sku}"): {"200", "404", "422"}, ("post", "/events"): {"202", "400", "422"}},
    "orders": {("post", "/orders"): {"201", "400", "409", "422", "502", "503", "504"},
               ("get", "/orders/{order_id}"): {"200", "404"}},
    "gateway": {("get", "/api/stock/{sku}"): {"200", "404", "503", "504"},
                ("post", "/api/orders"): {"201", "400", "404", "409", "413", "422", "502", "503", "504"},
                ("get", "/api/orders/{order_id}"): {"200", "404", "503", "504"}},
}


@pytest.mark.task("contract")
@pytest.mark.promise("P14")
@pytest.mark.asyncio
async def test_the_schemas_document_every_status_code(inventory: ModuleType, orders: ModuleType, gateway: ModuleType) -> None:
    apps = {"inventory": inventory.create_app(), "orders": orders.create_app(orders_settings(orders)),
            "gateway": gateway.create_app(transports={"orders": FakeUpstream(), "inventory": FakeUpstream()})}
    missing: dict[str, Any] = {}
    for name, app in apps.items():
        async with serving(app) as running, client_for(running) as client:
            schema = json_of(await client.get("/openapi.json"))
        paths = schema.get("paths", {})
        for (method, path), codes in DOCUMENTED[name].items():
            responses = paths.get(path, {}).get(method, {}).get("responses", {})
            documented = set(responses)
            if not codes <= documented:
                missing[f"{name}: {method.upper()} {path}"] = sorted(codes - documented)
            not_problems = sorted(code for code in codes & documented if code >= "400"
                                  and "application/problem+json" not in (responses[code].get("content") or {}))
            if not_problems:
                missing[f"{name}: {method.upper()} {path}: errors not declared as application/problem+json"] = not_problems
        if name == "gateway":
            extra = sorted(set(paths) - {"/health", *(path for _, path in DOCUMENTED["gateway"])})
            if extra:
                missing["gateway: paths beyond the allow-list"] = extra
    assert not missing, (
        f"\nsent:     GET /openapi.json to inventory, orders and the gateway\n"
        f"expected: every status code each route can answer declared in its schema (responses=... on the route "
        f"decorator; each error as application/problem+json: responses=problem_responses(404, ...)), and the "
        f"gateway's schema listing exactly its allow-list and /health\n"
        f"got:      missing or extra: {missing}"
    )


@pytest.mark.task("contract")
@pytest.mark.promise("P17")
@pytest.mark.asyncio
async def test_every_error_of_every_service_is_a_problem(inventory: ModuleType, orders: ModuleType, gateway: ModuleType) -> None:
    apps = {"inventory": inventory.create_app(),
            "orders": orders.create_app(orders_settings(orders), upstream_transport=FakeUpstream()),
            "gateway": gateway.create_app(transports={"orders": FakeUpstream(), "inventory": FakeUpstream()})}
    invalid = {"inventory": ("/events", {"type": "OrderPlaced", "event_id": "", "quantity": "many"}),
               "orders": ("/orders", {"sku": "widget", "quantity": "many"})}
    for name, app in apps.items():
        async with serving(app) as running, client_for(running) as client:
            expect_problem(await client.get("/no/such/route?token=secret"), 404,
                           f"{name}: an unknown route is a problem too (Starlette's 404, through install_problem_details)",
                           type="about:blank")
            wrong_method = await client.delete("/health")
            expect_problem(wrong_method, 405, f"{name}: DELETE /health, a wrong method", type="about:blank")
            expect_header(wrong_method, "allow", "GET", f"{name}: a 405 says which methods the path has")
            expect_header(wrong_method, "x-request-id", why=f"{name}: every answer carries the request ID, an error too")
            if name in invalid:
                path, body = invalid[name]
                refused = await client.post(path, json=body)
                errors = expect_problem(refused, 422, f"{name}: POST {path} with a quantity that is not a number").get("errors")
                assert isinstance(errors, list) and errors and all(
                    isinstance(error, dict) and set(error) == {"loc", "msg", "type"} for error in errors), explain(
                    refused, f"{name}: a 422 problem whose errors are each {{loc, msg, type}}, never the refused input; got {errors}")


# --- End to end: real processes ---------------------------------------------------------------------------------


def uvicorn(target: str, folder: Path) -> list[str]:
    # --app-dir puts the folder holding the `services` package on sys.path; uvicorn imports
    # services.inventory and services.orders, each a service of its own in its own process.
    return [sys.executable, "-m", "uvicorn", target, "--factory", "--app-dir", str(folder),
            "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--no-access-log"]


@contextmanager
def started_together(*servers: AbstractContextManager[str]) -> Iterator[Callable[[], list[str]]]:
    """Enter several serve_in_process(...) at once, in threads: the services boot in parallel
    while the test goes on; `ready()` waits for them and returns their URLs. At the end they
    are stopped in parallel too (each uvicorn takes 0.1-0.2 s to shut down)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(server.__enter__) for server in servers]

        def ready() -> list[str]:
            return [future.result() for future in futures]

        try:
            yield ready
        finally:
            # Stop every server that started (one that failed to start has stopped itself).
            started = [server for server, future in zip(servers, futures) if future.exception() is None]
            for stopping in [pool.submit(server.__exit__, None, None, None) for server in started]:
                stopping.result()


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.task("end_to_end")
@pytest.mark.promise("P18")
@pytest.mark.asyncio
async def test_end_to_end_with_real_processes(gateway: ModuleType, target_dir: Path, tmp_path: Path) -> None:
    # The services import the given problems.py relatively: uvicorn imports them as the modules
    # of a package, `services`, a copy of the graded folder.
    package = tmp_path / "services"
    package.mkdir()
    for source in target_dir.glob("*.py"):
        if not source.name.startswith("test_"):
            shutil.copyfile(source, package / source.name)
    inventory_port, orders_port = free_port(), free_port()
    inventory_url, orders_url = f"http://127.0.0.1:{inventory_port}", f"http://127.0.0.1:{orders_port}"
    env = {"ORDERS_INVENTORY_URL": inventory_url, "ORDERS_EVENTS_URL": f"{inventory_url}/events"}
    with started_together(
        serve_in_process(uvicorn("services.inventory:create_app", tmp_path), port=inventory_port, ready_path="/health"),
        serve_in_process(uvicorn("services.orders:create_app", tmp_path), port=orders_port, env=env, ready_path="/health"),
    ) as ready:
        # The gateway runs here, but reaches both services over real TCP connections. It starts
        # (and makes its clients) while the two services boot.
        app = gateway.create_app(gateway.Settings(orders_url=orders_url, inventory_url=inventory_url))
        async with serving(app) as running, client_for(running) as client:
            ready()
            expect_json(await client.get("/api/stock/widget"), {"available": 10}, "inventory, through the gateway")
            created = await client.post("/api/orders", json=ORDER, headers={"X-Request-ID": "e2e-1"})
            expect_status(created, 201, "an order placed through gateway → orders → inventory")
            expect_header(created, "x-request-id", "e2e-1")

            async def seven_left() -> bool:
                return json_of(await client.get("/api/stock/widget")).get("available") == 7

            await eventually(seven_left)
            after = await client.get("/api/stock/widget")
    expect_json(after, {"available": 7}, "the OrderPlaced event reached inventory over HTTP (ORDERS_EVENTS_URL), "
                "within 5 s of the order")
