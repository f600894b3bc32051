"""Orders service (lesson 11 reference): takes orders, relays OrderPlaced events to JetStream.

The order and its event are written in one SQLite transaction (the transactional outbox); a
relay task started in the lifespan publishes the outbox to the broker and deletes an event only
once JetStream has acknowledged storing it. The broker can be down: orders are still taken,
and the outbox empties when it is back. A publish that is repeated (the acknowledgement was
lost, the relay restarted) carries the same Nats-Msg-Id, so the stream stores it once.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal

import aiosqlite
import nats
import nats.errors
import nats.js.errors
from fastapi import FastAPI, HTTPException, Path, Request, Response, status
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import install_problem_details, problem_responses

logger = logging.getLogger("orders")

STREAM = "ORDERS"
SUBJECT = "orders.placed"
# One plain token: letters, digits, - _ . ~ (it travels in URLs and in the event).
SKU_PATTERN = r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}$"
BATCH = 100           # outbox rows published per round, their acknowledgements awaited together
MAX_BACKOFF = 2.0     # seconds: the longest wait between two failed rounds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    nats_url: str = "nats://127.0.0.1:4222"
    database: str = "orders.db"
    publish_timeout: float = Field(default=2.0, gt=0, le=60)
    backoff: float = Field(default=0.05, gt=0, le=MAX_BACKOFF)


def stream_config() -> StreamConfig:
    """The ORDERS stream: on disk, so a broker restart loses nothing; a 2-minute duplicate window."""
    return StreamConfig(name=STREAM, subjects=["orders.>"], storage=StorageType.FILE,
                        discard=DiscardPolicy.OLD, duplicate_window=120.0)


class OrderIn(BaseModel):
    sku: str = Field(pattern=SKU_PATTERN)
    quantity: int = Field(ge=1, le=100)


class Order(BaseModel):
    id: str
    sku: str
    quantity: int
    status: Literal["placed"] = "placed"


class Outbox(BaseModel):
    pending: int


SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, sku TEXT NOT NULL, quantity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    payload TEXT NOT NULL
);
"""



# The client's events in this service's log, one line each (nats-py would log a traceback per error).
async def broker_error(error: Exception) -> None:
    logger.warning("broker: %r", error)


async def broker_disconnected() -> None:
    logger.warning("broker: disconnected; reconnecting")


async def broker_reconnected() -> None:
    logger.info("broker: reconnected")


