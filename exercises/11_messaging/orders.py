"""Orders service (exercise 11): takes orders and relays their OrderPlaced events to JetStream.

Read exercises/11_messaging/README.md for the promised interface, and lessons/11_messaging.md
for the why. This file stands alone: it shares contracts with shipping.py (the stream, the
subject, the event's fields), never Python code.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    nats_url: str = "nats://127.0.0.1:4222"
    database: str = "orders.db"
    publish_timeout: float = Field(default=2.0, gt=0, le=60)
    backoff: float = Field(default=0.05, gt=0, le=2.0)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The orders app. Its lifespan opens the SQLite database and runs the outbox relay."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # TODO: open settings.database with aiosqlite; create the orders and outbox tables.
        # TODO: start the relay task: connect to settings.nats_url (reconnecting for ever), create the
        #       ORDERS stream (subjects orders.>, file storage, a 2-minute duplicate window), publish the
        #       outbox oldest first with the header Nats-Msg-Id = event_id, delete a row only after its
        #       publish was acknowledged, and retry with backoff when the broker is away.
        yield
        # TODO: stop the relay and close the connection.

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "orders"}

    # TODO: POST /orders (the order and its event in one transaction), GET /orders/{order_id}, GET /outbox.
    # TODO: every error a problem: install_problem_details(app) from the given problems.py
    #       (`from .problems import install_problem_details, problem_responses`), and each route's
    #       errors declared with responses=problem_responses(...).

    return app
