"""Graded tests for exercise 11: orders and shipping, through a real NATS server with JetStream.

Every test starts its own nats-server (the `nats_server` fixture of the grader's plugin), runs
your apps in this process (their lifespans included) and talks to them over HTTP and through the
broker. Waits are for events, with generous limits: nothing here depends on a fast machine.
"""

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from asgi_lifespan import LifespanManager
from nats.js.api import AckPolicy, StorageType
from pydantic import ValidationError

from grader.expect import describe, expect_problem, expect_status

WAIT = 15.0  # seconds: the longest any test waits for something that should happen
pytestmark = [pytest.mark.slow, pytest.mark.asyncio]


# --- helpers ----------------------------------------------------------------------------------

def said(what: str, expected: Any, got: Any) -> str:
    """A failure message: what was checked, what was expected, what came back (bounded)."""
    shown = got if isinstance(got, str) else repr(got)
    return f"\n{what}\nexpected: {expected}\ngot:      {shown[:600]}"


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=WAIT, shutdown_timeout=WAIT) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    """Wait until `check()` is true; fail saying `what` did not happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"{what} (waited {timeout:g} s)", pytrace=False)
        await asyncio.sleep(0.02)


@asynccontextmanager
async def broker(server: Any) -> AsyncIterator[Any]:
    nc = await nats.connect(server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def stream_messages(js: Any, stream: str) -> list[Any]:
    """Every message stored in `stream`, oldest first (read directly, without a consumer)."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []
    found = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        try:
            found.append(await js.get_msg(stream, sequence))
        except nats.js.errors.NotFoundError:
            continue
    return found


