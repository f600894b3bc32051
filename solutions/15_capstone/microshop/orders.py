"""The orders service: places orders by reserving stock in the catalog, and announces them.

    uvicorn microshop.orders:create_app --factory --port 8003

The rule that keeps the system consistent: an order is stored only after the catalog has
reserved its stock, and if anything goes wrong after the reservation may have happened, the
reservation is released (a compensating action). The OrderPlaced event is written to an outbox
in the same transaction as the order, then published to the broker (NATS JetStream); a row is
marked published only once JetStream has acknowledged storing the event, so the broker being
down loses nothing: the events wait in the outbox and are published when it is back. A publish
repeated after a lost acknowledgement carries the same Nats-Msg-Id, and the stream stores it once.
A release that fails is written down too and retried until the catalog confirms it.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import httpx
import nats.errors
from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Request, Response, Security, status
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, String, delete, func, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    ORDER_PLACED_SUBJECT,
    ORDERS_STREAM,
    PROPAGATOR,
    SERVICE_ONLY,
    Broker,
    BrokerUnavailable,
    OrderPlaced,
    Principal,
    RequestContextMiddleware,
    SessionDep,
    UTCDateTime,
    create_engine,
    current_principal,
    health_router,
    PublicKeys,
    ServiceCredentials,
    jwks_from,
    outgoing_headers,
    service_client,
    service_tracer,
    utcnow,
)
from .problems import PROBLEM_JSON, ProblemError, install_problem_details, problem_responses

logger = logging.getLogger("microshop.orders")


class Settings(BaseSettings):
    """ORDERS_DATABASE_URL, ORDERS_CLIENT_SECRET, ORDERS_CATALOG_URL, ORDERS_USERS_URL,
    ORDERS_NATS_URL, ... (prefix ORDERS_)."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    database_url: str = "sqlite+aiosqlite:///./orders.db"
    # Who this service is to users (client credentials): the token it gets for them opens the
    # internal routes of catalog and users. The secret is this service's own, never shared.
    client_id: str = Field("orders", min_length=1, max_length=64)
    client_secret: SecretStr = Field(min_length=32)
    jwks_refresh_seconds: float = Field(30.0, ge=0, le=3600)  # an unknown kid refetches, at most this often
    catalog_url: str = "http://127.0.0.1:8002"
    users_url: str = "http://127.0.0.1:8001"
    nats_url: str = "nats://127.0.0.1:4222"  # the broker the events go through
    catalog_timeout: float = Field(2.0, gt=0, le=30)  # a deadline for each call, in seconds
    # A deadline for JetStream's acknowledgement of one publish, and for each call to users.
    events_timeout: float = Field(2.0, gt=0, le=30)
    outbox_interval: float = Field(2.0, ge=0)  # retry unpublished events this often; 0: never


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16))
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    total_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxEvent(Base):
    """An event waiting to be published. Written in the order's transaction, so an order
    never exists without its event, and an event never announces an order that does not."""

    __tablename__ = "outbox"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The trace of the request that placed the order (its `traceparent`): the publish, and the
    # consumer's work in users, continue that trace however much later they happen.
    trace_context: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class PendingRelease(Base):
    """A compensation the catalog has not confirmed yet: retried until it does."""

    __tablename__ = "pending_releases"

    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---------------------------------------------------------------------------------------
# The HTTP contract
# ---------------------------------------------------------------------------------------


class Line(BaseModel):
    sku: Annotated[str, Field(pattern=r"^[A-Z0-9-]{3,20}$")]
    quantity: Annotated[int, Field(ge=1, le=100)]


class OrderIn(BaseModel):
    items: Annotated[list[Line], Field(min_length=1, max_length=20)]


class OrderLine(Line):
    price_cents: int


class Reservation(BaseModel):
    """What the catalog answers to a reservation: read as data, never trusted to have the shape."""

    items: Annotated[list[OrderLine], Field(min_length=1, max_length=20)]
    total_cents: Annotated[int, Field(ge=0, le=2**53)]


class OrderOut(BaseModel):
    id: str
    username: str
    status: str
    items: list[OrderLine]
    total_cents: int
    created_at: datetime


class DispatchOut(BaseModel):
    published: int  # events JetStream stored during this pass
    pending: int  # events still waiting in the outbox


