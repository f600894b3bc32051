"""API gateway (lesson 10 reference): one public entrance that forwards to the right service.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes), not Python modules.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("gateway")

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# The first path segment after /api names the resource; the resource decides the service.
ROUTES: dict[str, str] = {"orders": "orders", "stock": "inventory"}
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
FORWARDED_RESPONSE_HEADERS = ("content-type", "location", "retry-after")


class Settings(BaseSettings):
    """Where each service lives; GATEWAY_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    orders_url: str = "http://127.0.0.1:8002"
    inventory_url: str = "http://127.0.0.1:8001"
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=1, ge=0)
    backoff: float = Field(default=0.05, ge=0)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})


class UpstreamError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


async def call_upstream(
    client: httpx.AsyncClient, method: str, url: str, *, service: str, retries: int, backoff: float, **kwargs: Any
) -> httpx.Response:
    """Send a request; retry transient failures of idempotent methods only, with backoff."""
    attempts = 1 + (retries if method.upper() in IDEMPOTENT_METHODS else 0)
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TimeoutException:
            error = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, f"{service} service timed out")
        except httpx.TransportError:
            error = UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, f"{service} service unavailable")
        else:
            if response.status_code not in RETRYABLE_STATUS or attempt == attempts - 1:
                return response
            continue
        logger.warning("%s %s to %s failed (attempt %d of %d): %s", method, url, service, attempt + 1, attempts, error)
        if attempt == attempts - 1:
            raise error
    raise AssertionError("unreachable")  # pragma: no cover


class RequestIdMiddleware:
    """At the edge: reuse the caller's X-Request-ID or create one, and return it."""

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


def create_app(
    settings: Settings | None = None, *, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> FastAPI:
    """A gateway to orders and inventory. `transports` maps a service name to the transport
    that reaches it (tests use ASGITransport or a fake); a missing entry means the network."""
    settings = settings or Settings()
    transports = transports or {}
    urls = {"orders": settings.orders_url, "inventory": settings.inventory_url}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            clients = {
                name: await stack.enter_async_context(
                    httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(settings.timeout), transport=transports.get(name))
                )
                for name, url in urls.items()
            }
            yield {"clients": clients}

    app = FastAPI(title="Gateway", version="1.0.0", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(path: str, request: Request) -> Response:
        service = ROUTES.get(path.split("/", 1)[0])
        if service is None:
            return JSONResponse({"detail": f"No service for /api/{path}"}, status_code=status.HTTP_404_NOT_FOUND)
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        headers["X-Request-ID"] = request_id_var.get()  # passed on, so logs of every hop match
        try:
            upstream = await call_upstream(
                request.state.clients[service], request.method, f"/{path}",
                service=service, retries=settings.retries, backoff=settings.backoff,
                params=request.query_params.multi_items(), content=await request.body(), headers=headers,
            )
        except UpstreamError as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        answer = {name: upstream.headers[name] for name in FORWARDED_RESPONSE_HEADERS if name in upstream.headers}
        if answer.get("location", "").startswith("/"):
            answer["location"] = "/api" + answer["location"]  # the client only knows the gateway's paths
        return Response(content=upstream.content, status_code=upstream.status_code, headers=answer)

    return app
