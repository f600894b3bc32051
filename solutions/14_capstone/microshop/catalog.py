"""The catalog service: products, their stock, and reservations of stock for orders.

    uvicorn microshop.catalog:create_app --factory --port 8002

A reservation is keyed by the order ID that the orders service chose, which makes both
calls safe to repeat: reserving twice for one order reserves once, releasing twice releases once.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Response, Security, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, String, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import Principal, RequestContextMiddleware, SessionDep, UTCDateTime, current_principal, health_router, utcnow

SKU = Annotated[str, Field(pattern=r"^[A-Z0-9-]{3,20}$")]


class Settings(BaseSettings):
    """CATALOG_DATABASE_URL, CATALOG_JWT_SECRET (environment variables, prefix CATALOG_)."""

    model_config = SettingsConfigDict(env_prefix="CATALOG_")

    database_url: str = "sqlite+aiosqlite:///./catalog.db"
    jwt_secret: SecretStr = Field(min_length=32)


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
    price_cents: Annotated[int, Field(gt=0)]
    stock: Annotated[int, Field(ge=0)]


class ProductOut(ProductIn):
    model_config = ConfigDict(from_attributes=True)


class Line(BaseModel):
    sku: SKU
    quantity: Annotated[int, Field(ge=1, le=100)]


class ReservationIn(BaseModel):
    order_id: Annotated[str, Field(min_length=1, max_length=64)]
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


@router.post("/products", status_code=status.HTTP_201_CREATED, tags=["products"])
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


@router.get("/products/{sku}", tags=["products"])
async def read_product(sku: str, session: SessionDep) -> ProductOut:
    product = await session.get(Product, sku)
    if product is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown product {sku}")
    return ProductOut.model_validate(product)


@router.post(
    "/reservations",
    status_code=status.HTTP_201_CREATED,
    tags=["internal"],
    summary="Reserve stock for an order, all lines or none (not routed by the gateway)",
)
async def reserve(body: ReservationIn, response: Response, session: SessionDep) -> ReservationOut:
    async with session.begin():
        existing = await session.get(Reservation, body.order_id)
        if existing is not None:
            if existing.status == "released":
                raise HTTPException(status.HTTP_409_CONFLICT, detail=f"reservation {body.order_id} was released")
            response.status_code = status.HTTP_200_OK  # a retry: same answer, no second reservation
            return reservation_out(existing)
        wanted: dict[str, int] = {}
        for line in body.items:
            wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
        lines = []
        for sku, quantity in sorted(wanted.items()):
            # Check and decrement in one statement: two orders racing for the last unit cannot
            # both see "1 left". Raising inside `session.begin()` rolls back every line so far.
            result = await session.execute(
                update(Product)
                .where(Product.sku == sku, Product.stock >= quantity)
                .values(stock=Product.stock - quantity)
            )
            product = await session.get(Product, sku)
            if product is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown product {sku}")
            if result.rowcount != 1:
                raise HTTPException(status.HTTP_409_CONFLICT, detail=f"insufficient stock for {sku}")
            lines.append({"sku": sku, "quantity": quantity, "price_cents": product.price_cents})
        reservation = Reservation(
            order_id=body.order_id,
            status="held",
            lines=lines,
            total_cents=sum(line["quantity"] * line["price_cents"] for line in lines),
        )
        session.add(reservation)
    return reservation_out(reservation)


@router.delete(
    "/reservations/{order_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["internal"],
    summary="Release an order's stock; safe to repeat (not routed by the gateway)",
)
async def release(order_id: str, session: SessionDep) -> None:
    async with session.begin():
        reservation = await session.get(Reservation, order_id)
        if reservation is None:
            # Released before it was ever made (the reservation request may still be on its
            # way): leave a tombstone so that a late reservation for this order is refused.
            session.add(Reservation(order_id=order_id, status="released", lines=[], total_cents=0))
        elif reservation.status == "held":
            for line in reservation.lines:
                await session.execute(
                    update(Product).where(Product.sku == line["sku"]).values(stock=Product.stock + line["quantity"])
                )
            reservation.status = "released"


# ---------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the catalog service. With no settings, they are read from the environment."""
    settings = settings or Settings()
    engine = create_async_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(title="catalog", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.jwt_secret = settings.jwt_secret.get_secret_value()
    app.add_middleware(RequestContextMiddleware, service="catalog")
    app.include_router(health_router("catalog"))
    app.include_router(router)
    return app