def order_out(order: Order) -> OrderOut:
    return OrderOut(
        id=order.id,
        username=order.username,
        status=order.status,
        items=[OrderLine(**line) for line in order.items],
        total_cents=order.total_cents,
        created_at=order.created_at,
    )


# ---------------------------------------------------------------------------------------
# Talking to the catalog: a deadline on every call, and compensation when in doubt
# ---------------------------------------------------------------------------------------


def upstream_failed(status_code: int, detail: str) -> ProblemError:
    """503: the catalog cannot be reached; 504: it did not answer in time; 502: it failed."""
    return ProblemError(status_code, detail, headers={"Retry-After": "1"})


def upstream_detail(reply: httpx.Response) -> str | None:
    """The `detail` of the catalog's problem, when its answer is one."""
    if reply.headers.get("content-type", "").split(";")[0].strip() != PROBLEM_JSON:
        return None
    try:
        detail = reply.json().get("detail")
    except (ValueError, AttributeError):
        return None
    return detail if isinstance(detail, str) else None


async def release_stock(app: FastAPI, order_id: str) -> bool:
    """Undo a reservation that may exist (safe when none does). True once the catalog confirms."""
    settings: Settings = app.state.settings
    try:
        async with asyncio.timeout(settings.catalog_timeout):
            reply = await app.state.catalog.delete(f"/reservations/{order_id}", headers=outgoing_headers())
        return reply.is_success
    except (TimeoutError, httpx.HTTPError):
        return False


async def compensate(app: FastAPI, order_id: str) -> None:
    """Release now; when the catalog cannot confirm it, write the release down for the dispatcher.

    Not a retry loop inside the request: the catalog that just failed is likely to fail again
    for a while, the customer would wait for nothing, and a loop dies with the process. A row
    in this service's database outlives both, and every dispatch pass retries it (a release is
    idempotent, so retrying one that did arrive changes nothing).
    """
    if await release_stock(app, order_id):
        return
    logger.warning("the release of order %s is not confirmed; it will be retried", order_id)
    try:
        async with app.state.sessions() as session, session.begin():
            await session.execute(
                insert(PendingRelease).values(order_id=order_id, created_at=utcnow()).on_conflict_do_nothing()
            )
    except SQLAlchemyError:
        logger.exception("could not record the pending release of order %s: release it by hand", order_id)


async def reserve_stock(app: FastAPI, order_id: str, items: list[Line]) -> dict[str, Any]:
    settings: Settings = app.state.settings
    payload = {"order_id": order_id, "items": [line.model_dump() for line in items]}
    try:
        # httpx's timeouts bound each phase (connect, each read...); asyncio.timeout bounds the
        # whole call, whatever the transport does.
        async with asyncio.timeout(settings.catalog_timeout):
            reply = await app.state.catalog.post("/reservations", json=payload, headers=outgoing_headers())
    except httpx.ConnectError:
        # Nothing reached the catalog: nothing to undo.
        raise upstream_failed(status.HTTP_503_SERVICE_UNAVAILABLE, "the catalog is unavailable; no order was placed") from None
    except (TimeoutError, httpx.TimeoutException):
        # The request may have arrived and the stock may be reserved: undo, then report.
        await compensate(app, order_id)
        raise upstream_failed(status.HTTP_504_GATEWAY_TIMEOUT, "the catalog did not answer in time; no order was placed") from None
    except httpx.TransportError:
        # The connection broke half-way (reset, protocol error): the same doubt, so release too.
        await compensate(app, order_id)
        raise upstream_failed(status.HTTP_503_SERVICE_UNAVAILABLE, "the catalog connection failed; no order was placed") from None
    if reply.status_code in (status.HTTP_200_OK, status.HTTP_201_CREATED):
        try:
            return Reservation.model_validate_json(reply.content).model_dump()
        except ValueError:
            # Reserved, but not in a shape we can store: undo it rather than answer a 500.
            await compensate(app, order_id)
            raise upstream_failed(status.HTTP_502_BAD_GATEWAY, "the catalog answered nonsense; no order was placed") from None
    detail = upstream_detail(reply)
    if reply.status_code == status.HTTP_404_NOT_FOUND:
        # From the customer's side the order is invalid: a 422 shaped like every other 422.
        where = {"loc": ["body", "items"], "msg": detail or "unknown product", "type": "unknown_product"}
        raise ProblemError(status.HTTP_422_UNPROCESSABLE_CONTENT, "The order names a product the catalog does not have.",
                           errors=[where])
    if reply.status_code == status.HTTP_409_CONFLICT:
        raise ProblemError(status.HTTP_409_CONFLICT, detail or "Too little stock for this order.")
    # A 5xx (or anything unexpected): the catalog may have reserved before failing.
    await compensate(app, order_id)
    raise upstream_failed(status.HTTP_502_BAD_GATEWAY, "the catalog failed; no order was placed")


