"""Orders service (lesson 10 reference): checks stock with inventory, publishes OrderPlaced.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes, the event's fields), not Python modules.
"""

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("orders")

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class Settings(BaseSettings):
    """Where inventory lives and how patiently to call it; ORDERS_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    inventory_url: str = "http://127.0.0.1:8001"  # service discovery by environment
    events_url: str | None = None  # set: publish events by POSTing them there
    timeout: float = Field(default=2.0, gt=0)  # seconds, for every phase of a call
    retries: int = Field(default=2, ge=0)  # extra attempts, for idempotent calls only
    backoff: float = Field(default=0.05, ge=0)  # first delay; it doubles on each retry


# --- Calling another service ----------------------------------------------------------------

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})


class UpstreamError(Exception):
    """The upstream could not be reached (503) or did not answer in time (504)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


async def call_upstream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    retries: int,
    backoff: float,
    idempotent: bool | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request; retry transient failures only when sending it twice is harmless.

    A POST that timed out may have been carried out: repeating it could place an order twice.
    So unless the caller vouches for it (`idempotent=True`, e.g. an event with an id the
    consumer deduplicates), only idempotent methods are retried.
    """
    safe = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
    attempts = 1 + (retries if safe else 0)
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))  # exponential backoff
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TimeoutException:
            error = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, f"{service} service timed out")
        except httpx.TransportError:  # refused, reset, unknown host ...
            error = UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, f"{service} service unavailable")
        else:
            if response.status_code not in RETRYABLE_STATUS or attempt == attempts - 1:
                return response
            continue
        logger.warning("%s %s to %s failed (attempt %d of %d): %s", method, url, service, attempt + 1, attempts, error)
        if attempt == attempts - 1:
            raise error
    raise AssertionError("unreachable")  # pragma: no cover


async def _send_request_id(request: httpx.Request) -> None:
    # An httpx event hook: every call made while handling a request carries its id.
    if request_id := request_id_var.get():
        request.headers["X-Request-ID"] = request_id


class RequestIdMiddleware:
    """Reuse the caller's X-Request-ID or create one; expose it to upstream calls and responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming[:128] or uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


# --- Events ------------------------------------------------------------------------------------


class Broker(Protocol):
    def subscribe(self, topic: str, handler: EventHandler) -> None: ...

    async def publish(self, topic: str, event: dict[str, Any]) -> None: ...


class InProcessBroker:
    """The default broker: hands each event to the handlers subscribed in this process.

    Enough for one process and for tests. Across processes the same interface is implemented
    on a real broker (RabbitMQ, Redis streams, Kafka) or, as HttpBroker does, over HTTP.
    """

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[EventHandler]] = defaultdict(list)

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        self._handlers[topic].append(handler)

    async def publish(self, topic: str, event: dict[str, Any]) -> None:
        for handler in list(self._handlers[topic]):
            await handler(event)


class HttpBroker:
    """Publishes by POSTing each event to a consumer's endpoint, retrying until it is accepted.

    A retry after a lost answer delivers the event twice: delivery is at-least-once, and the
    consumer makes that safe by ignoring an event_id it has already applied.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, *, retries: int, backoff: float) -> None:
        self._client, self._url, self._retries, self._backoff = client, url, retries, backoff

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        raise NotImplementedError("HttpBroker only publishes; consumers expose an HTTP endpoint")

    async def publish(self, topic: str, event: dict[str, Any]) -> None:
        response = await call_upstream(
            self._client, "POST", self._url, json=event, service="event", idempotent=True,
            retries=self._retries, backoff=self._backoff,
        )
        if response.is_error:
            raise UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, f"event consumer refused it ({response.status_code})")


# --- The API ------------------------------------------------------------------------------------


class OrderIn(BaseModel):
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=100)


class Order(BaseModel):
    id: str
    sku: str
    quantity: int
    status: Literal["placed"] = "placed"


def create_app(
    settings: Settings | None = None,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    broker: Broker | None = None,
) -> FastAPI:
    """An orders service. Tests inject `upstream_transport` (to reach inventory in-process, or
    to simulate failures) and `broker` (to connect an in-process consumer)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # One client for the app's whole life: it keeps connections open between calls (a new
        # client per request pays a TCP handshake every time) and is closed at shutdown.
        async with httpx.AsyncClient(
            base_url=settings.inventory_url,
            timeout=httpx.Timeout(settings.timeout),
            transport=upstream_transport,
            event_hooks={"request": [_send_request_id]},
        ) as client:
            publisher: Broker = broker or (
                HttpBroker(client, settings.events_url, retries=settings.retries, backoff=settings.backoff)
                if settings.events_url
                else InProcessBroker()
            )
            yield {"inventory": client, "broker": publisher, "orders": {}}

    app = FastAPI(title="Orders", version="1.0.0", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(UpstreamError)
    async def upstream_failed(request: Request, exc: UpstreamError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "orders"}

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def place_order(order_in: OrderIn, request: Request, response: Response) -> Order:
        stock = await call_upstream(
            request.state.inventory, "GET", f"/stock/{quote(order_in.sku, safe='')}",
            service="inventory", retries=settings.retries, backoff=settings.backoff,
        )
        if stock.status_code == status.HTTP_404_NOT_FOUND:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"Unknown SKU {order_in.sku}")
        try:
            stock.raise_for_status()
            available = int(stock.json()["available"])
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError):
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, "inventory service failed") from None
        if available < order_in.quantity:
            raise HTTPException(status.HTTP_409_CONFLICT, f"Not enough stock for {order_in.sku}: {available} available")

        order = Order(id=uuid.uuid4().hex, sku=order_in.sku, quantity=order_in.quantity)
        orders: dict[str, Order] = request.state.orders
        orders[order.id] = order
        event = {
            "type": "OrderPlaced",
            "event_id": uuid.uuid4().hex,  # what a consumer deduplicates on
            "order_id": order.id,
            "sku": order.sku,
            "quantity": order.quantity,
            "occurred_at": datetime.now(timezone.utc).isoformat(),
        }
        try:
            await request.state.broker.publish("OrderPlaced", event)
        except UpstreamError:
            # Without the event inventory never hears of the order: undo it. (The outbox pattern
            # in the lesson removes this gap between storing and publishing.)
            del orders[order.id]
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "could not publish OrderPlaced") from None
        response.headers["Location"] = f"/orders/{order.id}"
        return order

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, request: Request) -> Order:
        order = request.state.orders.get(order_id)
        if order is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"Order {order_id} not found")
        return order

    return app
