"""The orders service (steps 3-5): places orders by reserving stock in the catalog, and
announces them with OrderPlaced events. Read README.md.

    uvicorn microshop.orders:create_app --factory --port 8003
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, BackgroundTasks, FastAPI, Request, Response, Security, status
from opentelemetry import trace
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    Principal,
    RequestContextMiddleware,
    SessionDep,
    UTCDateTime,
    current_principal,
    health_router,
    service_client,
    service_tracer,
    todo,
    utcnow,
)
from .problems import install_problem_details, problem_responses


class Settings(BaseSettings):
    """Environment variables with the prefix ORDERS_."""

    model_config = SettingsConfigDict(env_prefix="ORDERS_")

    database_url: str = "sqlite+aiosqlite:///./orders.db"
    client_id: str = Field("orders", min_length=1, max_length=64)  # who orders is to users
    client_secret: SecretStr = Field(min_length=32)  # its own secret (client credentials)
    jwks_refresh_seconds: float = Field(30.0, ge=0, le=3600)  # an unknown kid refetches, at most this often
    catalog_url: str = "http://127.0.0.1:8002"
    users_url: str = "http://127.0.0.1:8001"
    catalog_timeout: float = Field(2.0, gt=0, le=30)  # the deadline for one call to the catalog
    nats_url: str = "nats://127.0.0.1:4222"  # the broker the events go through
    # The deadline for JetStream's acknowledgement of one publish, and for each call to users.
    events_timeout: float = Field(2.0, gt=0, le=30)
    outbox_interval: float = Field(2.0, ge=0)  # retry unpublished events this often; 0: never


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16))
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    total_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# TODO (step 5): an outbox table: the OrderPlaced events waiting to be published, with the
#   traceparent of the request that placed the order, and when JetStream acknowledged each.


class Line(BaseModel):
    sku: Annotated[str, Field(pattern=r"^[A-Z0-9-]{3,20}$")]
    quantity: Annotated[int, Field(ge=1, le=100)]


class OrderIn(BaseModel):
    items: Annotated[list[Line], Field(min_length=1, max_length=20)]


router = APIRouter()


@router.post("/orders", status_code=status.HTTP_201_CREATED)
async def place_order(
    body: OrderIn,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    session: SessionDep,
    principal: Annotated[Principal, Security(current_principal, scopes=["orders:write"])],
) -> dict:
    # TODO (step 3): choose the order ID, reserve the stock with
    #   request.app.state.catalog.post("/reservations", ...), and only then store the order:
    #   201 with the order and Location: /orders/{id}. Catalog 409 -> 409, 404 -> 422.
    # TODO (step 4): a deadline on the catalog call (settings.catalog_timeout). No order when
    #   the catalog is unreachable (503), slow (504) or failing (502), and the reservation
    #   released (DELETE /reservations/{order_id}) whenever it may have been made; a release
    #   the catalog does not confirm is written down and retried by every dispatch.
    # TODO (step 5): store an OrderPlaced event in the outbox, in the same commit as the order,
    #   and publish it after the response (background.add_task).
    todo("step 3: POST /orders")


@router.get("/orders")
async def list_orders(
    session: SessionDep, principal: Annotated[Principal, Security(current_principal, scopes=["orders:read"])]
) -> list[dict]:
    # TODO (step 3): the caller's orders, newest first.
    todo("step 3: GET /orders")


@router.get("/orders/{order_id}")
async def read_order(
    order_id: str, session: SessionDep, principal: Annotated[Principal, Security(current_principal, scopes=["orders:read"])]
) -> dict:
    # TODO (step 3): the order, or 404 - also when it belongs to someone else.
    todo("step 3: GET /orders/{order_id}")


@router.post("/outbox/dispatch")
async def dispatch_now(request: Request) -> dict[str, int]:
    # TODO (step 5): retry the unconfirmed releases, then publish the pending events to the
    #   stream ORDERS on orders.placed, oldest first, each with the header Nats-Msg-Id = its
    #   event_id, and mark a row published only once JetStream acknowledged it. The broker
    #   unreachable or failing -> stop, keep the rest for the next pass.
    #   {"published": n, "pending": m}. Internal (a service token).
    todo("step 5: POST /outbox/dispatch")


def create_app(
    settings: Settings | None = None,
    *,
    catalog_transport: httpx.AsyncBaseTransport | None = None,
    users_transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the orders service. The transports stand in for the network in tests;
    without them, the URLs from the settings are called. The app's spans come from
    `tracer_provider`."""
    settings = settings or Settings()
    tracer = service_tracer("orders", tracer_provider)
    engine = create_async_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with (
            # TODO (steps 3, 5): every call to an internal route of catalog or users carries this
            #   service's token, from POST {users_url}/service-token with client_id and
            #   client_secret, reused until it expires. app.state.public_keys: as in catalog.
            service_client(tracer, settings.catalog_url, catalog_transport) as catalog,
            service_client(tracer, settings.users_url, users_transport) as users,
        ):
            app.state.catalog, app.state.users = catalog, users
            # TODO (step 5): connect to the broker (settings.nats_url) without waiting for it
            #   when it is down, create the streams ORDERS and DEADLETTER if they do not exist,
            #   and drain the connection at shutdown. Retry unpublished events every
            #   settings.outbox_interval seconds (when it is not 0) in a task cancelled at shutdown.
            yield
        await engine.dispose()

    app = FastAPI(title="orders", lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="orders", tracer=tracer)
    app.include_router(health_router("orders"))
    app.include_router(router)
    return app