@dataclass
class Relay:
    """Publishes the outbox, oldest first, and deletes each event once JetStream has stored it."""

    db: aiosqlite.Connection
    settings: Settings
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # One connection, one transaction at a time: the routes and the relay write through this lock.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    nc: NATS | None = None
    stream_ready: bool = False

    async def connect(self) -> NATS:
        if self.nc is None or self.nc.is_closed:
            # Reconnect for ever, quickly: the outbox holds what cannot be published meanwhile.
            self.nc = await nats.connect(self.settings.nats_url, connect_timeout=2, reconnect_time_wait=0.25,
                                         max_reconnect_attempts=-1, error_cb=broker_error,
                                         disconnected_cb=broker_disconnected, reconnected_cb=broker_reconnected)
        if not self.stream_ready:  # until it succeeds once, even if the connection did earlier
            with contextlib.suppress(nats.js.errors.BadRequestError):  # it exists, with an operator's settings
                await self.nc.jetstream().add_stream(stream_config())
            self.stream_ready = True
        return self.nc

    async def publish_pending(self) -> int:
        """One round: publish up to BATCH events, await their acknowledgements together, delete the stored ones."""
        # Under the lock: on this one connection, a route's transaction that is not yet committed
        # would be visible, and an event whose order then rolls back must never be published.
        async with self.write_lock, self.db.execute(
                "SELECT seq, event_id, subject, payload FROM outbox ORDER BY seq LIMIT ?", (BATCH,)) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return 0
        js = (await self.connect()).jetstream()
        # The Nats-Msg-Id is the event's own id: a publish repeated after a lost acknowledgement is stored once.
        results = await asyncio.gather(*(
            js.publish(subject, payload.encode(), timeout=self.settings.publish_timeout, stream=STREAM,
                       headers={"Nats-Msg-Id": event_id})
            for _, event_id, subject, payload in rows), return_exceptions=True)
        stored = [(seq,) for (seq, *_), result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
        async with self.write_lock:
            await self.db.executemany("DELETE FROM outbox WHERE seq = ?", stored)
            await self.db.commit()
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]
        return len(stored)

    async def run(self) -> None:
        delay = self.settings.backoff
        while True:
            try:
                if await self.publish_pending() == 0:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                delay = self.settings.backoff
            except Exception as error:
                # Whatever failed, the relay goes on: it is the only thing that empties the outbox,
                # and a task that ends tells no one. Everything unpublished stays in the outbox.
                if isinstance(error, (nats.errors.Error, OSError, TimeoutError)):
                    logger.warning("outbox relay: %r; next try in %.2f s", error, delay)  # the broker is down or slow
                else:  # a locked or full database, a bug: the traceback is needed
                    logger.exception("outbox relay failed; next try in %.2f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self.nc.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with aiosqlite.connect(settings.database) as db:
            await db.executescript(SCHEMA)
            await db.commit()
            relay = Relay(db, settings)
            app.state.db, app.state.relay = db, relay
            task = asyncio.create_task(relay.run(), name="outbox-relay")
            try:
                yield
            finally:
                while not task.done():  # a cancel that nats-py's connect swallows (Python 3.11) is repeated
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.5)
                await relay.close()

    # Every error a problem (problems.py, given): the 404, FastAPI's 422 without the refused input
    # (an infinite or NaN number cannot be written back as JSON), an unknown path, a wrong method.
    app = FastAPI(title="orders", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "orders"}

    @app.post("/orders", status_code=status.HTTP_201_CREATED,
              responses=problem_responses(400))  # a body that is not even UTF-8 text
    async def place_order(payload: OrderIn, request: Request, response: Response) -> Order:
        order = Order(id=uuid.uuid4().hex, sku=payload.sku, quantity=payload.quantity)
        event = {"type": "OrderPlaced", "event_id": uuid.uuid4().hex, "order_id": order.id, "sku": order.sku,
                 "quantity": order.quantity, "occurred_at": datetime.now(UTC).isoformat()}
        db: aiosqlite.Connection = request.app.state.db
        async with request.app.state.relay.write_lock:
            # The order and its event, together or not at all: no order without its event, no event without its order.
            try:
                await db.execute("INSERT INTO orders (id, sku, quantity) VALUES (?, ?, ?)",
                                 (order.id, order.sku, order.quantity))
                await db.execute("INSERT INTO outbox (event_id, subject, payload) VALUES (?, ?, ?)",
                                 (event["event_id"], SUBJECT, json.dumps(event)))
                await db.commit()
            except BaseException:
                # Half a transaction left open on the shared connection would be committed by the
                # next writer: an order without its event. Undo it (also when the client went away).
                await asyncio.shield(db.rollback())
                raise
        request.app.state.relay.wake.set()
        response.headers["Location"] = f"/orders/{order.id}"
        return order

    @app.get("/orders/{order_id}", responses=problem_responses(404))
    async def read_order(order_id: Annotated[str, Path(max_length=64)], request: Request) -> Order:
        # Under the lock, so that an order still being written (not yet committed) is not read.
        async with request.app.state.relay.write_lock, request.app.state.db.execute(
                "SELECT id, sku, quantity FROM orders WHERE id = ?", (order_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No order has this id.")  # the id is in `instance`
        return Order(id=row[0], sku=row[1], quantity=row[2])

    @app.get("/outbox")
    async def outbox(request: Request) -> Outbox:
        async with request.app.state.relay.write_lock, request.app.state.db.execute("SELECT COUNT(*) FROM outbox") as cursor:
            (pending,) = await cursor.fetchone() or (0,)
        return Outbox(pending=pending)

    return app
