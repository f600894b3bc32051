"""The orders service: places orders by reserving stock in the catalog, and announces them.

    uvicorn microshop.orders:create_app --factory --port 8003

The rule that keeps the system consistent: an order is stored only after the catalog has
reserved its stock, and if anything goes wrong after the reservation may have happened, the
reservation is released (a compensating action). The OrderPlaced event is written to an outbox
in the same transaction as the order, then delivered; undelivered events are retried, and an
event that users keeps refusing is set aside (dead-lettered) so that it blocks no other.
A release that fails is written down too and retried until the catalog confirms it.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Request, Response, Security, status
from opentelemetry import trace
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, String, delete, func, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    SERVICE_ONLY,
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
    """ORDERS_DATABASE_URL, ORDERS_CLIENT_SECRET, ORDERS_CATALOG_URL, ORDERS_USERS_URL, ...
    (prefix ORDERS_)."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    database_url: str = "sqlite+aiosqlite:///./orders.db"
    # Who this service is to users (client credentials): the token it gets for them opens the
    # internal routes of catalog and users. The secret is this service's own, never shared.
    client_id: str = Field("orders", min_length=1, max_length=64)
    client_secret: SecretStr = Field(min_length=32)
    jwks_refresh_seconds: float = Field(30.0, ge=0, le=3600)  # an unknown kid refetches, at most this often
    catalog_url: str = "http://127.0.0.1:8002"
    users_url: str = "http://127.0.0.1:8001"
    catalog_timeout: float = Field(2.0, gt=0, le=30)  # a deadline for each call, in seconds
    events_timeout: float = Field(2.0, gt=0, le=30)
    outbox_interval: float = Field(2.0, ge=0)  # retry undelivered events this often; 0: never
    # Refusals users may answer to one event before it is set aside: a poison event must not
    # be retried forever, nor hold up the events behind it.
    outbox_max_attempts: int = Field(5, ge=1, le=100)


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
    """An event waiting to be delivered. Written in the order's transaction, so an order
    never exists without its event, and an event never announces an order that does not."""

    __tablename__ = "outbox"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(default=0)  # deliveries that users refused
    last_error: Mapped[str | None] = mapped_column(String(200), default=None)
    # The dead letters: set aside after outbox_max_attempts refusals, kept for an operator.
    dead_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


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
    delivered: int  # events delivered by this pass
    pending: int  # events still waiting
    dead: int  # events set aside for good


class DeadEvent(BaseModel):
    event_id: str
    attempts: int
    last_error: str | None
    payload: dict[str, Any]


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
# The outbox: at-least-once delivery of events
# ---------------------------------------------------------------------------------------


# Answers that say "users is not taking anything right now", not "users refuses this event".
UNAVAILABLE = frozenset({408, 429, 502, 503, 504})


class ConsumerUnavailable(Exception):
    """users cannot take events now: nothing after this one would get through either."""


async def deliver(app: FastAPI, event: OutboxEvent) -> str | None:
    """Deliver one event. None when users acknowledged it, else why users refused it."""
    settings: Settings = app.state.settings
    try:
        async with asyncio.timeout(settings.events_timeout):
            reply = await app.state.users.post(
                "/events", json=event.payload, headers=outgoing_headers(), auth=app.state.credentials
            )
    except (TimeoutError, httpx.HTTPError) as exc:
        raise ConsumerUnavailable(type(exc).__name__) from None
    if reply.status_code in UNAVAILABLE:
        raise ConsumerUnavailable(str(reply.status_code))
    if reply.is_success:
        return None
    return f"{reply.status_code} {reply.text}"[:200]


async def retry_releases(app: FastAPI) -> None:
    async with app.state.sessions() as session:
        for order_id in list(await session.scalars(select(PendingRelease.order_id).order_by(PendingRelease.created_at))):
            if not await release_stock(app, order_id):
                break  # the catalog is still failing: the next pass tries again
            await session.execute(delete(PendingRelease).where(PendingRelease.order_id == order_id))
            await session.commit()
            logger.info("the release of order %s is confirmed", order_id)


async def deliver_events(app: FastAPI) -> DispatchOut:
    """Deliver pending events, oldest first. A delivery can succeed and still be retried (the
    reply was lost): consumers deduplicate.

    - users unavailable (no answer, or 408/429/502/503/504): stop this pass, count nothing; an
      outage is not the event's fault, and every later event would fail the same way;
    - users refuses the event (any other error): count an attempt, go on with the next event;
      after outbox_max_attempts refusals the event is dead: set aside, kept, never sent again.
    """
    settings: Settings = app.state.settings
    delivered = 0
    async with app.state.sessions() as session:
        pending = list(await session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.delivered_at.is_(None), OutboxEvent.dead_at.is_(None))
            .order_by(OutboxEvent.created_at)
        ))
        for event in pending:
            try:
                refused = await deliver(app, event)
            except ConsumerUnavailable as exc:
                logger.warning("users is unavailable (%s); the events left wait for the next pass", exc)
                break
            if refused is None:
                event.delivered_at = utcnow()
                delivered += 1
            else:
                event.attempts += 1
                event.last_error = refused
                if event.attempts >= settings.outbox_max_attempts:
                    event.dead_at = utcnow()
                    logger.error("event %s dead after %d refusals: %s", event.event_id, event.attempts, refused)
            await session.commit()
        count = select(func.count()).select_from(OutboxEvent)
        waiting = await session.scalar(count.where(OutboxEvent.delivered_at.is_(None), OutboxEvent.dead_at.is_(None)))
        dead = await session.scalar(count.where(OutboxEvent.dead_at.is_not(None)))
    return DispatchOut(delivered=delivered, pending=waiting or 0, dead=dead or 0)


async def dispatch_outbox(app: FastAPI) -> DispatchOut:
    """One pass: retry the unconfirmed releases, then deliver the pending events."""
    async with app.state.dispatch_lock:  # one dispatcher at a time: no event sent twice at once
        await retry_releases(app)
        return await deliver_events(app)


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
    try:
        session.add_all([order, OutboxEvent(event_id=event.event_id, payload=event.model_dump(mode="json"))])
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
    summary="Retry pending releases and deliver pending events now (not routed by the gateway)",
    dependencies=SERVICE_ONLY,
    responses=problem_responses(401, 503),
)
async def dispatch_now(request: Request) -> DispatchOut:
    return await dispatch_outbox(request.app)


@router.get(
    "/outbox/dead",
    tags=["internal"],
    summary="The dead letters: events set aside after too many refusals (not routed by the gateway)",
    dependencies=SERVICE_ONLY,
    responses=problem_responses(401, 503),
)
async def dead_letters(session: SessionDep) -> list[DeadEvent]:
    dead = await session.scalars(
        select(OutboxEvent).where(OutboxEvent.dead_at.is_not(None)).order_by(OutboxEvent.created_at)
    )
    return [
        DeadEvent(event_id=e.event_id, attempts=e.attempts, last_error=e.last_error, payload=e.payload) for e in dead
    ]


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
            retry = asyncio.create_task(dispatch_forever(app, settings.outbox_interval)) if settings.outbox_interval else None
            try:
                yield
            finally:
                if retry is not None:
                    retry.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await retry
                await catalog.aclose()
        await engine.dispose()

    app = FastAPI(title="orders", version="1.0.0", responses=problem_responses(422), lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="orders", tracer=tracer)
    app.include_router(health_router("orders"))
    app.include_router(router)
    return app
