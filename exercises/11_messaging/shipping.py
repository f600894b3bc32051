"""Shipping service (exercise 11): books one shipment per OrderPlaced event read from JetStream.

Read exercises/11_messaging/README.md for the promised interface, and lessons/11_messaging.md
for the why. This file stands alone: it shares contracts with orders.py, never Python code.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Carrier = Callable[[dict[str, Any]], Awaitable[None]]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPPING_")

    nats_url: str = "nats://127.0.0.1:4222"
    database: str = "shipping.db"
    ack_wait: float = Field(default=30.0, ge=0.5, le=3600)
    max_deliver: int = Field(default=5, ge=1, le=100)
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    backoff: float = Field(default=0.5, gt=0, le=5.0)
    carrier_timeout: float = Field(default=30.0, gt=0, le=3600)


async def no_carrier(shipment: dict[str, Any]) -> None:
    """The default carrier books nothing; a deployment passes a real one."""


def create_app(settings: Settings | None = None, *, carrier: Carrier | None = None) -> FastAPI:
    """The shipping app. Its lifespan opens the SQLite database and runs the consumer."""
    settings = settings or Settings()
    carrier = carrier or no_carrier

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # TODO: open settings.database with aiosqlite; create the shipments table (event_id is its key).
        # TODO: connect, create the ORDERS and DEADLETTER streams, create or update the durable pull
        #       consumer "shipping", and start the consumer task (see the README for every rule).
        yield
        # TODO: cancel the consumer's tasks (acknowledging nothing) and close the connection.

    app = FastAPI(title="shipping", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "shipping"}

    # TODO: GET /shipments/{order_id}; every error a problem (install_problem_details(app), problems.py).

    return app