# ---------------------------------------------------------------------------------------
# The outbox: at-least-once publication of events to JetStream
# ---------------------------------------------------------------------------------------


async def publish(app: FastAPI, event: OutboxEvent) -> None:
    """Publish one event; return once JetStream has stored it (its acknowledgement came back).

    The Nats-Msg-Id is the event's own ID: when the acknowledgement is lost (a timeout, a crash
    before the row is marked), the next pass publishes the event again, and the stream, which
    remembers the IDs of its duplicate window, stores it once.
    """
    settings: Settings = app.state.settings
    js = await app.state.broker.jetstream()
    headers = {"Nats-Msg-Id": event.event_id}
    # The publish continues the trace of the request that placed the order, and hands it on.
    parent = PROPAGATOR.extract(event.trace_context or {})
    with app.state.tracer.start_as_current_span(f"{ORDER_PLACED_SUBJECT} publish", context=parent, kind=SpanKind.PRODUCER):
        PROPAGATOR.inject(headers)
        await js.publish(ORDER_PLACED_SUBJECT, json.dumps(event.payload).encode(), timeout=settings.events_timeout, stream=ORDERS_STREAM,
                         headers=headers)


async def retry_releases(app: FastAPI) -> None:
    async with app.state.sessions() as session:
        for order_id in list(await session.scalars(select(PendingRelease.order_id).order_by(PendingRelease.created_at))):
            if not await release_stock(app, order_id):
                break  # the catalog is still failing: the next pass tries again
            await session.execute(delete(PendingRelease).where(PendingRelease.order_id == order_id))
            await session.commit()
            logger.info("the release of order %s is confirmed", order_id)


async def publish_events(app: FastAPI) -> DispatchOut:
    """Publish the pending events, oldest first; mark each published once JetStream stored it.

    The broker unreachable, slow or failing: stop this pass and keep every event left (nothing
    is counted against an event: the broker stores any event it can take, so a failure is
    never the event's fault). The next pass, or the periodic one, tries again.
    """
    broker: Broker = app.state.broker
    published = 0
    async with app.state.sessions() as session:
        pending = list(await session.scalars(
            select(OutboxEvent).where(OutboxEvent.published_at.is_(None)).order_by(OutboxEvent.created_at)
        ))
        for event in pending:
            try:
                await publish(app, event)
            except nats.errors.NoRespondersError:
                broker.streams_missing()  # no stream takes the subject: create it on the next pass
                logger.warning("no stream stores %s; the events wait for the next pass", ORDER_PLACED_SUBJECT)
                break
            except (BrokerUnavailable, nats.errors.Error, OSError) as exc:
                logger.warning("the broker did not store event %s (%r); the events left wait", event.event_id, exc)
                break
            event.published_at = utcnow()  # only now: JetStream has it
            await session.commit()
            published += 1
        waiting = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    return DispatchOut(published=published, pending=waiting or 0)


async def dispatch_outbox(app: FastAPI) -> DispatchOut:
    """One pass: retry the unconfirmed releases, then publish the pending events."""
    async with app.state.dispatch_lock:  # one dispatcher at a time: events published in order
        await retry_releases(app)
        return await publish_events(app)


