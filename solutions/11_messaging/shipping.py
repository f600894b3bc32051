"""Shipping service (lesson 11 reference): books one shipment per OrderPlaced event from JetStream.

A durable pull consumer reads the ORDERS stream. Each event is handled at least once (a message
is acknowledged only after its shipment is booked and recorded) and applied once (the event_id
is recorded with the shipment, in one transaction, and an event already recorded is only
acknowledged). A carrier that fails is retried with a growing delay; after `max_deliver`
deliveries the event goes to the dead-letter stream, as does an event that can never be
processed (not JSON, not an OrderPlaced). At most `max_in_flight` events are in progress at
once, and a slow one does not hold up the others: a carrier call has `carrier_timeout` seconds,
and one that runs out is a failed booking like any other.
"""

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import aiosqlite
import nats
import nats.errors
import nats.js.errors
from fastapi import FastAPI, HTTPException, Path, Request, status
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import install_problem_details, problem_responses

logger = logging.getLogger("shipping")

STREAM = "ORDERS"
SUBJECT = "orders.placed"
DURABLE = "shipping"
DEAD_STREAM = "DEADLETTER"
DEAD_SUBJECT = "dead.orders.placed"
SKU_PATTERN = r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}$"
MAX_NAK_DELAY = 5.0   # seconds: the longest wait before a failed event is delivered again

Carrier = Callable[[dict[str, Any]], Awaitable[None]]


