"""Inventory service (lesson 10 reference): owns the stock, consumes OrderPlaced events.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes, the event's fields), not Python modules.
"""

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Literal, Protocol

from fastapi import FastAPI, HTTPException, Request, status
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import install_problem_details, problem_responses, unexpected_problem

logger = logging.getLogger("inventory")

DEFAULT_STOCK: dict[str, int] = {"widget": 10, "gadget": 3, "gizmo": 0}
REQUEST_ID_HEADER = "x-request-id"
# What a request ID may look like: it is written into every log line, so nothing else gets in.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class Subscribable(Protocol):
    """The one thing inventory needs from a broker: to be told about events."""

    def subscribe(self, topic: str, handler: EventHandler) -> None: ...


class RequestIdMiddleware:
    """Reuse the caller's X-Request-ID when it is well formed, else create one; put it in every response."""

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


class Stock(BaseModel):
    sku: str
    available: int


class OrderPlaced(BaseModel):
    """The event contract, as inventory reads it (orders has its own copy of the same shape)."""

    type: Literal["OrderPlaced"] = "OrderPlaced"
    event_id: str = Field(min_length=1)
    order_id: str
    sku: str
    quantity: int = Field(ge=1)


class EventReceipt(BaseModel):
    event_id: str
    applied: bool


class Inventory:
    """Stock levels plus the ids of the events already applied: the consumer's memory."""

    def __init__(self, stock: Mapping[str, int]) -> None:
        self.stock = dict(stock)
        self.processed: set[str] = set()

    def apply(self, event: OrderPlaced) -> bool:
        # Delivery is at-least-once: the same event may arrive twice. Remembering its id makes
        # the second delivery a no-op, so applying an event is idempotent.
        if event.event_id in self.processed:
            return False
        self.processed.add(event.event_id)
        if event.sku in self.stock:
            # An event is a fact that already happened; never go below zero, log the oversell.
            if event.quantity > self.stock[event.sku]:
                logger.warning("oversold %s for order %s", event.sku, event.order_id)
            self.stock[event.sku] = max(0, self.stock[event.sku] - event.quantity)
        return True


def create_app(stock: Mapping[str, int] | None = None, *, broker: Subscribable | None = None) -> FastAPI:
    """An inventory service; with `broker`, it consumes OrderPlaced events published there."""
    inventory = Inventory(DEFAULT_STOCK if stock is None else stock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if broker is not None:

            async def consume(payload: dict[str, Any]) -> None:
                inventory.apply(OrderPlaced.model_validate(payload))

            broker.subscribe("OrderPlaced", consume)
        yield

    # Every error is a problem (problems.py, given): FastAPI's 422 without the refused input (an
    # infinite or NaN number in the JSON would make it a 500), the 404 of an unknown route too.
    app = FastAPI(title="Inventory", version="1.0.0", lifespan=lifespan, responses=problem_responses(422))
    install_problem_details(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "inventory"}

    @app.get("/stock/{sku}", responses=problem_responses(404))
    async def read_stock(sku: str) -> Stock:
        if sku not in inventory.stock:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No SKU of this name is in stock.")
        return Stock(sku=sku, available=inventory.stock[sku])

    @app.post(
        "/events",
        status_code=status.HTTP_202_ACCEPTED,
        responses=problem_responses(400),  # a body that is not JSON at all
    )
    async def receive_event(event: OrderPlaced) -> EventReceipt:
        # The HTTP entrance for events pushed by a publisher in another process.
        applied = inventory.apply(event)
        logger.info("event %s applied=%s request_id=%s", event.event_id, applied, request_id_var.get())
        return EventReceipt(event_id=event.event_id, applied=applied)

    return app

