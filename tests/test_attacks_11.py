"""Attacks on the reference solution of exercise 11 (messaging): the defences hold.

A real nats-server per test (grader.broker). The broker goes away and comes back while both
services run, or is not there when shipping starts; orders restarts with events still in its
outbox; twenty copies of one event arrive at once; a backlog of hundreds of events meets a
small in-flight bound; a carrier that outlasts ack_wait; a raw uvicorn server gets hostile paths
and numbers. Every order is shipped once, nothing runs unbounded, nothing answers 5xx.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from asgi_lifespan import LifespanManager

from grader.broker import NatsServer
from grader.live import free_port, serve_in_process
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "11_messaging"
WAIT = 30.0
pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def services() -> dict[str, ModuleType]:
    return {name: load_module(Path(SOLUTION), name) for name in ("orders", "shipping")}


@pytest.fixture
def server():
    with NatsServer() as running:
        yield running


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=WAIT, shutdown_timeout=WAIT) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client:
            yield client


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


def event(**changes: Any) -> dict[str, Any]:
    return {"type": "OrderPlaced", "event_id": uuid.uuid4().hex, "order_id": uuid.uuid4().hex, "sku": "widget",
            "quantity": 1, "occurred_at": "2026-12-07T10:00:00+00:00", **changes}


class Carrier:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.active = self.peak = 0
        self.delay = delay

    async def __call__(self, shipment: dict[str, Any]) -> None:
        self.calls.append(shipment["order_id"])
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1


def shipping_app(services: dict[str, ModuleType], server: NatsServer, folder: Path, carrier: Any, **settings: Any) -> Any:
    module = services["shipping"]
    options = {"nats_url": server.url, "database": str(folder / "shipping.db"), **settings}
    return module.create_app(module.Settings(**options), carrier=carrier)


def orders_app(services: dict[str, ModuleType], server: NatsServer, folder: Path) -> Any:
    module = services["orders"]
    return module.create_app(module.Settings(nats_url=server.url, database=str(folder / "orders.db")))


async def shipped(client: httpx.AsyncClient, order_id: str) -> bool:
    return (await client.get(f"/shipments/{order_id}")).status_code == 200


async def test_11_messaging_shipping_survives_the_broker_going_away(services, server, tmp_path):
    carrier = Carrier()
    async with running(shipping_app(services, server, tmp_path, carrier)) as client:
        await asyncio.to_thread(server.halt)
        await asyncio.sleep(0.3)  # the consumer notices: its fetches fail meanwhile
        await asyncio.to_thread(server.start)
        nc = await nats.connect(server.url)
        after = event()
        await nc.jetstream().publish("orders.placed", json.dumps(after).encode())
        await nc.close()
        await eventually(lambda: shipped(client, after["order_id"]), "an event published after the broker came "
                         "back was never shipped")
    assert carrier.calls == [after["order_id"]]


async def test_11_messaging_shipping_starts_without_a_broker_and_catches_up(services, tmp_path):
    server = NatsServer()
    server.port = free_port()  # known now, started later
    try:
        async with running(shipping_app(services, server, tmp_path, Carrier())) as client:
            health = await client.get("/health")
            assert health.status_code == 200
            await asyncio.to_thread(server.start)
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await eventually(lambda: stream_exists(js, "ORDERS"), "shipping never created its stream")
            late = event()
            await js.publish("orders.placed", json.dumps(late).encode())
            await nc.close()
            await eventually(lambda: shipped(client, late["order_id"]), "shipping never caught up")
    finally:
        server.stop()


async def stream_exists(js: Any, name: str) -> bool:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_11_messaging_an_outbox_outlives_a_restart_of_orders(services, server, tmp_path):
    await asyncio.to_thread(server.halt)
    async with running(orders_app(services, server, tmp_path)) as client:
        ids = [(await client.post("/orders", json={"sku": "widget", "quantity": 1})).json()["id"] for _ in range(5)]
        assert (await client.get("/outbox")).json() == {"pending": 5}
    await asyncio.to_thread(server.start)
    async with running(orders_app(services, server, tmp_path)) as client:
        async def drained() -> bool:
            return (await client.get("/outbox")).json()["pending"] == 0

        await eventually(drained, "the second life of orders never published the first one's outbox")
    nc = await nats.connect(server.url)
    info = await nc.jetstream().stream_info("ORDERS")
    await nc.close()
    assert info.state.messages == len(ids)


async def test_11_messaging_twenty_concurrent_copies_book_once(services, server, tmp_path):
    carrier = Carrier(delay=0.2)
    async with running(shipping_app(services, server, tmp_path, carrier, max_in_flight=32)) as client:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        copy = event()
        await asyncio.gather(*(js.publish("orders.placed", json.dumps(copy).encode()) for _ in range(20)))
        await eventually(lambda: shipped(client, copy["order_id"]), "never shipped")

        async def settled() -> bool:
            info = await js.consumer_info("ORDERS", "shipping")
            return info.delivered.stream_seq >= 20 and info.num_ack_pending == 0

        await eventually(settled, "the copies were never all acknowledged")
        await nc.close()
    assert carrier.calls == [copy["order_id"]]


async def test_11_messaging_a_backlog_is_worked_off_within_the_bound(services, server, tmp_path):
    async with running(orders_app(services, server, tmp_path)) as orders:
        ids = [r.json()["id"] for r in await asyncio.gather(*(
            orders.post("/orders", json={"sku": "gadget", "quantity": 2}) for _ in range(100)))]

        async def drained() -> bool:
            return (await orders.get("/outbox")).json()["pending"] == 0

        await eventually(drained, "100 orders were never all published")
    carrier = Carrier(delay=0.005)
    async with running(shipping_app(services, server, tmp_path, carrier, max_in_flight=8)) as client:
        for order_id in ids:
            await eventually(lambda order_id=order_id: shipped(client, order_id), f"{order_id} never shipped")
    assert sorted(carrier.calls) == sorted(ids)
    assert carrier.peak <= 8


async def test_11_messaging_a_carrier_slower_than_ack_wait_books_once(services, server, tmp_path):
    carrier = Carrier(delay=2.5)  # longer than ack_wait: in_progress() must keep the message ours
    async with running(shipping_app(services, server, tmp_path, carrier, ack_wait=1.0)) as client:
        nc = await nats.connect(server.url)
        slow = event()
        await nc.jetstream().publish("orders.placed", json.dumps(slow).encode())
        await nc.close()
        await eventually(lambda: shipped(client, slow["order_id"]), "never shipped")
    assert carrier.calls == [slow["order_id"]]


async def test_11_messaging_carrier_calls_that_never_answer_time_out(services, server, tmp_path):
    calls: list[str] = []

    async def carrier(shipment: dict[str, Any]) -> None:   # accepts the first two calls, never answers them
        calls.append(shipment["order_id"])
        if len(calls) <= 2:
            await asyncio.Event().wait()

    app = shipping_app(services, server, tmp_path, carrier, ack_wait=1.0, max_in_flight=2, carrier_timeout=1.0,
                       backoff=0.05)
    async with running(app) as client:
        nc = await nats.connect(server.url)
        events = [event() for _ in range(3)]
        for placed in events:
            await nc.jetstream().publish("orders.placed", json.dumps(placed).encode(),
                                         headers={"Nats-Msg-Id": placed["event_id"]})
        await nc.close()
        for placed in events:   # the third despite two hung calls; the hung two at their next delivery
            await eventually(lambda placed=placed: shipped(client, placed["order_id"]),
                             "a hung carrier call held its slot for ever (in_progress() kept it ours)")
    assert len(calls) == 5


async def test_11_messaging_the_relay_outlives_any_error(services, server, tmp_path, caplog):
    app = orders_app(services, server, tmp_path)
    async with running(app) as client:
        relay = app.state.relay
        real, failures = relay.publish_pending, [sqlite3.OperationalError("disk I/O error")]

        async def once_broken() -> int:   # one transient database error, not the broker's
            if failures:
                raise failures.pop()
            return await real()

        relay.publish_pending = once_broken
        relay.wake.set()
        ids = [(await client.post("/orders", json={"sku": "widget", "quantity": 1})).json()["id"] for _ in range(3)]

        async def drained() -> bool:
            return (await client.get("/outbox")).json()["pending"] == 0

        await eventually(drained, "one database error ended the relay: the outbox was never published")
        assert not failures
    assert len(ids) == 3
    assert any(record.exc_info and "disk I/O error" in str(record.exc_info[1]) for record in caplog.records), (
        "the relay's failure was not logged with its traceback")


def raw(port: int, method: str, target: str, body: bytes = b"") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("content-type", "application/json")
        connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.servers
async def test_11_messaging_hostile_requests_are_4xx(server, tmp_path):
    # As a package (orders.py imports the given problems.py beside it): 11_messaging.orders from solutions/.
    command = [sys.executable, "-m", "uvicorn", "11_messaging.orders:create_app", "--factory", "--app-dir", str(SOLUTION.parent),
               "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    env = {"ORDERS_NATS_URL": server.url, "ORDERS_DATABASE": str(tmp_path / "orders.db")}
    bodies = [b'{"sku": "widget", "quantity": 1e309}', b'{"sku": "widget", "quantity": NaN}',
              b'{"sku": "widget", "quantity": 18446744073709551616}', b'{"sku": "widget", "quantity": -1}',
              b'{"sku": "..", "quantity": 1}', b'{"sku": "' + b"a" * 10_000 + b'", "quantity": 1}',
              b'{"sku": ["widget"], "quantity": 1}', b"[]", b"not json"]
    targets = ["/orders/..", "/orders/%2e%2e", "/orders/..%2Foutbox", "/orders/" + "x" * 5000, "/orders/%00"]
    with serve_in_process(command, env=env, ready_path="/health") as url:
        port = int(url.rsplit(":", 1)[1])
        statuses = await asyncio.to_thread(lambda: [raw(port, "POST", "/orders", body) for body in bodies])
        assert all(400 <= status < 500 for status in statuses), [(x[:40], s) for x, s in zip(targets if len(statuses) == len(targets) else bodies, statuses) if not 400 <= s < 500]
        statuses = await asyncio.to_thread(lambda: [raw(port, "GET", target) for target in targets])
        assert all(400 <= status < 500 for status in statuses), [(x[:40], s) for x, s in zip(targets if len(statuses) == len(targets) else bodies, statuses) if not 400 <= s < 500]