class CarrierTimeout(Exception):
    """The carrier did not answer within `carrier_timeout`: a failed booking."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPPING_")

    nats_url: str = "nats://127.0.0.1:4222"
    database: str = "shipping.db"
    ack_wait: float = Field(default=30.0, ge=0.5, le=3600)
    max_deliver: int = Field(default=5, ge=1, le=100)
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    backoff: float = Field(default=0.5, gt=0, le=MAX_NAK_DELAY)
    # A carrier that never answers would hold its slot for ever (in_progress() keeps the message
    # ours), and max_in_flight such calls would stop shipping for good.
    carrier_timeout: float = Field(default=30.0, gt=0, le=3600)


class OrderPlaced(BaseModel):
    type: Literal["OrderPlaced"]
    event_id: str = Field(min_length=1, max_length=128)
    order_id: str = Field(min_length=1, max_length=64)
    sku: str = Field(pattern=SKU_PATTERN)
    quantity: int = Field(ge=1, le=100)
    occurred_at: datetime


class Shipment(BaseModel):
    order_id: str
    sku: str
    quantity: int
    event_id: str


SCHEMA = """
CREATE TABLE IF NOT EXISTS shipments (
    event_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments (order_id);
"""


async def no_carrier(shipment: dict[str, Any]) -> None:
    """The default carrier books nothing; a deployment passes a real one."""


def streams() -> list[StreamConfig]:
    return [
        StreamConfig(name=STREAM, subjects=["orders.>"], storage=StorageType.FILE, discard=DiscardPolicy.OLD,
                     duplicate_window=120.0),
        StreamConfig(name=DEAD_STREAM, subjects=["dead.>"], storage=StorageType.FILE, duplicate_window=120.0),
    ]



# The client's events in this service's log, one line each (nats-py would log a traceback per error).
async def broker_error(error: Exception) -> None:
    logger.warning("broker: %r", error)


async def broker_disconnected() -> None:
    logger.warning("broker: disconnected; reconnecting")


async def broker_reconnected() -> None:
    logger.info("broker: reconnected")


@dataclass
class Consumer:
    db: aiosqlite.Connection
    settings: Settings
    carrier: Carrier
    nc: NATS | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Set by the client's first error: at startup, "the broker is not there" rather than "slow".
    unreachable: asyncio.Event = field(default_factory=asyncio.Event)
    # One lock per event being handled: two deliveries of one event never book it twice.
    locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=DURABLE, filter_subject=SUBJECT, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait,
            max_deliver=self.settings.max_deliver,
            # The broker hands out no more than we work on at once: back-pressure, not a pile in memory.
            max_ack_pending=self.settings.max_in_flight)

    async def subscribe(self) -> Any:
        if self.nc is None or self.nc.is_closed:
            self.nc = await nats.connect(self.settings.nats_url, connect_timeout=2, reconnect_time_wait=0.25,
                                         max_reconnect_attempts=-1, error_cb=self.broker_error,
                                         disconnected_cb=broker_disconnected, reconnected_cb=broker_reconnected)
        js = self.nc.jetstream()
        for config in streams():
            with contextlib.suppress(nats.js.errors.BadRequestError):  # it exists, with an operator's settings
                await js.add_stream(config)
        await js.add_consumer(STREAM, self.consumer_config())  # creates it, or updates its settings
        return await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)

    async def broker_error(self, error: Exception) -> None:
        self.unreachable.set()
        await broker_error(error)

    async def run(self, connecting: asyncio.Task[Any]) -> None:
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        delay = self.settings.backoff
        subscription, first = None, connecting  # the first attempt was begun at startup
        while True:
            try:
                if subscription is None:
                    attempt, first = first or asyncio.create_task(self.subscribe()), None
                    subscription = await attempt
                await slots.acquire()
                free = 1
                while free < self.settings.max_in_flight and not slots.locked():
                    await slots.acquire()
                    free += 1
                try:
                    messages = await subscription.fetch(free, timeout=1.0)
                except BaseException:
                    for _ in range(free):
                        slots.release()
                    raise
                for _ in range(free - len(messages)):
                    slots.release()
                for message in messages:
                    task = asyncio.create_task(self.handle(message, slots))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                delay = self.settings.backoff
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # nothing to do for now
            except Exception as error:
                # The consumer goes on whatever failed: a task that ends would stop shipping silently.
                if isinstance(error, (nats.errors.Error, OSError)):
                    logger.warning("consumer: %r; next try in %.2f s", error, delay)  # the broker is away
                else:
                    logger.exception("consumer failed; next try in %.2f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_NAK_DELAY)
                if self.nc is None or self.nc.is_closed:
                    subscription = None

    async def handle(self, message: Msg, slots: asyncio.Semaphore) -> None:
        try:
            await self.process(message)
        except Exception:  # the broker or the database failed us: nothing was acknowledged
            # The broker delivers it again after ack_wait; the event_id check makes that safe.
            logger.exception("event at stream sequence %s not settled", message.metadata.sequence.stream)
        finally:
            slots.release()

    async def process(self, message: Msg) -> None:
        try:
            event = OrderPlaced.model_validate_json(message.data)
        except ValidationError as error:
            # It will never succeed: retrying would only delay the events behind it.
            await self.dead_letter(message, f"invalid event: {error.error_count()} error(s)")
            return
        lock = self.locks.setdefault(event.event_id, asyncio.Lock())
        async with lock:
            if await self.already_shipped(event.event_id):
                await message.ack()  # a duplicate or a redelivery: the work is done, only say so
                return
            shipment = Shipment(order_id=event.order_id, sku=event.sku, quantity=event.quantity,
                                event_id=event.event_id)
            try:
                await self.book(message, shipment)
            except Exception as error:  # the carrier's failure, whatever it is
                await self.failed(message, error)
                return
            async with self.write_lock:
                # ON CONFLICT: another replica sharing this table may have recorded it meanwhile.
                await self.db.execute(
                    "INSERT INTO shipments (event_id, order_id, sku, quantity) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (event_id) DO NOTHING",
                    (shipment.event_id, shipment.order_id, shipment.sku, shipment.quantity))
                await self.db.commit()
            await message.ack()  # only now: the work is done and recorded

    async def book(self, message: Msg, shipment: Shipment) -> None:
        """Call the carrier, telling the broker now and then that the event is still being worked on."""
        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(self.settings.ack_wait / 3)
                await message.in_progress()

        heartbeat = asyncio.create_task(keep_alive())
        try:
            async with asyncio.timeout(self.settings.carrier_timeout):
                await self.carrier(shipment.model_dump())
        except TimeoutError as error:
            # The call is cancelled; the event is retried later, then dead-lettered, like any failure.
            raise CarrierTimeout(f"no answer from the carrier within {self.settings.carrier_timeout:g} s") from error
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, nats.errors.Error):
                await heartbeat

    async def already_shipped(self, event_id: str) -> bool:
        async with self.db.execute("SELECT 1 FROM shipments WHERE event_id = ?", (event_id,)) as cursor:
            return await cursor.fetchone() is not None

    async def failed(self, message: Msg, error: Exception) -> None:
        deliveries = message.metadata.num_delivered
        if deliveries >= self.settings.max_deliver:
            await self.dead_letter(message, f"carrier failed {deliveries} times: {error!r}"[:500])
            return
        delay = min(self.settings.backoff * 2 ** (deliveries - 1), MAX_NAK_DELAY)
        logger.warning("carrier failed (delivery %d of %d), again in %.2f s: %r",
                       deliveries, self.settings.max_deliver, delay, error)
        await message.nak(delay=delay)

    async def dead_letter(self, message: Msg, reason: str) -> None:
        """Store the message in the dead-letter stream, then stop its deliveries for good."""
        sequence = message.metadata.sequence.stream
        assert self.nc is not None
        await self.nc.jetstream().publish(
            DEAD_SUBJECT, message.data, stream=DEAD_STREAM,
            # Dead-lettering the same message twice (we failed before term) stores it once.
            headers={"Nats-Msg-Id": f"{STREAM}-{sequence}", "Dead-Reason": reason,
                     "Dead-Deliveries": str(message.metadata.num_delivered), "Dead-Stream-Sequence": str(sequence)})
        await message.term()
        logger.error("event at stream sequence %s dead-lettered: %s", sequence, reason)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self.nc.close()


def create_app(settings: Settings | None = None, *, carrier: Carrier | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with aiosqlite.connect(settings.database) as db:
            await db.executescript(SCHEMA)
            await db.commit()
            consumer = Consumer(db, settings, carrier or no_carrier)
            app.state.db = db
            # Streams and the durable consumer exist before the first request, however long that
            # takes on a busy machine; a broker that refuses the connection is not fatal: the same
            # attempt goes on in the background and the consumer starts once it succeeds.
            connecting = asyncio.create_task(consumer.subscribe())
            refused = asyncio.create_task(consumer.unreachable.wait())
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            if not connecting.done():
                logger.warning("broker unreachable at startup; consuming once it is back")
            task = asyncio.create_task(consumer.run(connecting), name="shipping-consumer")
            try:
                yield
            finally:
                while not task.done():  # a cancel that nats-py's connect swallows (Python 3.11) is repeated
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.5)
                await consumer.close()

    # Every error a problem (problems.py, given), the framework's own 404, 405 and 422 included.
    app = FastAPI(title="shipping", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "shipping"}

    @app.get("/shipments/{order_id}", responses=problem_responses(404))
    async def read_shipment(order_id: Annotated[str, Path(max_length=64)], request: Request) -> Shipment:
        async with request.app.state.db.execute(
                "SELECT order_id, sku, quantity, event_id FROM shipments WHERE order_id = ? LIMIT 1",
                (order_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No shipment for this order yet.")  # the id is in `instance`
        return Shipment(order_id=row[0], sku=row[1], quantity=row[2], event_id=row[3])

    return app