async def dispatch_forever(app: FastAPI, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await dispatch_outbox(app)
        except Exception:  # whatever one pass met, the next pass must still run
            logger.exception("outbox dispatch failed")


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------

router = APIRouter()


@router.post(
    "/orders", status_code=status.HTTP_201_CREATED, tags=["orders"], responses=problem_responses(400, 401, 403, 409, 502, 503, 504)
)
async def place_order(
    body: OrderIn,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    session: SessionDep,
    principal: Annotated[Principal, Security(current_principal, scopes=["orders:write"])],
) -> OrderOut:
    app: FastAPI = request.app
    order_id = uuid.uuid4().hex  # chosen here, so every retry and the compensation name the same order
    reservation = await reserve_stock(app, order_id, body.items)
    order = Order(
        id=order_id,
        username=principal.username,
        status="placed",
        items=reservation["items"],
        total_cents=reservation["total_cents"],
        created_at=utcnow(),
    )
    event = OrderPlaced(
        event_id=uuid.uuid4().hex,
        order_id=order_id,
        username=principal.username,
        total_cents=order.total_cents,
        occurred_at=order.created_at,
    )
    trace_context: dict[str, str] = {}
    PROPAGATOR.inject(trace_context)  # this request's traceparent, kept with the event
    try:
        session.add_all([order, OutboxEvent(event_id=event.event_id, payload=event.model_dump(mode="json"),
                                            trace_context=trace_context)])
        await session.commit()
    except SQLAlchemyError:
        await session.rollback()
        await compensate(app, order_id)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the order could not be stored; its stock was released"
        ) from None
    background.add_task(dispatch_outbox, app)  # after the response: the client does not wait for it
    response.headers["Location"] = f"/orders/{order_id}"
    return order_out(order)


@router.get("/orders", tags=["orders"], responses=problem_responses(401, 403, 503))
async def list_orders(
    session: SessionDep,
    principal: Annotated[Principal, Security(current_principal, scopes=["orders:read"])],
) -> list[OrderOut]:
    orders = await session.scalars(
        select(Order).where(Order.username == principal.username).order_by(Order.created_at.desc())
    )
    return [order_out(order) for order in orders]


@router.get("/orders/{order_id}", tags=["orders"], responses=problem_responses(401, 403, 404, 503))
async def read_order(
    order_id: str,
    session: SessionDep,
    principal: Annotated[Principal, Security(current_principal, scopes=["orders:read"])],
) -> OrderOut:
    order = await session.get(Order, order_id)
    if order is None or order.username != principal.username:  # someone else's order does not exist for you
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"order {order_id} not found")
    return order_out(order)


@router.post(
    "/outbox/dispatch",
    tags=["internal"],
    summary="Retry pending releases and publish pending events now (not routed by the gateway)",
    dependencies=SERVICE_ONLY,
    responses=problem_responses(401, 503),
)
async def dispatch_now(request: Request) -> DispatchOut:
    return await dispatch_outbox(request.app)


# ---------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    catalog_transport: httpx.AsyncBaseTransport | None = None,
    users_transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the orders service. The transports replace the network (tests wire the other
    services in with httpx.ASGITransport); without them, the URLs in the settings are used.
    The app's spans come from `tracer_provider` (tests pass one with an in-memory exporter)."""
    settings = settings or Settings()
    tracer = service_tracer("orders", tracer_provider)
    engine = create_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        # Both clients carry the request's trace: catalog's and users' spans join this one's.
        async with service_client(tracer, settings.users_url, users_transport, timeout=settings.events_timeout) as users:
            # Every call to the catalog is to an internal route: each carries this service's token.
            credentials = ServiceCredentials(users, settings.client_id, settings.client_secret.get_secret_value())
            catalog = service_client(
                tracer, settings.catalog_url, catalog_transport, timeout=settings.catalog_timeout, auth=credentials
            )
            app.state.catalog, app.state.users, app.state.credentials = catalog, users, credentials
            app.state.public_keys = PublicKeys(jwks_from(users, settings.events_timeout), settings.jwks_refresh_seconds)
            app.state.dispatch_lock = asyncio.Lock()  # one dispatcher at a time keeps events in order
            # The broker down is no reason not to start: orders are taken, their events wait.
            app.state.broker = broker = Broker(settings.nats_url, "orders")
            await broker.start()
            retry = asyncio.create_task(dispatch_forever(app, settings.outbox_interval)) if settings.outbox_interval else None
            try:
                yield
            finally:
                if retry is not None:
                    retry.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await retry
                await broker.close()
                await catalog.aclose()
        await engine.dispose()

    app = FastAPI(title="orders", version="1.0.0", responses=problem_responses(422), lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.tracer = tracer
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="orders", tracer=tracer)
    app.include_router(health_router("orders"))
    app.include_router(router)
    return app
