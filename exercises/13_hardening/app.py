"""Exercise 13: harden the catalogue service.

Read README.md in this folder for the full task. Run `pytest exercises/13_hardening`
(or `grader check 13`) to see what is still missing.

The catalogue itself (models, routes, the summary) works already. What is missing is
everything that keeps it safe and cheap to run in front of real browsers and real traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, TypeAdapter
from pydantic_settings import BaseSettings, SettingsConfigDict

# Given (the same file in every exercise from 04 on): every error is a problem (RFC 9457).
# problem_response(request, status, detail, headers=...) builds one where no handler runs
# (in a middleware: request = Request(scope)); unexpected_problem(request, exc) is the 500.
from .problems import install_problem_details, problem_response, problem_responses, unexpected_problem  # noqa: F401

Clock = Callable[[], float]

# ----------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARD_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    cors_origins: list[str] = ["http://localhost:3000"]
    cors_allow_credentials: bool = True
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    rate_limit_capacity: int = Field(default=60, gt=0)
    rate_limit_refill_per_second: float = Field(default=10.0, gt=0)
    rate_limit_max_clients: int = Field(default=10_000, gt=0)
    gzip_minimum_size: int = Field(default=1000, ge=0)
    summary_ttl_seconds: float = Field(default=30.0, gt=0)

    # TODO: refuse "*" in cors_origins while cors_allow_credentials is true
    #       (a @model_validator(mode="after") that raises ValueError).


@lru_cache
def get_settings() -> Settings:
    return Settings()


# ----------------------------------------------------------------------------- the catalogue


class ProductIn(BaseModel):
    # TODO: bounded, finite JSON numbers (README, point 9): one product with price 1e309 or a
    #       huge stock must not be able to break GET /reports/summary for everyone.
    name: str = Field(min_length=1, max_length=100)
    price: float = Field(gt=0)
    stock: int = Field(ge=0)


class Product(ProductIn):
    id: int


PRODUCT_LIST = TypeAdapter(list[Product])


def seed_products() -> dict[int, Product]:
    return {
        n: Product(id=n, name=f"Product {n:03d} of the spring catalogue", price=round(2.5 * n, 2), stock=10 + n % 7)
        for n in range(1, 41)
    }


async def build_summary(products: list[Product]) -> dict[str, Any]:
    # Stands in for an expensive call (a slow aggregate query, a call to another service).
    return {
        "products": len(products),
        "total_stock": sum(p.stock for p in products),
        "stock_value": round(sum(p.price * p.stock for p in products), 2),
    }


# ----------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, *, clock: Clock = time.monotonic) -> FastAPI:
    """Build the app. `clock` returns seconds (monotonic): use it for rate limits and the cache."""
    settings = settings or get_settings()
    app = FastAPI(title="Hardened catalogue", version="1.2.0")
    install_problem_details(app)  # given: the errors of routes, FastAPI and Starlette are problems
    products = seed_products()

    # TODO: middleware: security headers (on a 500 too), CORS from settings (a refused preflight
    #       is a problem), GZip above settings.gzip_minimum_size, a body size limit of
    #       settings.max_body_bytes (413 problem), and the rate limit (README, point 4: every
    #       request but /health, before the body is read, at most settings.rate_limit_max_clients
    #       buckets; a 429 problem with Retry-After).
    # TODO: responses=problem_responses(...) on every route: each error it can answer (README, point 8).

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    api = APIRouter()

    @api.get("/products")
    async def list_products(request: Request) -> Response:
        # TODO: an ETag, and 304 Not Modified when If-None-Match matches it.
        return Response(PRODUCT_LIST.dump_json(list(products.values())), media_type="application/json")

    @api.get("/products/{product_id}")
    async def read_product(product_id: int) -> Product:
        product = products.get(product_id)
        if product is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"Product {product_id} not found.")
        return product

    @api.post("/products", status_code=status.HTTP_201_CREATED)
    async def create_product(payload: ProductIn, response: Response) -> Product:
        product = Product(id=max(products, default=0) + 1, **payload.model_dump())
        products[product.id] = product
        response.headers["Location"] = f"/products/{product.id}"
        return product

    @api.get("/reports/summary")
    async def summary(response: Response) -> dict[str, Any]:
        # TODO: cache for settings.summary_ttl_seconds (X-Cache: hit or miss), invalidated on write.
        return await build_summary(list(products.values()))

    @api.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    app.include_router(api)
    return app


app = create_app()
