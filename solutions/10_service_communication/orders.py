"""Orders service (lesson 10 reference): checks stock with inventory, publishes OrderPlaced.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes, the event's fields), not Python modules.
"""

import asyncio
import contextlib
import logging
import random
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import ProblemError, install_problem_details, problem_responses, unexpected_problem

logger = logging.getLogger("orders")

REQUEST_ID_HEADER = "x-request-id"
# What a request ID may look like: it is written into every log line, so nothing else gets in.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class Settings(BaseSettings):
    """Where inventory lives and how patiently to call it; ORDERS_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    inventory_url: str = "http://127.0.0.1:8001"  # service discovery by environment
    events_url: str | None = None  # set: publish events by POSTing them there
    timeout: float = Field(default=2.0, gt=0, le=60)  # seconds for a request's calls, retries included
    retries: int = Field(default=2, ge=0, le=10)  # extra attempts, for idempotent calls only
    backoff: float = Field(default=0.05, ge=0, le=10)  # first delay; it doubles on each retry


# --- Calling another service ----------------------------------------------------------------

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})
RETRY_AFTER_SECONDS = 1  # what our own 503 asks for: a restarting service is usually back by then

# The problem types of this service's own errors (README.md names them); `service` says which
# service failed, so a client behind a gateway knows which hop it was.
PROBLEMS = "https://course.example/problems/"
UPSTREAM_PROBLEMS = {
    502: ("bad-upstream", "Bad answer from an upstream service", "The {service} service answered with an error."),
    503: ("upstream-unavailable", "Upstream service unavailable", "The {service} service cannot be reached; try again later."),
    504: ("upstream-timeout", "Upstream service timed out", "The {service} service did not answer in time."),
}


class UpstreamError(ProblemError):
    """Another service failed us: unreachable (503), too slow (504) or a bad answer (502)."""

    def __init__(self, status_code: int, service: str) -> None:
        slug, title, detail = UPSTREAM_PROBLEMS[status_code]
        # A 503 tells its caller when to try again, so that retries do not come back at once.
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status_code == 503 else {}
        super().__init__(status_code, detail.format(service=service), type=PROBLEMS + slug, title=title,
                         headers=headers, service=service)
        self.status_code = status_code


def backoff_delay(backoff: float, attempt: int) -> float:
    """Exponential backoff with jitter: between 1 and 1.5 times backoff * 2**(attempt-1), so that
    many callers that failed together do not all retry at the same instant."""
    return backoff * 2 ** (attempt - 1) * (1 + random.random() / 2)


def retry_after(outcome: "httpx.Response | UpstreamError") -> float:
    """The seconds a 503 (or 429) asks its caller to wait before trying again: its Retry-After,
    in seconds or as an HTTP date; 0 when there is none or it makes no sense."""
    if not isinstance(outcome, httpx.Response) or outcome.status_code not in (429, 503):
        return 0.0
    value = outcome.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:  # "²".isdigit() too, and float("²") raises
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


async def call_upstream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    retries: int,
    backoff: float,
    deadline: float,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request; retry transient failures of idempotent methods only, all before `deadline`.

    `deadline` is a time of the event loop's clock: one budget for every attempt and every wait
    between them, so retries can never stretch the call beyond what the caller will wait. (A
    client timeout alone bounds each read, not the call: a server that sends a byte a second
    never trips it.) A POST that timed out may have been carried out: it is not retried.
    """
    loop = asyncio.get_running_loop()
    attempts = 1 + (retries if method.upper() in IDEMPOTENT_METHODS else 0)
    outcome: httpx.Response | UpstreamError = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, service)
    for attempt in range(attempts):
        if attempt:
            # The service may say how long it needs (Retry-After): never come back sooner.
            delay = max(backoff_delay(backoff, attempt), retry_after(outcome))
            if loop.time() + delay >= deadline:
                break  # no time left to wait and try again
            await asyncio.sleep(delay)
        if loop.time() >= deadline:
            break  # the caller has stopped waiting: do not even start
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await client.request(method, url, **kwargs)
        except (httpx.TimeoutException, TimeoutError):
            outcome = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, service)
        except httpx.TransportError:  # refused, reset, unknown host ...
            outcome = UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, service)
        except httpx.DecodingError:
            # An answer that cannot be read (a body that is not the gzip its Content-Encoding says):
            # a broken answer, like a 500, not a transient failure. Not an httpx.TransportError.
            raise UpstreamError(status.HTTP_502_BAD_GATEWAY, service) from None
        if isinstance(outcome, httpx.Response) and outcome.status_code not in RETRYABLE_STATUS:
            return outcome
        logger.warning("%s %s to %s failed (attempt %d of %d): %s", method, url, service, attempt + 1, attempts,
                       outcome.status_code if isinstance(outcome, httpx.Response) else outcome)
    if isinstance(outcome, httpx.Response):
        return outcome
    raise outcome


