"""Exercise 10: the orders service. It asks inventory before accepting an order, and
publishes an OrderPlaced event for every order it accepts.

Read README.md in this folder for the full interface. This file stands alone: do not import
inventory.py or gateway.py (they are other services). It imports the given problems.py (the course's
error shape, a library every service ships with; do not edit it).
"""

from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import ProblemError, install_problem_details, problem_responses

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class Settings(BaseSettings):
    """Where inventory lives and how patiently to call it; ORDERS_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    inventory_url: str = "http://127.0.0.1:8001"
    events_url: str | None = None
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=2, ge=0)
    backoff: float = Field(default=0.05, ge=0)


class InProcessBroker:
    """Hands each published event to the handlers subscribed in this process."""

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[EventHandler]] = defaultdict(list)

    def subscribe(self, topic: str, handler: EventHandler) -> None:
        self._handlers[topic].append(handler)

    async def publish(self, topic: str, event: dict[str, Any]) -> None:
        # TODO: await every handler subscribed to `topic`.
        pass


def create_app(
    settings: Settings | None = None,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    broker: Any = None,
) -> FastAPI:
    """An orders service. Tests pass `upstream_transport` (how to reach inventory) and `broker`."""
    settings = settings or Settings()

    # TODO: a lifespan that creates ONE httpx.AsyncClient(base_url=settings.inventory_url,
    #       timeout=..., transport=upstream_transport), yields it (with the outbox and an
    #       orders dict) as state, and closes it at shutdown. The broker: `broker`, else a
    #       publisher that POSTs events to settings.events_url, else InProcessBroker(). An
    #       outbox (a queue) holds the events; a task started here publishes them, retrying
    #       with backoff until accepted (the consumer deduplicates by event_id).
    # TODO: every error a problem: install_problem_details(app) (README: "Errors are problems").
    app = FastAPI(title="Orders")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "orders"}

    # TODO: X-Request-ID: reuse the caller's when it fully matches [A-Za-z0-9._-]{1,64}, else
    #       create one (uuid4().hex); return it on every response, a crash's 500 included (answer
    #       it in the middleware: README 'Errors are problems'); send it to inventory.

    # TODO: POST /orders {"sku", "quantity"}: the SKU is one plain path segment (else 422).
    #       One deadline: settings.timeout, or less when X-Timeout-Ms says so. GET /stock/{sku}
    #       at inventory (retried with backoff and jitter when it fails transiently, all before
    #       the deadline), 422 / 409 from its answer, 503 / 504 / 502 when it fails. Past the
    #       deadline: 504 and nothing stored. Else store the order and put OrderPlaced in the
    #       outbox, answer 201 + Location. Declare every status code with responses=.

    # TODO: GET /orders/{order_id} -> the order, or 404.
    return app
