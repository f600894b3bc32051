"""The gateway: the one public entry point. It forwards exactly the public routes to the
service that owns them, and turns an unreachable or slow service into a clean 503 or 504.

    uvicorn microshop.gateway:create_app --factory --port 8000

It holds no business logic and no data: authentication is checked by each service itself.
"""

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, FastAPI, HTTPException, Path, Request, Response, status
from opentelemetry import trace
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .common import RequestContextMiddleware, health_router, outgoing_headers, service_client, service_tracer
from .problems import PROBLEM_JSON, Problem, ProblemError, install_problem_details, problem_responses


class Settings(BaseSettings):
    """GATEWAY_USERS_URL, GATEWAY_CATALOG_URL, GATEWAY_ORDERS_URL, GATEWAY_TIMEOUT,
    GATEWAY_MAX_BODY_BYTES (prefix GATEWAY_)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    users_url: str = "http://127.0.0.1:8001"
    catalog_url: str = "http://127.0.0.1:8002"
    orders_url: str = "http://127.0.0.1:8003"
    timeout: float = 5.0
    max_body_bytes: int = Field(1024 * 1024, ge=1)  # the largest body relayed: a larger request 413, a larger answer 502


SERVICES = ("users", "catalog", "orders")
FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
FORWARDED_RESPONSE_HEADERS = ("content-type", "www-authenticate", "retry-after")
RETRY = {"Retry-After": "1"}

# A path parameter is forwarded only if it is one plain segment: unreserved characters, and not
# "." or ".." (nor empty). By the time a route sees a parameter, uvicorn has decoded it: "%2F" is
# a "/" and "%2E%2E" is "..". Forwarded as they are, httpx would resolve the dot segments
# (/products/../reservations is /reservations) and the request would reach a route that is not
# public. A segment that passes this check has nothing left to decode or to resolve.
PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}")
Segment = Annotated[str, Path(description="One plain path segment: letters, digits, '.', '_', '~', '-'")]

# Everything the public may call through the gateway answers one of these, from the gateway
# itself (404 for a path it refuses, 413, 502 for an answer it cannot relay, 503, 504) or from
# the service (the rest).
GATEWAY_ERRORS = (404, 413, 502, 503, 504)

# The problem type of /ready's 503, the same as every readiness probe's in the course.
NOT_READY = "https://course.example/problems/not-ready"


class Readiness(BaseModel):
    """What /ready answers when every service answers."""

    status: Literal["ready"]
    services: dict[str, Literal["up"]]


class NotReady(Problem):
    """The 503 problem of /ready: which services are down, for whoever reads more than the code."""

    services: dict[str, Literal["up", "down"]]


def plain(segment: str) -> str:
    if not PLAIN_SEGMENT.fullmatch(segment):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Not Found")
    return segment


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is larger than `limit`: never a whole gigabyte in memory."""
    declared = request.headers.get("content-length", "")
    # ASCII digits, and few enough for int(): "²".isdigit() is true, and int("²") raises, as
    # int() does for more than 4300 digits (a 500 either way).
    if re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the body is larger than {limit} bytes")
    return bytes(body)


