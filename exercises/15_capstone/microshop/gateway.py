"""The gateway (step 6): the one public entry point. Read README.md.

    uvicorn microshop.gateway:create_app --factory --port 8000
"""

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request, Response
from opentelemetry import trace
from pydantic_settings import BaseSettings, SettingsConfigDict

from .common import RequestContextMiddleware, health_router, service_client, service_tracer, todo
from .problems import install_problem_details, problem_responses


class Settings(BaseSettings):
    """Environment variables with the prefix GATEWAY_."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    users_url: str = "http://127.0.0.1:8001"
    catalog_url: str = "http://127.0.0.1:8002"
    orders_url: str = "http://127.0.0.1:8003"
    timeout: float = 5.0
    max_body_bytes: int = 1024 * 1024  # a larger request answers 413 and is not forwarded; a larger answer, 502


SERVICES = ("users", "catalog", "orders")


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the gateway. `transports` maps "users", "catalog" and "orders" to a transport
    that stands in for the network in tests; its spans come from `tracer_provider`."""
    settings = settings or Settings()
    tracer = service_tracer("gateway", tracer_provider)
    transports = dict(transports or {})
    urls = {"users": settings.users_url, "catalog": settings.catalog_url, "orders": settings.orders_url}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = {name: service_client(tracer, urls[name], transports.get(name)) for name in SERVICES}
        app.state.clients = clients
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    app = FastAPI(title="gateway", lifespan=lifespan)
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="gateway", tracer=tracer)
    app.include_router(health_router("gateway"))

    @app.get("/ready")
    async def ready() -> Response:
        # TODO: ask every service's /health; 200 {"status": "ready", "services": {...: "up"}},
        #   or else the 503 not-ready problem of README.md (ProblemError(503, ..., type=...,
        #   title="Not ready", services={...})) with "down" for those that do not answer.
        todo("step 6: GET /ready")

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(path: str, request: Request) -> Response:
        # TODO: replace this catch-all by one route per public route of README.md (an
        #   allow-list of exact methods and paths); anything else is 404 and reaches no service,
        #   however its path is encoded (%2F, %2E%2E, ..). A path parameter that is empty, "."
        #   or "..", or holds "/" or "\\" once decoded: 404. Forward the method, path, query,
        #   body (at most settings.max_body_bytes, else 413) and the Authorization,
        #   Content-Type, Accept and X-Request-ID headers; return the status, body,
        #   Content-Type, WWW-Authenticate and Location (prefixed with /api). Unreachable: 503;
        #   slower than settings.timeout: 504. An answer read as it streams in, at most
        #   max_body_bytes once decoded, else 502. Declare each route's statuses with responses=.
        todo("step 6: the proxy")

    return app
