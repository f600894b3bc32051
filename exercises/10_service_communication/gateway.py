"""Exercise 10: the gateway, the one public entrance. It forwards /api/orders... to the
orders service and /api/stock/... to the inventory service.

Read README.md in this folder for the full interface. This file stands alone: do not import
inventory.py or orders.py (they are other services). It imports the given problems.py (the course's
error shape, a library every service ships with; do not edit it).
"""

from collections.abc import Mapping

import httpx
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import ProblemError, install_problem_details, problem_response, problem_responses


class Settings(BaseSettings):
    """Where each service lives; GATEWAY_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    orders_url: str = "http://127.0.0.1:8002"
    inventory_url: str = "http://127.0.0.1:8001"
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=1, ge=0)
    backoff: float = Field(default=0.05, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset: float = Field(default=10.0, gt=0)
    max_concurrent: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1)


def create_app(
    settings: Settings | None = None, *, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> FastAPI:
    """A gateway to "orders" and "inventory"; `transports[name]` reaches that service in tests."""
    settings = settings or Settings()

    # TODO: a lifespan with one httpx.AsyncClient per service (base_url, timeout, transport).
    # TODO: every error a problem: install_problem_details(app) (README: "Errors are problems").
    app = FastAPI(title="Gateway")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    # TODO: X-Request-ID created at the edge when missing or malformed (kept only when it fully
    #       matches [A-Za-z0-9._-]{1,64}, else uuid4().hex), passed on, returned (a crash's 500 too).

    # TODO: the allow-list, and nothing else: GET /api/stock/{sku} -> inventory GET /stock/{sku},
    #       POST /api/orders -> orders POST /orders, GET /api/orders/{order_id} -> orders
    #       GET /orders/{order_id}; nothing else (the router answers another path 404, another
    #       method 405) and nothing sent.
    #       A parameter must be one plain segment (letters, digits, - _ . ~, no leading dot, at
    #       most 64), and goes into the upstream path percent-encoded, from the template, never
    #       from the client's path. Declare every status code with responses=.
    # TODO: keep method, query, body, content type; return status, body, content type and a
    #       Location rewritten to /api/... . Down -> 503, timeout -> 504; retry GET only, with
    #       backoff and jitter. settings.timeout bounds the whole answer (asyncio.timeout_at a
    #       deadline), and every call carries X-Timeout-Ms: the milliseconds still left.
    #       Honour a Retry-After on a 503; send one with your own 503. Pass the headers on as
    #       the bytes the service sent (upstream.headers.raw); read a problem as strict JSON
    #       (NaN, Infinity, 1e400 refused) and answer one that is not with a 502.
    # TODO: max_body_bytes either way: a request body longer is a 413, not sent; an answer is read
    #       as it streams in (client.send(..., stream=True)) and one longer is a 502, read no further.
    # TODO: per service, a circuit breaker (breaker_failures failed calls in a row open it for
    #       breaker_reset seconds: 503 + Retry-After at once, then one trial call) and a bulkhead
    #       (at most max_concurrent calls in flight; one more: 503 + Retry-After at once). A 502
    #       of the gateway's own (an answer it cannot read) is a failed call too.
    return app
