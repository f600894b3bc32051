"""The catalog service (step 2): products, stock, and reservations of stock. Read README.md.

    uvicorn microshop.catalog:create_app --factory --port 8002
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
from fastapi import APIRouter, FastAPI, Response, Security, status
from opentelemetry import trace
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    Principal,
    RequestContextMiddleware,
    SessionDep,
    current_principal,
    health_router,
    service_client,
    service_tracer,
    todo,
)
from .problems import install_problem_details, problem_responses

SKU = Annotated[str, Field(pattern=r"^[A-Z0-9-]{3,20}$")]


class Settings(BaseSettings):
    """Environment variables with the prefix CATALOG_."""

    model_config = SettingsConfigDict(env_prefix="CATALOG_")

    database_url: str = "sqlite+aiosqlite:///./catalog.db"
    users_url: str = "http://127.0.0.1:8001"  # the public keys: {users_url}/.well-known/jwks.json
    users_timeout: float = Field(2.0, gt=0, le=30)
    jwks_refresh_seconds: float = Field(30.0, ge=0, le=3600)  # an unknown kid refetches, at most this often


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int]
    stock: Mapped[int]


# TODO: a Reservation table keyed by order_id: its status ("held" or "released"), its lines
#   (a JSON column is fine) and its total.


# TODO (step 2): upper bounds too: price_cents at most 100_000_000, stock at most 1_000_000.
#   SQLite stores 64-bit integers; 2**63 would reach the database and come back as a 500.
class ProductIn(BaseModel):
    sku: SKU
    name: Annotated[str, Field(min_length=1, max_length=100)]
    price_cents: Annotated[int, Field(gt=0)]
    stock: Annotated[int, Field(ge=0)]


class Line(BaseModel):
    sku: SKU
    quantity: Annotated[int, Field(ge=1, le=100)]


class ReservationIn(BaseModel):
    order_id: Annotated[str, Field(min_length=1, max_length=64)]
    items: Annotated[list[Line], Field(min_length=1, max_length=20)]


router = APIRouter()


@router.post("/products", status_code=status.HTTP_201_CREATED)
async def create_product(
    body: ProductIn,
    response: Response,
    session: SessionDep,
    _: Annotated[Principal, Security(current_principal, scopes=["catalog:write"])],
) -> dict:
    # TODO: store it; 201 with the product and Location: /products/{sku}; 409 if the SKU exists.
    todo("step 2: POST /products")


@router.get("/products")
async def list_products(session: SessionDep) -> list[dict]:
    # TODO: every product, sorted by SKU.
    todo("step 2: GET /products")


@router.get("/products/{sku}")
async def read_product(sku: str, session: SessionDep) -> dict:
    # TODO: the product, or 404.
    todo("step 2: GET /products/{sku}")


@router.post("/reservations", status_code=status.HTTP_201_CREATED)
async def reserve(body: ReservationIn, response: Response, session: SessionDep) -> dict:
    # TODO: all lines or none, in one transaction; take the stock with a conditional UPDATE
    #   (... WHERE stock >= quantity), never read-then-write. 404 unknown SKU, 409 not enough.
    #   The same order_id again: 200 with the existing reservation (nothing taken twice);
    #   an order_id that was released: 409. The same order_id twice *at once* too: claim it
    #   first with an INSERT ... ON CONFLICT DO NOTHING (sqlalchemy.dialects.sqlite.insert).
    #   Internal: only with a service token (dependencies=[Depends(require_service)]).
    todo("step 2: POST /reservations")


@router.delete("/reservations/{order_id}", status_code=status.HTTP_204_NO_CONTENT)
async def release(order_id: str, session: SessionDep) -> None:
    # TODO: give a held reservation's stock back and mark it released; 204 every time, even
    #   for an unknown order_id (then remember it as released, so a late reservation is refused),
    #   one longer than any reservation's too (no bound on it here: a 422 is not a 204).
    #   Safe against a concurrent reservation or release of the same order: held -> released
    #   in one conditional UPDATE. Internal, like POST /reservations.
    todo("step 2: DELETE /reservations/{order_id}")


def create_app(
    settings: Settings | None = None,
    *,
    users_transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the catalog service. With no settings, they are read from the environment.
    `users_transport` stands in for the network to the users service (its JWKS) in tests;
    the app's spans come from `tracer_provider`."""
    settings = settings or Settings()
    tracer = service_tracer("catalog", tracer_provider)
    engine = create_async_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with service_client(tracer, settings.users_url, users_transport) as users:
            app.state.users = users
            # TODO (step 2): app.state.public_keys: the users service's public keys, fetched from
            #   its JWKS through this client and cached (README: "Tokens").
            yield
        await engine.dispose()

    app = FastAPI(title="catalog", lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="catalog", tracer=tracer)
    app.include_router(health_router("catalog"))
    app.include_router(router)
    return app
