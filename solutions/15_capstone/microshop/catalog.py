"""The catalog service: products, their stock, and reservations of stock for orders.

    uvicorn microshop.catalog:create_app --factory --port 8002

A reservation is keyed by the order ID that the orders service chose, which makes both
calls safe to repeat: reserving twice for one order reserves once, releasing twice releases once.
They are also safe to *race*: the same reservation twice at once, or a reservation and its
release at once, leave every unit either on the shelf or in exactly one held reservation.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, FastAPI, HTTPException, Response, Security, status
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, String, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    SERVICE_ONLY,
    Principal,
    PublicKeys,
    RequestContextMiddleware,
    SessionDep,
    UTCDateTime,
    create_engine,
    current_principal,
    health_router,
    jwks_from,
    service_client,
    service_tracer,
    utcnow,
)
from .problems import install_problem_details, problem_responses

SKU = Annotated[str, Field(pattern=r"^[A-Z0-9-]{3,20}$")]
MAX_ORDER_ID = 64
OrderId = Annotated[str, Field(min_length=1, max_length=MAX_ORDER_ID)]
# Upper bounds keep every number inside SQLite's 64-bit integers, including the totals built
# from them: 20 lines x 100 units x MAX_PRICE_CENTS is far below 2**63.
MAX_PRICE_CENTS = 100_000_000
MAX_STOCK = 1_000_000


class Settings(BaseSettings):
    """CATALOG_DATABASE_URL, CATALOG_USERS_URL, ... (prefix CATALOG_)."""

    model_config = SettingsConfigDict(env_prefix="CATALOG_")

    database_url: str = "sqlite+aiosqlite:///./catalog.db"
    users_url: str = "http://127.0.0.1:8001"  # where the public keys are: {users_url}/.well-known/jwks.json
    users_timeout: float = Field(2.0, gt=0, le=30)
    # An unknown kid fetches the JWKS again (a rotated key), at most this often.
    jwks_refresh_seconds: float = Field(30.0, ge=0, le=3600)


# ---------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int]
    stock: Mapped[int]


class Reservation(Base):
    __tablename__ = "reservations"

    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(10))  # "held" or "released"
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    total_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---------------------------------------------------------------------------------------
# The HTTP contract
# ---------------------------------------------------------------------------------------


class ProductIn(BaseModel):
    sku: SKU
    name: Annotated[str, Field(min_length=1, max_length=100)]
    price_cents: Annotated[int, Field(gt=0, le=MAX_PRICE_CENTS)]
    stock: Annotated[int, Field(ge=0, le=MAX_STOCK)]


class ProductOut(ProductIn):
    model_config = ConfigDict(from_attributes=True)


class Line(BaseModel):
    sku: SKU
    quantity: Annotated[int, Field(ge=1, le=100)]


class ReservationIn(BaseModel):
    order_id: OrderId
    items: Annotated[list[Line], Field(min_length=1, max_length=20)]


class ReservedLine(Line):
    price_cents: int


class ReservationOut(BaseModel):
    order_id: str
    status: str
    items: list[ReservedLine]
    total_cents: int


def reservation_out(reservation: Reservation) -> ReservationOut:
    return ReservationOut(
        order_id=reservation.order_id,
        status=reservation.status,
        items=[ReservedLine(**line) for line in reservation.lines],
        total_cents=reservation.total_cents,
    )


router = APIRouter()


@router.post(
    "/products", status_code=status.HTTP_201_CREATED, tags=["products"], responses=problem_responses(400, 401, 403, 409, 503)
)
async def create_product(
    body: ProductIn,
    response: Response,
    session: SessionDep,
    _: Annotated[Principal, Security(current_principal, scopes=["catalog:write"])],
) -> ProductOut:
    product = Product(**body.model_dump())
    session.add(product)
    try:
        await session.commit()
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"product {body.sku} already exists") from None
    response.headers["Location"] = f"/products/{product.sku}"
    return ProductOut.model_validate(product)


@router.get("/products", tags=["products"])
async def list_products(session: SessionDep) -> list[ProductOut]:
    products = await session.scalars(select(Product).order_by(Product.sku))
    return [ProductOut.model_validate(p) for p in products]


@router.get("/products/{sku}", tags=["products"], responses=problem_responses(404))
async def read_product(sku: str, session: SessionDep) -> ProductOut:
    product = await session.get(Product, sku)
    if product is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown product {sku}")
    return ProductOut.model_validate(product)


# Both internal routes start with an INSERT ... ON CONFLICT DO NOTHING of the order's row. Two
# things follow. The unique order ID settles every race: of two requests for one order, exactly
# one inserts the row and the other finds it; no IntegrityError to catch, no 500. And on SQLite
# that first statement takes the database's write lock for the whole transaction, so the stock
# updates that follow never interleave with another reservation's or release's.


@router.post(
    "/reservations",
    status_code=status.HTTP_201_CREATED,
    tags=["internal"],
    summary="Reserve stock for an order, all lines or none (not routed by the gateway)",
    dependencies=SERVICE_ONLY,
    responses={200: {"description": "The same order ID again: the reservation made before"}} | problem_responses(400, 401, 404, 409, 503),
)
async def reserve(body: ReservationIn, response: Response, session: SessionDep) -> ReservationOut:
    wanted: dict[str, int] = {}
    for line in body.items:
        wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
    async with session.begin():  # commits at the end; an exception rolls back every statement
        claimed = await session.execute(
            insert(Reservation)
            .values(order_id=body.order_id, status="held", lines=[], total_cents=0, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=[Reservation.order_id])
        )
        if claimed.rowcount == 0:  # reserved (or released) before: answer as then, take nothing
            existing = await session.get(Reservation, body.order_id)
            if existing is None or existing.status == "released":
                raise HTTPException(status.HTTP_409_CONFLICT, detail=f"reservation {body.order_id} was released")
            response.status_code = status.HTTP_200_OK
            return reservation_out(existing)
        lines = []
        for sku, quantity in sorted(wanted.items()):
            # Check and decrement in one statement: two orders racing for the last unit cannot
            # both see "1 left". Raising here rolls back the lines so far and the claimed row.
            price = await session.scalar(
                update(Product)
                .where(Product.sku == sku, Product.stock >= quantity)
                .values(stock=Product.stock - quantity)
                .returning(Product.price_cents)
            )
            if price is None:
                if await session.get(Product, sku) is None:
                    raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown product {sku}")
                raise HTTPException(status.HTTP_409_CONFLICT, detail=f"insufficient stock for {sku}")
            lines.append({"sku": sku, "quantity": quantity, "price_cents": price})
        total = sum(line["quantity"] * line["price_cents"] for line in lines)
        await session.execute(
            update(Reservation).where(Reservation.order_id == body.order_id).values(lines=lines, total_cents=total)
        )
    return ReservationOut(
        order_id=body.order_id, status="held", items=[ReservedLine(**line) for line in lines], total_cents=total
    )


@router.delete(
    "/reservations/{order_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["internal"],
    summary="Release an order's stock; safe to repeat (not routed by the gateway)",
    dependencies=SERVICE_ONLY,
    responses=problem_responses(401, 503),
)
async def release(order_id: str, session: SessionDep) -> None:
    if len(order_id) > MAX_ORDER_ID:
        # No reservation has such an ID (POST /reservations refuses it): unknown, so 204 like
        # every unknown ID, and nothing to remember, since no reservation can ever take it.
        # A 422 here would tell a compensating caller that its release failed, and it would retry.
        return
    async with session.begin():
        tombstone = await session.execute(
            insert(Reservation)
            .values(order_id=order_id, status="released", lines=[], total_cents=0, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=[Reservation.order_id])
        )
        if tombstone.rowcount == 1:
            # Released before it was ever made (the reservation request may still be on its
            # way): the tombstone makes a late reservation for this order a 409.
            return
        # Held -> released in one conditional statement: of two releases, one gets the lines back.
        lines = await session.scalar(
            update(Reservation)
            .where(Reservation.order_id == order_id, Reservation.status == "held")
            .values(status="released")
            .returning(Reservation.lines)
        )
        for line in lines or []:
            await session.execute(
                update(Product).where(Product.sku == line["sku"]).values(stock=Product.stock + line["quantity"])
            )


# ---------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    users_transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the catalog service. With no settings, they are read from the environment.
    `users_transport` replaces the network to the users service (its JWKS), in tests; the
    app's spans come from `tracer_provider` (tests pass one with an in-memory exporter)."""
    settings = settings or Settings()
    tracer = service_tracer("catalog", tracer_provider)
    engine = create_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with service_client(tracer, settings.users_url, users_transport, timeout=settings.users_timeout) as users:
            app.state.public_keys = PublicKeys(jwks_from(users, settings.users_timeout), settings.jwks_refresh_seconds)
            yield
        await engine.dispose()

    app = FastAPI(title="catalog", version="1.0.0", responses=problem_responses(422), lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="catalog", tracer=tracer)
    app.include_router(health_router("catalog"))
    app.include_router(router)
    return app