async def _send_request_id(request: httpx.Request) -> None:
    # An httpx event hook: every call made while handling a request carries its id.
    if request_id := request_id_var.get():
        request.headers["X-Request-ID"] = request_id


class RequestIdMiddleware:
    """Reuse the caller's X-Request-ID when it is well formed, else create one; expose it to
    upstream calls and responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if not started:
                # A bug's 500 is answered here, through send_with_id, so that it carries the request
                # ID too: Starlette's ServerErrorMiddleware, which would answer it otherwise, runs
                # outside every middleware of ours. Then re-raised: the server logs the traceback.
                response = await unexpected_problem(Request(scope), exc)
                await response(scope, receive, send_with_id)
            raise
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


class EventRejected(Exception):
    """The consumer answered 4xx: this event will never be accepted, however often it is sent."""


class ConsumerBusy(Exception):
    """The consumer is down or busy (5xx, 429): the event is published again later."""


class HttpBroker:
    """Publishes by POSTing each event to a consumer's endpoint; one attempt per publish.

    The outbox retries a failed publish. A retry after a lost answer delivers the event twice:
    delivery is at-least-once, and the consumer makes that safe by ignoring an event_id it has
    already applied.
    """

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client, self._url = client, url

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        raise NotImplementedError("HttpBroker only publishes; consumers expose an HTTP endpoint")

    async def publish(self, topic: str, event: dict[str, Any]) -> None:
        response = await self._client.post(self._url, json=event)
        if response.status_code == status.HTTP_429_TOO_MANY_REQUESTS or response.status_code >= 500:
            raise ConsumerBusy(f"event consumer busy ({response.status_code})")
        if response.is_error:
            raise EventRejected(f"event consumer refused {event['event_id']} ({response.status_code})")


class Outbox:
    """Events waiting to be published, and the loop (`relay`) that publishes them.

    Placing an order only stores the order and puts its event here, with no await in between:
    the order and its event exist together or not at all, and the answer goes out at once. The
    relay then publishes each event until the broker takes it, backing off between attempts, so
    a consumer that is down for a while delays the event instead of losing it. (Here the outbox
    lives in memory; a service with a database writes it in the same transaction as the order,
    so that it survives a restart too.)
    """

    def __init__(self, broker: Broker, *, backoff: float, max_delay: float = 5.0) -> None:
        self._broker, self._backoff, self._max_delay = broker, max(backoff, 0.01), max_delay
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], str]] = asyncio.Queue()

    def add(self, topic: str, event: dict[str, Any]) -> None:
        self._queue.put_nowait((topic, event, request_id_var.get()))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def relay(self) -> None:
        while True:
            topic, event, request_id = await self._queue.get()
            request_id_var.set(request_id)  # the event's calls carry the id of the request that caused it
            attempt = 0
            while True:
                try:
                    await self._broker.publish(topic, event)
                    break
                except EventRejected:
                    logger.error("event %s rejected by its consumer; set aside, not retried", event["event_id"])
                    break
                except Exception:  # down, busy, a handler's bug: keep the event and try again later
                    attempt += 1
                    delay = min(self._max_delay, backoff_delay(self._backoff, attempt))
                    logger.warning("publishing %s failed (attempt %d); again in %.2f s", event["event_id"], attempt, delay,
                                   exc_info=True)
                    await asyncio.sleep(delay)
            self._queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Give the events still waiting up to `timeout` seconds to leave (at shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()


# --- The API ------------------------------------------------------------------------------------


class OrderIn(BaseModel):
    # One plain URL segment: the SKU goes into inventory's path, where "..", "a/b" or "%2F"
    # would name another route. Letters, digits and - _ . ~, no leading dot.
    sku: str = Field(pattern=r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}$")
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
                HttpBroker(client, settings.events_url) if settings.events_url else InProcessBroker()
            )
            outbox = Outbox(publisher, backoff=settings.backoff)
            relay = asyncio.create_task(outbox.relay())
            try:
                yield {"inventory": client, "outbox": outbox, "orders": {}}
            finally:
                await outbox.drain(settings.timeout)
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
                if outbox.pending:
                    logger.error("%d events were never published (the in-memory outbox ends here)", outbox.pending)

    # Every error is a problem (problems.py, given): FastAPI's 422 without the refused input (an
    # infinite or NaN number in the JSON would make it a 500), an UpstreamError as its own type.
    app = FastAPI(title="Orders", version="1.0.0", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "orders"}

    @app.post(
        "/orders",
        status_code=status.HTTP_201_CREATED,
        responses=problem_responses(400, 409, 422, 502, 503, 504),
    )
    async def place_order(
        order_in: OrderIn,
        request: Request,
        response: Response,
        x_timeout_ms: Annotated[int | None, Header(ge=0, le=3_600_000, description="How long the caller still waits")] = None,
    ) -> Order:
        loop = asyncio.get_running_loop()
        # One deadline for this request: our own budget, or less when the caller will not wait that long.
        budget = settings.timeout if x_timeout_ms is None else min(settings.timeout, x_timeout_ms / 1000)
        deadline = loop.time() + budget
        stock = await call_upstream(
            request.state.inventory, "GET", f"/stock/{quote(order_in.sku, safe='')}",
            service="inventory", retries=settings.retries, backoff=settings.backoff, deadline=deadline,
        )
        if stock.status_code == status.HTTP_404_NOT_FOUND:
            raise ProblemError(status.HTTP_422_UNPROCESSABLE_CONTENT, "Inventory knows no SKU of this name.",
                               type=PROBLEMS + "unknown-sku", title="Unknown SKU")
        try:
            stock.raise_for_status()
            available = stock.json()["available"]
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError, RecursionError):  # deep nesting: RecursionError
            raise UpstreamError(status.HTTP_502_BAD_GATEWAY, "inventory") from None
        if type(available) is not int or available < 0:  # not 10.5, "10", true, Infinity (int() of it raises) or -1
            raise UpstreamError(status.HTTP_502_BAD_GATEWAY, "inventory")
        if available < order_in.quantity:
            raise ProblemError(status.HTTP_409_CONFLICT, "Fewer are in stock than were ordered.",
                               type=PROBLEMS + "out-of-stock", title="Not enough stock", available=available)
        if loop.time() >= deadline:
            # The caller has stopped waiting and has been told the order failed: placing it now
            # would do what it believes did not happen, and its retry would order twice.
            raise UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, "inventory")

        # The commit: no await from the deadline check to the answer, so nothing can slip past it.
        order = Order(id=uuid.uuid4().hex, sku=order_in.sku, quantity=order_in.quantity)
        request.state.orders[order.id] = order
        request.state.outbox.add("OrderPlaced", {
            "type": "OrderPlaced",
            "event_id": uuid.uuid4().hex,  # what a consumer deduplicates on
            "order_id": order.id,
            "sku": order.sku,
            "quantity": order.quantity,
            "occurred_at": datetime.now(timezone.utc).isoformat(),
        })
        response.headers["Location"] = f"/orders/{order.id}"
        return order

    @app.get("/orders/{order_id}", responses=problem_responses(404))
    async def read_order(order_id: str, request: Request) -> Order:
        order = request.state.orders.get(order_id)
        if order is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No order has this id.")
        return order

    return app
