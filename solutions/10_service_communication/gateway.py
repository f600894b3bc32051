"""API gateway (lesson 10 reference): one public entrance that forwards to the right service.

Each service file stands alone, as separately deployed services do: they share contracts
(paths, JSON shapes), not Python modules.
"""

import asyncio
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("gateway")

REQUEST_ID_HEADER = "x-request-id"
# What a request ID may look like: it is written into every log line, so nothing else gets in.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMEOUT_HEADER = "X-Timeout-Ms"  # how long the caller still waits, passed on to the next hop
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# A path parameter is exactly one plain segment. Letters, digits and - _ . ~ only, and no leading
# dot: "..", ".", "%2e%2e" (decoded before it gets here), "a/b", "a\\b", "%252e" and empty values
# can never match, so no value can climb out of its place in the upstream path.
SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}")
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
FORWARDED_RESPONSE_HEADERS = ("content-type", "location", "retry-after")


class Settings(BaseSettings):
    """Where each service lives; GATEWAY_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    orders_url: str = "http://127.0.0.1:8002"
    inventory_url: str = "http://127.0.0.1:8001"
    timeout: float = Field(default=2.0, gt=0, le=60)  # seconds for the whole answer, retries included
    retries: int = Field(default=1, ge=0, le=10)
    backoff: float = Field(default=0.05, ge=0, le=10)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUS = frozenset({502, 503, 504})


class Detail(BaseModel):
    detail: str


class UpstreamError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def backoff_delay(backoff: float, attempt: int) -> float:
    """Exponential backoff with jitter: between 1 and 1.5 times backoff * 2**(attempt-1), so that
    many callers that failed together do not all retry at the same instant."""
    return backoff * 2 ** (attempt - 1) * (1 + random.random() / 2)


async def call_upstream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    retries: int,
    backoff: float,
    deadline: float,
    headers: dict[str, str],
    **kwargs: Any,
) -> httpx.Response:
    """Send a request; retry transient failures of idempotent methods only, with backoff, and
    all of it before `deadline` (a time of the event loop's clock).

    Each attempt tells the service how long the gateway will still wait (TIMEOUT_HEADER), keeping a
    tenth of it for the answer's way back, so that the service gives up when the gateway does.
    """
    loop = asyncio.get_running_loop()
    attempts = 1 + (retries if method.upper() in IDEMPOTENT_METHODS else 0)
    outcome: httpx.Response | UpstreamError = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, f"{service} service timed out")
    for attempt in range(attempts):
        if attempt:
            delay = backoff_delay(backoff, attempt)
            if loop.time() + delay >= deadline:
                break  # no time left to wait and try again: answer with the last failure now
            await asyncio.sleep(delay)
        headers[TIMEOUT_HEADER] = str(max(0, int((deadline - loop.time()) * 900)))
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await client.request(method, url, headers=headers, **kwargs)
        except (httpx.TimeoutException, TimeoutError):
            outcome = UpstreamError(status.HTTP_504_GATEWAY_TIMEOUT, f"{service} service timed out")
        except httpx.TransportError:
            outcome = UpstreamError(status.HTTP_503_SERVICE_UNAVAILABLE, f"{service} service unavailable")
        if isinstance(outcome, httpx.Response) and outcome.status_code not in RETRYABLE_STATUS:
            return outcome
        logger.warning("%s %s to %s failed (attempt %d of %d): %s", method, url, service, attempt + 1, attempts,
                       outcome.status_code if isinstance(outcome, httpx.Response) else outcome)
    if isinstance(outcome, httpx.Response):
        return outcome  # the service's own 502/503/504, after the retries: passed on as it is
    raise outcome


class RequestIdMiddleware:
    """At the edge: reuse the caller's X-Request-ID when it is well formed, else create one; return it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def no_route(request: Request) -> JSONResponse:
    return JSONResponse({"detail": f"No service for {request.url.path}"}, status_code=status.HTTP_404_NOT_FOUND)


# What the gateway itself may answer, on top of whatever the service answers.
GATEWAY_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Detail, "description": "No route: not on the gateway's allow-list"},
    502: {"model": Detail, "description": "The service answered 502"},
    503: {"model": Detail, "description": "The service cannot be reached"},
    504: {"model": Detail, "description": "The service did not answer within the gateway's timeout"},
}


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

    async def forward(request: Request, service: str, template: str, **params: str) -> Response:
        """Forward to `template` at `service`, each parameter put in as one encoded path segment.

        The upstream path is built from the allow-listed template, never from the client's path:
        a value that is not one plain segment is refused before anything is sent.
        """
        if not all(SEGMENT.fullmatch(value) for value in params.values()):
            return no_route(request)
        path = template.format(**{name: quote(value, safe="") for name, value in params.items()})
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        headers["X-Request-ID"] = request_id_var.get()  # passed on, so logs of every hop match
        deadline = asyncio.get_running_loop().time() + settings.timeout  # one budget for everything below
        try:
            upstream = await call_upstream(
                request.state.clients[service], request.method, path,
                service=service, retries=settings.retries, backoff=settings.backoff, deadline=deadline,
                params=request.query_params.multi_items(), content=await request.body(), headers=headers,
            )
        except UpstreamError as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        answer = {name: upstream.headers[name] for name in FORWARDED_RESPONSE_HEADERS if name in upstream.headers}
        if answer.get("location", "").startswith("/"):
            answer["location"] = "/api" + answer["location"]  # the client only knows the gateway's paths
        return Response(content=upstream.content, status_code=upstream.status_code, headers=answer)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    # The allow-list: exactly these methods and paths reach a service. Anything else, including
    # the services' internal routes (inventory's POST /events), is answered 404 here.

    @app.get("/api/stock/{sku}", responses={200: {"description": "Inventory's answer"}, **GATEWAY_ERRORS})
    async def read_stock(sku: str, request: Request) -> Response:
        return await forward(request, "inventory", "/stock/{sku}", sku=sku)

    @app.post(
        "/api/orders",
        status_code=status.HTTP_201_CREATED,
        responses={
            201: {"description": "The order, placed"},
            400: {"model": Detail, "description": "The body is not valid JSON"},
            409: {"model": Detail, "description": "Not enough stock"},
            422: {"description": "Invalid order, or unknown SKU"},
            **GATEWAY_ERRORS,
        },
    )
    async def place_order(request: Request) -> Response:
        return await forward(request, "orders", "/orders")

    @app.get("/api/orders/{order_id}", responses={200: {"description": "The order"}, **GATEWAY_ERRORS})
    async def read_order(order_id: str, request: Request) -> Response:
        return await forward(request, "orders", "/orders/{order_id}", order_id=order_id)

    @app.api_route(
        "/api/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
    )
    async def not_on_the_allow_list(path: str, request: Request) -> JSONResponse:
        return no_route(request)

    return app
