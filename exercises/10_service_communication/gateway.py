"""Exercise 10: the gateway, the one public entrance. It forwards /api/orders... to the
orders service and /api/stock/... to the inventory service.

Read README.md in this folder for the full interface. This file stands alone: do not import
inventory.py or orders.py (they are other services).
"""

from collections.abc import Mapping

import httpx
from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where each service lives; GATEWAY_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    orders_url: str = "http://127.0.0.1:8002"
    inventory_url: str = "http://127.0.0.1:8001"
    timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=1, ge=0)
    backoff: float = Field(default=0.05, ge=0)


def create_app(
    settings: Settings | None = None, *, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> FastAPI:
    """A gateway to "orders" and "inventory"; `transports[name]` reaches that service in tests."""
    settings = settings or Settings()

    # TODO: a lifespan with one httpx.AsyncClient per service (base_url, timeout, transport).
    app = FastAPI(title="Gateway")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "gateway"}

    # TODO: X-Request-ID created at the edge when missing, passed on, returned.

    # TODO: /api/{path:path} for every method: "orders..." -> orders service, "stock/..." ->
    #       inventory service, anything else -> 404. Keep method, query, body, content type;
    #       return status, body, content type and a Location rewritten to /api/... .
    #       Down -> 503, timeout -> 504; retry GET-like methods only.
    return app