async def forward(request: Request, service: str, path: str) -> Response:
    """Send the request to `service` at `path` (built by a public route from plain segments)."""
    app = request.app
    settings: Settings = app.state.settings
    headers = {k: v.encode("latin-1") for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}  # the bytes sent: httpx encodes a str as ASCII, and a byte above 127 would be a 500
    headers.update(outgoing_headers())
    body = await read_body(request, settings.max_body_bytes)
    target = path + (f"?{request.url.query}" if request.url.query else "")
    try:
        async with asyncio.timeout(settings.timeout):
            reply, content = await fetch(app.state.clients[service], request.method, target, settings.max_body_bytes,
                                         content=body, headers=headers)
    except (TooLarge, httpx.DecodingError):
        # An answer the gateway cannot relay: longer than the limit (read no further), or a body
        # its Content-Encoding does not decode. The service answered, so not a 503: a 502.
        raise ProblemError(status.HTTP_502_BAD_GATEWAY, f"The {service} service answered what the gateway cannot relay.") from None
    except (TimeoutError, httpx.TimeoutException):
        # The gateway's own errors are problems too, with a Retry-After: the client may try again.
        raise ProblemError(status.HTTP_504_GATEWAY_TIMEOUT, f"The {service} service did not answer in time.",
                           headers=RETRY) from None
    except httpx.HTTPError:
        raise ProblemError(status.HTTP_503_SERVICE_UNAVAILABLE, f"The {service} service cannot be reached.",
                           headers=RETRY) from None
    answer = {k: v for k, v in reply.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
    if "location" in reply.headers and reply.headers["location"].startswith("/"):
        answer["location"] = "/api" + reply.headers["location"]  # a path the client can follow
    return Response(content=public_problem(reply, content), status_code=reply.status_code, headers=answer)


class TooLarge(Exception):
    """An answer's body went past the gateway's limit."""


async def fetch(client: httpx.AsyncClient, method: str, url: str, limit: int, **kwargs: Any) -> tuple[httpx.Response, bytes]:
    """One call and its answer's body, read as it streams in: at most `limit` bytes once decoded
    (a small gzip may inflate to gigabytes). One byte more raises TooLarge, and the rest is never
    read: a service that streams gigabytes costs the gateway `limit` bytes of memory."""
    async with client.stream(method, url, **kwargs) as reply:
        body = bytearray()
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{method} {url}: an answer longer than {limit} bytes")
    return reply, bytes(body)


def public_problem(reply: httpx.Response, content: bytes) -> bytes:
    """The upstream's body; a problem's `instance` made the path the client asked for.

    A service names the path it was asked (/products/X); the client asked the gateway for
    /api/products/X, and `instance` is the request's path, so the gateway prefixes it, as it
    does a Location. Any other body passes through untouched.
    """
    if reply.headers.get("content-type", "").split(";")[0].strip().lower() != PROBLEM_JSON:
        return content
    try:
        problem = json.loads(content)
    except (ValueError, RecursionError):
        return content
    if not isinstance(problem, dict) or not isinstance(problem.get("instance"), str) or not problem["instance"].startswith("/"):
        return content
    problem["instance"] = "/api" + problem["instance"]
    try:
        return json.dumps(problem, allow_nan=False).encode()
    except ValueError:  # NaN or Infinity, which Python's json reads: relayed as the service wrote it
        return content


def public(*codes: int) -> dict[str, Any]:
    """The route options of a public route: what the service may answer, and the gateway too
    (every one a problem; the service's 422 is declared for the whole app)."""
    return {"responses": problem_responses(*sorted({*codes, *GATEWAY_ERRORS})), "response_class": Response}


# The public API, route by route: an allow-list of exact methods and paths. Anything else,
# including /reservations, /events and /outbox/..., and every path that would only become one
# of these after decoding or resolving "..", is not here, and answers 404 (405 for a public path
# with another method) without reaching any service.
public_api = APIRouter(prefix="/api", tags=["public"])


@public_api.post("/users", status_code=status.HTTP_201_CREATED, **public(400, 409, 422))
async def register(request: Request) -> Response:
    return await forward(request, "users", "/users")


@public_api.post("/token", **public(400, 401, 422))
async def token(request: Request) -> Response:
    return await forward(request, "users", "/token")


@public_api.get("/users/me", **public(401))
async def me(request: Request) -> Response:
    return await forward(request, "users", "/users/me")


@public_api.post("/products", status_code=status.HTTP_201_CREATED, **public(400, 401, 403, 409, 422))
async def create_product(request: Request) -> Response:
    return await forward(request, "catalog", "/products")


@public_api.get("/products", **public())
async def list_products(request: Request) -> Response:
    return await forward(request, "catalog", "/products")


@public_api.get("/products/{sku}", **public())
async def read_product(sku: Segment, request: Request) -> Response:
    return await forward(request, "catalog", f"/products/{plain(sku)}")


@public_api.post("/orders", status_code=status.HTTP_201_CREATED, **public(400, 401, 403, 409, 502, 422))
async def place_order(request: Request) -> Response:
    return await forward(request, "orders", "/orders")


@public_api.get("/orders", **public(401, 403))
async def list_orders(request: Request) -> Response:
    return await forward(request, "orders", "/orders")


@public_api.get("/orders/{order_id}", **public(401, 403))
async def read_order(order_id: Segment, request: Request) -> Response:
    return await forward(request, "orders", f"/orders/{plain(order_id)}")


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the gateway. `transports` maps "users", "catalog", "orders" to a transport that
    replaces the network for that service (tests use httpx.ASGITransport); the app's spans
    come from `tracer_provider` (tests pass one with an in-memory exporter)."""
    settings = settings or Settings()
    tracer = service_tracer("gateway", tracer_provider)
    transports = dict(transports or {})
    urls = {"users": settings.users_url, "catalog": settings.catalog_url, "orders": settings.orders_url}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Every call carries the request's trace: the services' spans join the gateway's.
        clients = {
            name: service_client(tracer, urls[name], transports.get(name), timeout=settings.timeout) for name in SERVICES
        }
        app.state.clients = clients
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    # redirect_slashes=False: "/api/products/" is not a public route, and a redirect to
    # whatever the path becomes without its slash is not the gateway's to make.
    app = FastAPI(title="gateway", version="1.0.0", lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="gateway", tracer=tracer)
    app.include_router(health_router("gateway"))

    @app.get(
        "/ready",
        tags=["ops"],
        summary="Readiness: every service behind the gateway answers",
        responses={
            status.HTTP_200_OK: {"model": Readiness},
            status.HTTP_503_SERVICE_UNAVAILABLE: {
                "model": NotReady,
                "description": "At least one service is down",
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/NotReady"}}},
            },
        },
    )
    async def ready() -> Readiness:
        async def probe(name: str) -> str:
            try:
                async with asyncio.timeout(1.0):
                    reply = await app.state.clients[name].get("/health")
                return "up" if reply.is_success else "down"
            except (TimeoutError, httpx.HTTPError):
                return "down"

        states = dict(zip(SERVICES, await asyncio.gather(*(probe(name) for name in SERVICES)), strict=True))
        if any(state != "up" for state in states.values()):
            # A problem like every error, of the course's not-ready type: a probe reads the code,
            # an operator the services that are down.
            raise ProblemError(status.HTTP_503_SERVICE_UNAVAILABLE, "A service behind the gateway does not answer.",
                               type=NOT_READY, title="Not ready", services=states)
        return Readiness(status="ready", services={name: "up" for name in states})

    app.include_router(public_api)
    return app