async def stream_exists(js: Any, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    return True


def order_event(order_id: str | None = None, event_id: str | None = None, **changes: Any) -> dict[str, Any]:
    return {"type": "OrderPlaced", "event_id": event_id or uuid.uuid4().hex, "order_id": order_id or uuid.uuid4().hex,
            "sku": "widget", "quantity": 2, "occurred_at": "2026-12-07T10:00:00+00:00", **changes}


async def publish(js: Any, event: dict[str, Any] | bytes, msg_id: str | None = None) -> None:
    data = event if isinstance(event, bytes) else json.dumps(event).encode()
    await js.publish("orders.placed", data, headers={"Nats-Msg-Id": msg_id or uuid.uuid4().hex})


class Carrier:
    """A fake carrier: records every booking; can hold some orders, fail others, or take its time."""

    def __init__(self, *, hold: set[str] | None = None, hold_all: bool = False, fail: set[str] | None = None,
                 delay: float = 0.0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.times: list[float] = []  # when each call began (the event loop's clock), in the order of `calls`
        self.active = 0
        self.peak = 0
        self.hold, self.hold_all, self.fail, self.delay = hold or set(), hold_all, fail or set(), delay
        self.release = asyncio.Event()

    async def __call__(self, shipment: dict[str, Any]) -> None:
        self.calls.append(dict(shipment))
        self.times.append(asyncio.get_running_loop().time())
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if shipment.get("order_id") in self.fail:
                raise RuntimeError("the carrier is down")
            if self.hold_all or shipment.get("order_id") in self.hold:
                await self.release.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1

    def count(self, order_id: str) -> int:
        return sum(call.get("order_id") == order_id for call in self.calls)

    def gaps(self, order_id: str) -> list[float]:
        """Seconds between one call for this order and the next."""
        began = [time for call, time in zip(self.calls, self.times, strict=True) if call.get("order_id") == order_id]
        return [later - earlier for earlier, later in zip(began, began[1:])]


@pytest.fixture
def shipping_app(load, nats_server, tmp_path):
    """shipping_app(carrier, **settings) builds the learner's shipping app on this test's broker."""
    module = load("shipping")

    def build(carrier: Any = None, **settings: Any) -> Any:
        options = {"nats_url": nats_server.url, "database": str(tmp_path / "shipping.db"), **settings}
        return module.create_app(module.Settings(**options), carrier=carrier)

    build.module = module  # type: ignore[attr-defined]
    return build


@pytest.fixture
def orders_app(load, nats_server, tmp_path):
    module = load("orders")

    def build(**settings: Any) -> Any:
        options = {"nats_url": nats_server.url, "database": str(tmp_path / "orders.db"), **settings}
        return module.create_app(module.Settings(**options))

    build.module = module  # type: ignore[attr-defined]
    return build


async def consumer_settled(js: Any, at_least: int) -> bool:
    """The durable consumer `shipping` has been handed `at_least` messages and has none left to settle."""
    try:
        info = await js.consumer_info("ORDERS", "shipping")
    except nats.js.errors.NotFoundError:
        return False
    return info.delivered.stream_seq >= at_least and info.num_ack_pending == 0 and info.num_pending == 0


async def shipped(client: httpx.AsyncClient, order_id: str) -> bool:
    return (await client.get(f"/shipments/{order_id}")).status_code == 200


async def expect_ready(js: Any) -> None:
    """Shipping's lifespan startup has created the streams and its durable consumer (checked at once)."""
    for stream in ("ORDERS", "DEADLETTER"):
        assert await stream_exists(js, stream), said(
            f"the {stream} stream once shipping's lifespan startup has finished",
            expected="created at startup (when it did not exist yet)", got="no such stream")
    try:
        await js.consumer_info("ORDERS", "shipping")
    except nats.js.errors.NotFoundError:
        pytest.fail(said("the durable consumer once shipping's lifespan startup has finished",
                         expected='a durable pull consumer named "shipping" on the ORDERS stream', got="none"),
                    pytrace=False)


def expect_settings(module: Any, monkeypatch: pytest.MonkeyPatch, prefix: str, defaults: dict[str, Any],
                    bounds: dict[str, tuple[list[Any], list[Any]]]) -> None:
    """The README's Settings: its defaults, its environment prefix, and the bounds it refuses beyond."""
    for name in defaults:
        monkeypatch.delenv(f"{prefix}{name.upper()}", raising=False)
    built = module.Settings()
    for name, value in defaults.items():
        assert getattr(built, name, None) == value, said(
            f"Settings().{name} (nothing set in the environment)", expected=repr(value), got=repr(getattr(built, name, None)))
    monkeypatch.setenv(f"{prefix}DATABASE", "from-the-environment.db")
    assert module.Settings().database == "from-the-environment.db", said(
        f"Settings().database with {prefix}DATABASE=from-the-environment.db", expected="from-the-environment.db",
        got=module.Settings().database)
    monkeypatch.delenv(f"{prefix}DATABASE")
    for name, (accepted, refused) in bounds.items():
        for value in accepted:
            try:
                module.Settings(**{name: value})
            except ValidationError:
                pytest.fail(said(f"Settings({name}={value!r})", expected="accepted (within the README's bounds)",
                                 got="a ValidationError"), pytrace=False)
        for value in refused:
            try:
                module.Settings(**{name: value})
            except ValidationError:
                continue
            pytest.fail(said(f"Settings({name}={value!r})", expected="a ValidationError (outside the README's bounds)",
                             got="accepted"), pytrace=False)


async def expect_stream(js: Any, name: str, subjects: list[str]) -> None:
    """`name` exists with the README's configuration: its subjects, file storage, a 2-minute duplicate window."""
    config = (await js.stream_info(name)).config
    got = {"subjects": config.subjects, "storage": config.storage, "duplicate_window": config.duplicate_window}
    expected = {"subjects": subjects, "storage": StorageType.FILE, "duplicate_window": 120.0}
    assert got == expected, said(f"the configuration of the {name} stream", expected=expected, got=got)


async def expect_documented_problems(client: httpx.AsyncClient, route: tuple[str, str], codes: set[str]) -> None:
    """The OpenAPI document declares these error codes of `route` as problems (responses=problem_responses(...))."""
    path, method = route
    responses = (await client.get("/openapi.json")).json().get("paths", {}).get(path, {}).get(method, {}).get("responses", {})
    for code in sorted(codes):
        content = responses.get(code, {}).get("content", {})
        assert "application/problem+json" in content, said(
            f"the OpenAPI document's {code} answer of {method.upper()} {path}",
            expected=f"declared as application/problem+json (responses=problem_responses({code}))",
            got=sorted(content) if content else f"no {code} declared")


async def expect_long_ids_refused(client: httpx.AsyncClient, prefix: str) -> None:
    expect_problem(await client.get(f"{prefix}/{'x' * 64}"), 404, f"GET {prefix}/{{id}} of an unknown id of 64 characters")
    expect_problem(await client.get(f"{prefix}/{'x' * 65}"), 422,
                   f"GET {prefix}/{{id}} of an id of 65 characters (longer than the README allows)")


# --- orders: the outbox -----------------------------------------------------------------------

@pytest.mark.task("outbox")
@pytest.mark.promise("P1", "P3")
async def test_an_order_is_placed_and_its_event_reaches_the_stream(orders_app, nats_server, monkeypatch):
    expect_settings(orders_app.module, monkeypatch, "ORDERS_",
                    {"nats_url": "nats://127.0.0.1:4222", "database": "orders.db", "publish_timeout": 2.0, "backoff": 0.05},
                    {"publish_timeout": ([0.001, 60], [0, -1, 60.01]), "backoff": ([0.001, 2], [0, 2.01])})
    async with running(orders_app()) as client, broker(nats_server) as js:
        response = await client.post("/orders", json={"sku": "widget", "quantity": 3})
        expect_status(response, 201, "POST /orders with a valid order answers 201 Created")
        order = response.json()
        assert set(order) >= {"id", "sku", "quantity", "status"} and order["status"] == "placed", said(
            "the created order", expected='{"id": ..., "sku": "widget", "quantity": 3, "status": "placed"}',
            got=describe(response))
        assert response.headers.get("location") == f"/orders/{order['id']}", said(
            "the Location header of the created order", expected=f"/orders/{order['id']}",
            got=response.headers.get("location"))
        read = await client.get(f"/orders/{order['id']}")
        expect_status(read, 200, "GET /orders/{id} finds the order just placed")
        assert read.json() == order, said("GET /orders/{id} of the order just placed", expected=order, got=describe(read))
        expect_problem(await client.get("/orders/no-such-order"), 404, "GET /orders/{id} of an unknown id: a 404 problem")
        await expect_long_ids_refused(client, "/orders")
        await expect_documented_problems(client, ("/orders", "post"), {"400", "422"})
        await expect_documented_problems(client, ("/orders/{order_id}", "get"), {"404"})

        async def published() -> bool:
            return len(await stream_messages(js, "ORDERS")) >= 1

        await eventually(published, "no message reached the ORDERS stream after an order was placed: the outbox "
                         "relay must publish each event to the subject orders.placed")
        await expect_stream(js, "ORDERS", ["orders.>"])
        [message] = await stream_messages(js, "ORDERS")
        assert message.subject == "orders.placed", said(
            "the subject of the OrderPlaced event", expected="orders.placed", got=message.subject)
        event = json.loads(message.data)
        for key, value in {"type": "OrderPlaced", "order_id": order["id"], "sku": "widget", "quantity": 3}.items():
            assert event.get(key) == value, said(
                f"the event's {key!r}", expected=repr(value), got=f"the event {event}")
        assert isinstance(event.get("event_id"), str) and event["event_id"], said(
            "the event's event_id", expected="a non-empty string", got=f"the event {event}")
        datetime.fromisoformat(event["occurred_at"])
        msg_id = (message.headers or {}).get("Nats-Msg-Id")
        assert msg_id == event["event_id"], said(
            "the Nats-Msg-Id header of the published event (JetStream deduplicates by it: a publish repeated "
            "after a lost acknowledgement must carry the same id)", expected=event["event_id"], got=msg_id)


@pytest.mark.task("outbox")
@pytest.mark.promise("P2")
async def test_invalid_orders_are_422_and_publish_nothing(orders_app, nats_server):
    bodies = [{"sku": "widget", "quantity": 0}, {"sku": "widget", "quantity": 101},
              {"sku": "widget", "quantity": 2**63}, {"sku": "../etc", "quantity": 1}, {"sku": "", "quantity": 1},
              {"quantity": 1}, {"sku": "widget"}]
    async with running(orders_app()) as client, broker(nats_server) as js:
        for body in bodies:
            response = await client.post("/orders", json=body)
            expect_problem(response, 422, f"POST /orders with an invalid order {body}")
        for raw in (b'{"sku": "widget", "quantity": 1e309}', b'{"sku": "widget", "quantity": NaN}'):
            response = await client.post("/orders", content=raw, headers={"content-type": "application/json"})
            body = expect_problem(response, 422, f"POST /orders with the body {raw.decode()} (a number JSON cannot "
                                  "carry back: the 422 must not echo it)")
            errors = body.get("errors")
            assert isinstance(errors, list) and errors and all(isinstance(e, dict) and "input" not in e for e in errors), said(
                f"the 422 problem of POST /orders with the body {raw.decode()}",
                expected='"errors": [{"loc": [...], "msg": ..., "type": ...}, ...], never the refused "input"',
                got=describe(response))
        outbox = await client.get("/outbox")
        expect_status(outbox, 200, "GET /outbox")
        assert outbox.json() == {"pending": 0}, said("the outbox after only refused orders",
                                                        expected='{"pending": 0}', got=describe(outbox))
        assert await stream_messages(js, "ORDERS") == [], said(
            "the ORDERS stream after only refused orders", expected="no event", got="events were published")


@pytest.mark.task("outbox")
@pytest.mark.promise("P13")
async def test_every_error_of_both_services_is_a_problem(orders_app, shipping_app, nats_server, tmp_path, monkeypatch):
    # create_app() without settings reads them from the environment (Settings(), prefixes ORDERS_ and SHIPPING_).
    for prefix in ("ORDERS_", "SHIPPING_"):
        monkeypatch.setenv(f"{prefix}NATS_URL", nats_server.url)
        monkeypatch.setenv(f"{prefix}DATABASE", str(tmp_path / f"{prefix.lower()}env.db"))
    # The errors no route of yours raises: a path no route has, a method the path does not take.
    for name, build, path, method in (("orders", orders_app.module.create_app, "/orders", "POST"),
                                      ("shipping", shipping_app.module.create_app, "/shipments/x", "GET")):
        async with running(build()) as client:
            health = await client.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok", "service": name}, said(
                f"GET /health of {name} (built by create_app() from the environment)",
                expected=f'200 {{"status": "ok", "service": "{name}"}}', got=describe(health))
            expect_problem(await client.get("/nowhere"), 404, f"GET /nowhere on {name}: no route has this path, "
                           "and the framework's 404 is a problem too (install_problem_details(app), problems.py)")
            response = await client.delete(path)
            expect_problem(response, 405, f"DELETE {path} on {name}: the path exists, the method does not")
            allowed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
            assert method in allowed and "DELETE" not in allowed, said(
                f"the Allow header of {name}'s 405 for DELETE {path}", expected=f"the methods the path takes ({method})",
                got=response.headers.get("allow"))


@pytest.mark.task("outbox")
@pytest.mark.promise("P3")
async def test_each_order_has_exactly_one_event(orders_app, nats_server):
    async with running(orders_app()) as client, broker(nats_server) as js:
        responses = await asyncio.gather(*(client.post("/orders", json={"sku": "gadget", "quantity": n})
                                           for n in (1, 2, 3, 4, 5, 6, 7, 100)))
        for response in responses:
            expect_status(response, 201, "POST /orders, eight at once")
        ids = {response.json()["id"] for response in responses}

        async def drained() -> bool:
            return (await client.get("/outbox")).json().get("pending") == 0

        await eventually(drained, "GET /outbox still counts pending events: the relay did not publish them")
        events = [json.loads(message.data) for message in await stream_messages(js, "ORDERS")]
        got = sorted(event.get("order_id") for event in events)
        assert got == sorted(ids), said("one OrderPlaced event per order placed",
                                           expected=f"{len(ids)} events, one per order",
                                           got=f"{len(events)} events for orders {got}")
        assert len({event.get("event_id") for event in events}) == len(events), said(
            "the event ids", expected="a different event_id for every event", got=events)


@pytest.mark.task("broker_down")
@pytest.mark.promise("P4")
async def test_orders_are_taken_while_the_broker_is_down_and_published_when_it_is_back(orders_app, nats_server):
    async with running(orders_app()) as client:
        await asyncio.to_thread(nats_server.halt)
        try:
            async with asyncio.timeout(WAIT):
                response = await client.post("/orders", json={"sku": "widget", "quantity": 1})
        except TimeoutError:
            pytest.fail("POST /orders did not answer while the broker was down: an order is stored with its event "
                        "in the outbox and answered at once; the relay publishes later", pytrace=False)
        expect_status(response, 201, "POST /orders while the broker is down (the order stands; its event waits "
                      "in the outbox)")
        order_id = response.json()["id"]
        outbox = await client.get("/outbox")
        assert outbox.json() == {"pending": 1}, said(
            "GET /outbox while the broker is down, after one order", expected='{"pending": 1}', got=describe(outbox))
    # Orders restarted while the broker is still away: the event waits in the outbox, on disk.
    async with running(orders_app()) as client:
        outbox = await client.get("/outbox")
        assert outbox.json() == {"pending": 1}, said(
            "GET /outbox after orders restarted, the broker still down", expected='{"pending": 1}', got=describe(outbox))
        await asyncio.to_thread(nats_server.start)

        async def drained() -> bool:
            return (await client.get("/outbox")).json().get("pending") == 0

        await eventually(drained, "the broker came back but the outbox was not published: the relay must keep "
                         "trying (reconnect, retry with backoff) until JetStream acknowledges each event")
        async with broker(nats_server) as js:
            events = [json.loads(message.data) for message in await stream_messages(js, "ORDERS")]
        assert [event.get("order_id") for event in events] == [order_id], said(
            "the ORDERS stream after the broker came back", expected=f"exactly one event, for order {order_id}",
            got=[event.get("order_id") for event in events])


# --- the streams are on disk ------------------------------------------------------------------

@pytest.mark.task("durable")
@pytest.mark.promise("P5")
async def test_a_broker_restart_loses_no_event(orders_app, shipping_app, nats_server):
    async with running(orders_app()) as client:
        ids = []
        for quantity in (1, 2, 3):
            response = await client.post("/orders", json={"sku": "widget", "quantity": quantity})
            expect_status(response, 201, "POST /orders")
            ids.append(response.json()["id"])

        async def drained() -> bool:
            return (await client.get("/outbox")).json().get("pending") == 0

        await eventually(drained, "the outbox was not published")
    await asyncio.to_thread(nats_server.halt)
    # Orders again, on the same database, while the broker is away: what it stored is still there.
    async with running(orders_app()) as client:
        for order_id in ids:
            expect_status(await client.get(f"/orders/{order_id}"), 200, "GET /orders/{id} after orders restarted")
        outbox = await client.get("/outbox")
        assert outbox.json() == {"pending": 0}, said(
            "GET /outbox after orders restarted (its events were all published before)",
            expected='{"pending": 0}: a published event is deleted from the outbox for good (committed)',
            got=describe(outbox))
    await asyncio.to_thread(nats_server.start)
    async with running(shipping_app(Carrier())) as client:
        for order_id in ids:
            await eventually(lambda order_id=order_id: shipped(client, order_id),
                             f"order {order_id} was published before the broker restarted and never shipped after: "
                             "the ORDERS stream must keep its messages on disk (file storage)")


@pytest.mark.task("durable")
@pytest.mark.promise("P5")
async def test_shipping_started_while_the_broker_is_down_ships_once_it_is_back(shipping_app, nats_server):
    await asyncio.to_thread(nats_server.halt)
    try:
        async with running(shipping_app(Carrier())) as client:  # started and stopped without ever seeing the broker
            expect_status(await client.get("/health"), 200, "GET /health of shipping started while the broker is down")
    except TimeoutError:
        pytest.fail("shipping started while the broker was down never finished its lifespan startup, or its shutdown",
                    pytrace=False)
    service = running(shipping_app(Carrier()))
    try:
        client = await service.__aenter__()  # LifespanManager gives the startup WAIT seconds
    except TimeoutError:
        pytest.fail("shipping started while the broker was down never finished its lifespan startup: the service "
                    "starts without the broker (its connection attempt goes on in the background) and consumes "
                    "once the broker is back", pytrace=False)
    try:
        expect_status(await client.get("/health"), 200, "GET /health of shipping started while the broker is down")
        await asyncio.to_thread(nats_server.start)
        async with broker(nats_server) as js:
            async def consuming() -> bool:
                try:
                    await js.consumer_info("ORDERS", "shipping")
                except nats.js.errors.NotFoundError:
                    return False
                return True

            await eventually(consuming, "the broker came back, but shipping (started while it was down) never "
                             "created its streams and durable consumer")
            event = order_event()
            await publish(js, event)
            await eventually(lambda: shipped(client, event["order_id"]),
                             "shipping started while the broker was down never shipped an event published once it was back")
    finally:
        await service.__aexit__(None, None, None)


# --- shipping: at least once, applied once ----------------------------------------------------

@pytest.mark.task("ack_after_work")
@pytest.mark.promise("P6", "P12")
async def test_an_event_is_shipped_and_can_be_read(shipping_app, nats_server, monkeypatch):
    expect_settings(shipping_app.module, monkeypatch, "SHIPPING_",
                    {"nats_url": "nats://127.0.0.1:4222", "database": "shipping.db", "ack_wait": 30.0, "max_deliver": 5,
                     "max_in_flight": 16, "backoff": 0.5, "carrier_timeout": 30.0},
                    {"ack_wait": ([0.5, 3600], [0.49, 3600.01]), "max_deliver": ([1, 100], [0, 101]),
                     "max_in_flight": ([1, 1000], [0, 1001]), "backoff": ([0.001, 5], [0, 5.01]),
                     "carrier_timeout": ([0.001, 3600], [0, 3600.01])})
    settings = {"ack_wait": 20.0, "max_deliver": 4, "max_in_flight": 6}
    async with running(shipping_app(carrier := Carrier(), **settings)) as client, broker(nats_server) as js:
        await expect_ready(js)
        await expect_stream(js, "ORDERS", ["orders.>"])
        await expect_stream(js, "DEADLETTER", ["dead.>"])
        config = (await js.consumer_info("ORDERS", "shipping")).config
        got = {"durable_name": config.durable_name, "filter_subject": config.filter_subject,
               "ack_policy": config.ack_policy, "ack_wait": config.ack_wait, "max_deliver": config.max_deliver,
               "max_ack_pending": config.max_ack_pending}
        expected = {"durable_name": "shipping", "filter_subject": "orders.placed", "ack_policy": AckPolicy.EXPLICIT,
                    "ack_wait": 20.0, "max_deliver": 4, "max_ack_pending": 6}
        assert got == expected, said(f"the durable consumer, for shipping settings {settings}", expected=expected, got=got)
        await expect_documented_problems(client, ("/shipments/{order_id}", "get"), {"404", "422"})
        await expect_long_ids_refused(client, "/shipments")
        event = order_event(sku="gizmo", quantity=4)
        await publish(js, event)
        await eventually(lambda: shipped(client, event["order_id"]),
                         "an OrderPlaced event was published but GET /shipments/{order_id} never found its shipment")
        response = await client.get(f"/shipments/{event['order_id']}")
        expected = {key: event[key] for key in ("order_id", "sku", "quantity", "event_id")}
        assert response.json() == expected, said("GET /shipments/{order_id}", expected=expected,
                                                    got=describe(response))
        assert carrier.count(event["order_id"]) == 1, said(
            "the carrier's bookings for the event", expected="1", got=carrier.calls)
        expect_problem(await client.get("/shipments/unknown-order"), 404, "GET /shipments/{order_id} of no order: a 404 problem")
        await eventually(lambda: consumer_settled(js, 1), "the event was never acknowledged to the broker")


@pytest.mark.task("ack_after_work")
@pytest.mark.promise("P6")
async def test_a_consumer_stopped_mid_work_gets_the_event_again(shipping_app, nats_server):
    held = order_event()
    async with broker(nats_server) as js:
        first = Carrier(hold={held["order_id"]})
        async with running(shipping_app(first, ack_wait=1.0)):
            await expect_ready(js)
            await publish(js, held)
            await eventually(lambda: asyncio.sleep(0, first.count(held["order_id"]) == 1),
                             "the event was never handed to the carrier")
        # The service stopped while the carrier was still working: nothing was booked, nothing may be acknowledged.
        second = Carrier()
        async with running(shipping_app(second, ack_wait=1.0)) as client:
            await eventually(lambda: shipped(client, held["order_id"]),
                             "the service stopped while the carrier was booking an event; after a restart that event "
                             "was never shipped: it was acknowledged before the work was done (ack only after the "
                             "shipment is booked and recorded)")
        assert second.count(held["order_id"]) == 1, said(
            "the carrier's bookings after the restart", expected="1", got=second.calls)
        third = Carrier()
        async with running(shipping_app(third, ack_wait=1.0)) as client:
            await eventually(lambda: consumer_settled(js, 1), "the shipped event was never acknowledged")
            expect_status(await client.get(f"/shipments/{held['order_id']}"), 200,
                          "GET /shipments/{order_id} after shipping restarted once more (the shipment is stored for good)")
        assert third.calls == [], said("the carrier's bookings after one more restart", expected="none", got=third.calls)


@pytest.mark.task("ack_after_work")
@pytest.mark.promise("P6")
async def test_a_booking_longer_than_ack_wait_is_not_delivered_again(shipping_app, nats_server):
    event = order_event()
    # The booking outlasts ack_wait by far; heartbeats every ack_wait/3 or so leave more than a second of slack.
    carrier = Carrier(hold={event["order_id"]})  # this booking only: the next one is answered at once
    async with running(shipping_app(carrier, ack_wait=2.0)) as client, broker(nats_server) as js:
        await expect_ready(js)
        await publish(js, event)
        await eventually(lambda: asyncio.sleep(0, carrier.count(event["order_id"]) == 1),
                         "the event never reached the carrier")
        asyncio.get_running_loop().call_later(3.5, carrier.release.set)  # the carrier answers 3.5 s later
        await eventually(lambda: shipped(client, event["order_id"]), "an event whose booking takes 3.5 s was never shipped")
        await eventually(lambda: consumer_settled(js, 1), "the event was never acknowledged to the broker")
        deliveries = (await js.consumer_info("ORDERS", "shipping")).delivered.consumer_seq
        assert deliveries == 1, said(
            "deliveries of one event whose booking takes 3.5 s, with ack_wait = 2 s",
            expected="1: while the carrier works, tell the broker the event is still being worked on "
            "(message.in_progress(), more often than every ack_wait), or it is delivered again",
            got=f"{deliveries} deliveries")
        # The service sat with nothing new to fetch for those seconds: it still takes the next event.
        later = order_event()
        await publish(js, later)
        await eventually(lambda: shipped(client, later["order_id"]),
                         "an event published after a long booking was never shipped (nothing new arrived for a "
                         "while: does the consumer loop give back what it reserved when a fetch times out?)")


@pytest.mark.task("idempotent")
@pytest.mark.promise("P7")
async def test_a_duplicate_event_is_applied_once(shipping_app, nats_server):
    async with running(shipping_app(carrier := Carrier())) as client, broker(nats_server) as js:
        await expect_ready(js)
        event = order_event()
        # The same event twice, past the broker's duplicate window (different Nats-Msg-Id): the consumer decides.
        await publish(js, event)
        await eventually(lambda: shipped(client, event["order_id"]), "the event was never shipped")
        await publish(js, event)
        await eventually(lambda: consumer_settled(js, 2), "the duplicate was never acknowledged")
        assert carrier.count(event["order_id"]) == 1, said(
            "the same OrderPlaced event (same event_id) delivered twice", expected="the carrier booked once",
            got=f"{carrier.count(event['order_id'])} bookings")


@pytest.mark.task("idempotent")
@pytest.mark.promise("P7")
async def test_concurrent_duplicates_are_applied_once(shipping_app, nats_server):
    carrier = Carrier(hold_all=True)
    async with running(shipping_app(carrier)) as client, broker(nats_server) as js:
        await expect_ready(js)
        event = order_event()
        for _ in range(3):
            await publish(js, event)

        async def all_handed_out() -> bool:
            info = await js.consumer_info("ORDERS", "shipping")
            return info.num_ack_pending == 3

        # All three copies are with the service at once (none acknowledged) before the carrier answers.
        await eventually(all_handed_out, "the three copies of one event were never in flight together: fetch "
                         "several messages at once (up to max_in_flight)")
        # Handed out is not yet at the carrier: give every copy the time to get as far as it
        # will while the first booking is held. A service that lets copies through together
        # shows it as a second call; one that makes them wait never will (then this waits the
        # whole grace, which is the price of checking a race without a clock in the service).
        loop = asyncio.get_running_loop()
        grace = loop.time() + 1.5
        while len(carrier.calls) < 2 and loop.time() < grace:
            await asyncio.sleep(0.01)
        carrier.release.set()
        await eventually(lambda: consumer_settled(js, 3), "the three copies were never all acknowledged")
        assert await shipped(client, event["order_id"]), said(
            "GET /shipments/{order_id} after three copies of one event", expected="200", got="no shipment")
        assert carrier.count(event["order_id"]) == 1, said(
            "three copies of one event in flight at the same time",
            expected="the carrier booked once: a second copy waits for the first, then sees it done",
            got=f"{carrier.count(event['order_id'])} bookings")


# --- dead letters -----------------------------------------------------------------------------

@pytest.mark.task("dead_letters")
@pytest.mark.promise("P8", "P5")
async def test_a_failing_event_is_retried_then_dead_lettered(shipping_app, nats_server):
    poison, fine = order_event(), order_event()
    carrier = Carrier(fail={poison["order_id"]})
    backoff = 0.25
    async with running(shipping_app(carrier, max_deliver=3, backoff=backoff)) as client, broker(nats_server) as js:
        await expect_ready(js)
        await publish(js, poison)
        await publish(js, fine)
        await eventually(lambda: shipped(client, fine["order_id"]),
                         "an event published after a failing one was never shipped")

        async def dead() -> bool:
            return len(await stream_messages(js, "DEADLETTER")) >= 1

        await eventually(dead, "an event whose carrier call always fails never reached the DEADLETTER stream "
                         "after max_deliver deliveries")
        await eventually(lambda: consumer_settled(js, 2), "the failing event was never settled (term or ack)")
        [letter] = await stream_messages(js, "DEADLETTER")
        assert letter.subject == "dead.orders.placed", said(
            "the dead letter's subject", expected="dead.orders.placed", got=letter.subject)
        assert json.loads(letter.data) == poison, said(
            "the dead letter's body", expected="the original event, unchanged", got=letter.data[:300])
        assert (letter.headers or {}).get("Dead-Reason"), said(
            "the dead letter's headers", expected="a Dead-Reason header saying why", got=letter.headers)
        assert carrier.count(poison["order_id"]) == 3, said(
            "carrier calls for an event that always fails, with max_deliver = 3",
            expected="3 (one per delivery, then the dead-letter stream)", got=carrier.count(poison["order_id"]))
        # Each redelivery waits at least its delay: backoff, then twice that (a busy machine only adds to it).
        gaps = carrier.gaps(poison["order_id"])
        assert all(gap >= 0.95 * backoff * 2**n for n, gap in enumerate(gaps)), said(
            f"seconds between the carrier calls for a failing event, with backoff = {backoff}",
            expected=f"at least {backoff:g}, then at least {2 * backoff:g} (delivered again after a delay starting "
            "at backoff, doubling: nak(delay=...))", got=[round(gap, 3) for gap in gaps])
        expect_problem(await client.get(f"/shipments/{poison['order_id']}"), 404,
                      "GET /shipments/{order_id} of a dead-lettered event")
    await asyncio.to_thread(nats_server.restart)
    async with broker(nats_server) as js:
        kept = await stream_messages(js, "DEADLETTER")
    assert len(kept) == 1, said("the DEADLETTER stream after a broker restart",
                                expected="the dead letter, still there (file storage)", got=f"{len(kept)} messages")


@pytest.mark.task("dead_letters")
@pytest.mark.promise("P9")
async def test_an_event_that_can_never_be_processed_is_dead_lettered_at_once(shipping_app, nats_server):
    carrier = Carrier()
    garbage = [b"not json at all", json.dumps({"type": "OrderPlaced", "order_id": "x"}).encode(),
               json.dumps(order_event(quantity=2**63)).encode(), json.dumps(order_event(type="OrderCancelled")).encode(),
               *(json.dumps({**order_event(), **change}).encode() for change in (
                   {"quantity": 0}, {"quantity": 101}, {"order_id": ""}, {"order_id": "o" * 65}, {"event_id": ""},
                   {"event_id": "e" * 129}, {"sku": ".hidden"}, {"occurred_at": "yesterday"}))]
    # The edges of the event's rules, each a valid event.
    goods = [order_event(quantity=1), order_event(quantity=100), order_event(order_id="o" * 64),
             order_event(event_id="e" * 128), order_event(event_id="e"), order_event(order_id="z")]
    async with running(shipping_app(carrier, max_deliver=5, backoff=0.05)) as client, broker(nats_server) as js:
        await expect_ready(js)
        for data in garbage:
            await publish(js, data)
        for good in goods:
            await publish(js, good)
        for good in goods:
            await eventually(lambda good=good: shipped(client, good["order_id"]),
                             f"a valid event after invalid ones was never shipped: {good}")

        async def all_dead() -> bool:
            return len(await stream_messages(js, "DEADLETTER")) >= len(garbage)

        await eventually(all_dead, "invalid events (not JSON, missing fields, a quantity of 2**63 or outside 1..100, "
                         "another type, an empty or too long order_id or event_id, a SKU outside the rule, a time "
                         "that is no ISO 8601) never all reached the DEADLETTER stream")
        letters = await stream_messages(js, "DEADLETTER")
        assert sorted(letter.data for letter in letters) == sorted(garbage), said(
            "the dead letters", expected="each invalid message once, its body unchanged",
            got=[letter.data[:80] for letter in letters])
        total = len(garbage) + len(goods)
        await eventually(lambda: consumer_settled(js, total), "the events were never all settled")
        # The consumer sequence counts every delivery, redeliveries included.
        deliveries = (await js.consumer_info("ORDERS", "shipping")).delivered.consumer_seq
        assert deliveries == total, said(
            f"deliveries of {len(garbage)} invalid events and {len(goods)} valid ones",
            expected=f"{total}: an event that can never succeed is dead-lettered at its first delivery, "
            "not retried", got=f"{deliveries} deliveries")
        assert sorted(call.get("order_id") for call in carrier.calls) == sorted(good["order_id"] for good in goods), said(
            "carrier calls", expected="only the valid events', once each", got=carrier.calls)


# --- flow: slow events, bounded work ----------------------------------------------------------

@pytest.mark.task("flow")
@pytest.mark.promise("P10")
async def test_a_slow_event_does_not_hold_up_the_others(shipping_app, nats_server):
    slow = order_event()
    carrier = Carrier(hold={slow["order_id"]})
    async with running(shipping_app(carrier)) as client, broker(nats_server) as js:
        await expect_ready(js)
        await publish(js, slow)
        await eventually(lambda: asyncio.sleep(0, carrier.count(slow["order_id"]) == 1),
                         "the first event never reached the carrier")
        others = [order_event() for _ in range(3)]
        for event in others:
            await publish(js, event)
        for event in others:
            await eventually(lambda event=event: shipped(client, event["order_id"]),
                             "while the carrier was still busy with one event, the events behind it were not shipped: "
                             "handle several events at once (up to max_in_flight)")
        carrier.release.set()
        await eventually(lambda: shipped(client, slow["order_id"]), "the slow event was never shipped")


@pytest.mark.task("flow")
@pytest.mark.promise("P8", "P10")
async def test_carrier_calls_that_never_answer_do_not_stop_shipping(shipping_app, nats_server):
    hung = [order_event(), order_event()]
    carrier = Carrier(hold={event["order_id"] for event in hung})   # never released: no answer, ever
    settings = {"max_in_flight": 2, "carrier_timeout": 0.5, "max_deliver": 2, "backoff": 0.05}
    async with running(shipping_app(carrier, **settings)) as client, broker(nats_server) as js:
        await expect_ready(js)
        for event in hung:
            await publish(js, event)
        await eventually(lambda: asyncio.sleep(0, carrier.active == 2),
                         "the two first events never reached the carrier at once (max_in_flight = 2)")
        behind = [order_event() for _ in range(3)]
        for event in behind:
            await publish(js, event)
        for event in behind:
            await eventually(lambda event=event: shipped(client, event["order_id"]),
                             "two carrier calls that never answer held both slots (max_in_flight = 2), and the "
                             "events behind them were never shipped: bound each call by carrier_timeout "
                             "(asyncio.timeout) and treat running out as a failed booking (nak with a delay)")

        async def dead() -> bool:
            return len(await stream_messages(js, "DEADLETTER")) >= len(hung)

        await eventually(dead, "events whose carrier call never answers (carrier_timeout = 0.5 s, max_deliver = 2) "
                         "never reached the DEADLETTER stream: running out of time is a failed booking")
        letters = sorted(json.loads(letter.data)["order_id"] for letter in await stream_messages(js, "DEADLETTER"))
        assert letters == sorted(event["order_id"] for event in hung), said(
            "the dead letters", expected="the two events whose carrier never answered, once each", got=letters)
        for event in hung:
            assert carrier.count(event["order_id"]) == 2, said(
                "carrier calls for an event whose call never answers, with max_deliver = 2",
                expected="2 (one per delivery, then the dead-letter stream)", got=carrier.count(event["order_id"]))
            expect_problem(await client.get(f"/shipments/{event['order_id']}"), 404,
                           "GET /shipments/{order_id} of an event whose carrier never answered")
        await eventually(lambda: asyncio.sleep(0, carrier.active == 0),
                         "carrier calls that ran out of time were left running: cancel them (asyncio.timeout does)")


@pytest.mark.task("flow")
@pytest.mark.promise("P11")
async def test_no_more_than_max_in_flight_events_are_worked_on_at_once(shipping_app, nats_server):
    carrier = Carrier(hold_all=True)
    async with running(shipping_app(carrier, max_in_flight=3)) as client, broker(nats_server) as js:
        await expect_ready(js)
        events = [order_event() for _ in range(9)]
        for event in events:
            await publish(js, event)
        await eventually(lambda: asyncio.sleep(0, carrier.active >= 3),
                         "with max_in_flight = 3 and a carrier that holds every call, three calls never ran at once")
        await asyncio.sleep(0.5)  # room for a fourth, if the service would start one
        assert carrier.peak <= 3, said(
            "carrier calls in progress at once, with max_in_flight = 3", expected="at most 3", got=carrier.peak)
        carrier.release.set()
        for event in events:
            await eventually(lambda event=event: shipped(client, event["order_id"]),
                             "after the carrier let go, not every event was shipped")
        assert carrier.peak <= 3, said("carrier calls in progress at once, with max_in_flight = 3",
                                          expected="at most 3", got=carrier.peak)


# --- the relay outlives every failure (last: it waits out SQLite's busy timeout) ---------------

# How long the lock is held at most: three times SQLite's default busy timeout (5 s), so that a relay
# that tries the outbox meanwhile meets "database is locked". A relay that logs the error it met
# ends the wait at once; one that logs nothing waits out the bound, and passes all the same.
LOCKED_FOR = 15.0


@pytest.mark.task("broker_down")
@pytest.mark.promise("P4")
async def test_the_relay_outlives_a_database_locked_for_a_while(orders_app, nats_server, tmp_path, caplog):
    async with running(orders_app(publish_timeout=0.25)) as client:
        await asyncio.to_thread(nats_server.halt)   # the first order's event waits in the outbox
        response = await client.post("/orders", json={"sku": "widget", "quantity": 1})
        expect_status(response, 201, "POST /orders while the broker is down")
        # Another process (a backup, a migration) holds the whole database file for a while.
        locker = sqlite3.connect(tmp_path / "orders.db", timeout=WAIT, isolation_level=None,
                                 check_same_thread=False)
        seen = len(caplog.records)

        def met_the_lock() -> bool:  # a relay that logs the error it met tells us it has met the lock
            return any((record.exc_info and isinstance(record.exc_info[1], sqlite3.Error))
                       or "database is locked" in record.getMessage() for record in caplog.records[seen:])

        try:
            await asyncio.to_thread(locker.execute, "BEGIN EXCLUSIVE")
            # The broker comes back while the file is locked: the relay cannot empty the outbox
            # without the database (to read the event, or to delete it once published), so it
            # meets the lock whatever it waited on before. The lock is held until it has (a
            # logged sqlite3 error), or for LOCKED_FOR seconds at most.
            await asyncio.to_thread(nats_server.start)
            loop = asyncio.get_running_loop()
            held = loop.time()
            while not met_the_lock() and loop.time() - held < LOCKED_FOR:
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(locker.execute, "ROLLBACK")
            locker.close()
        later = await client.post("/orders", json={"sku": "widget", "quantity": 2})
        expect_status(later, 201, "POST /orders after the database was locked for a while")

        async def drained() -> bool:
            return (await client.get("/outbox")).json().get("pending") == 0

        await eventually(drained, "the database file was locked by another process while the broker came back "
                         "(SQLite raised 'database is locked' to whatever used it meanwhile), then released, but "
                         "the outbox was never published: the relay must survive every error, not only the "
                         "broker's (catch Exception in its loop, log it with the traceback, back off, go on); "
                         "a task that ends tells no one")
        async with broker(nats_server) as js:
            published = sorted(json.loads(message.data).get("order_id") for message in await stream_messages(js, "ORDERS"))
        expected = sorted([response.json()["id"], later.json()["id"]])
        assert published == expected, said("the ORDERS stream after the lock and the broker's return",
                                           expected=f"one event per order: {expected}", got=published)
