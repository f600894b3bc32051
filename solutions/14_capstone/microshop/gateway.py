"""The gateway: the one public entry point. It routes /api/... to the service that owns it,
hides the internal routes, and turns an unreachable or slow service into a clean 503 or 504.

    uvicorn microshop.gateway:create_app --factory --port 8000

It holds no business logic and no data: authentication is checked by each service itself.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic_settings import BaseSettings, SettingsConfigDict

from .common import RequestContextMiddleware, health_router, outgoing_headers


class Settings(BaseSettings):
    """GATEWAY_USERS_URL, GATEWAY_CATALOG_URL, GATEWAY_ORDERS_URL, GATEWAY_TIMEOUT (prefix GATEWAY_)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    users_url: str = "http://127.0.0.1:8001"
    catalog_url: str = "http://127.0.0.1:8002"
    orders_url: str = "http://127.0.0.1:8003"
    timeout: float = 5.0


# The public surface, by first path segment. Everything else (/reservations, /events,
# /outbox/...) is internal and answers 404 here.
PUBLIC_ROUTES: Mapping[str, str] = {
    "users": "users",
    "token": "users",
    "products": "catalog",
    "orders": "orders",
}
SERVICES = ("users", "catalog", "orders")
FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
FORWARDED_RESPONSE_HEADERS = ("content-type", "www-authenticate", "retry-after")


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> FastAPI:
    """Build the gateway. `transports` maps "users", "catalog", "orders" to a transport that
    replaces the network for that service (tests use httpx.ASGITransport)."""
    settings = settings or Settings()
    transports = dict(transports or {})
    urls = {"users": settings.users_url, "catalog": settings.catalog_url, "orders": settings.orders_url}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = {
            name: httpx.AsyncClient(base_url=urls[name], transport=transports.get(name), timeout=settings.timeout)
            for name in SERVICES
        }
        app.state.clients = clients
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    app = FastAPI(title="gateway", version="1.0.0", lifespan=lifespan)
    app.add_middleware(RequestContextMiddleware, service="gateway")
    app.include_router(health_router("gateway"))

    @app.get("/ready", tags=["ops"], summary="Readiness: every service behind the gateway answers")
    async def ready() -> JSONResponse:
        async def probe(name: str) -> str:
            try:
                async with asyncio.timeout(1.0):
                    reply = await app.state.clients[name].get("/health")
                return "up" if reply.is_success else "down"
            except (TimeoutError, httpx.HTTPError):
                return "down"

        states = dict(zip(SERVICES, await asyncio.gather(*(probe(name) for name in SERVICES)), strict=True))
        ok = all(state == "up" for state in states.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "services": states},
            status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], tags=["proxy"])
    async def proxy(path: str, request: Request) -> Response:
        service = PUBLIC_ROUTES.get(path.split("/", 1)[0])
        if service is None:
            return JSONResponse({"detail": "Not Found"}, status_code=status.HTTP_404_NOT_FOUND)
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
        headers.update(outgoing_headers())
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        try:
            async with asyncio.timeout(settings.timeout):
                reply = await app.state.clients[service].request(
                    request.method, target, content=await request.body(), headers=headers
                )
        except (TimeoutError, httpx.TimeoutException):
            return JSONResponse({"detail": f"the {service} service timed out"}, status_code=status.HTTP_504_GATEWAY_TIMEOUT)
        except httpx.HTTPError:
            return JSONResponse({"detail": f"the {service} service is unavailable"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        answer = {k: v for k, v in reply.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        if "location" in reply.headers and reply.headers["location"].startswith("/"):
            answer["location"] = "/api" + reply.headers["location"]  # a path the client can follow
        return Response(content=reply.content, status_code=reply.status_code, headers=answer)

    return app
