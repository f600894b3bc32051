"""Lesson 13 reference: CORS, security headers, body limits, rate limits, caching, safe errors."""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, Any, Self

from fastapi import APIRouter, FastAPI, HTTPException, Path, Request, Response, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from pydantic import BaseModel, Field, TypeAdapter, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Given (the same file in every exercise from 04 on): every error is a problem (RFC 9457).
from .problems import install_problem_details, problem_response, problem_responses, unexpected_problem

Clock = Callable[[], float]

# --------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    """Everything an operator may tune, from HARD_* environment variables or a .env file."""

    model_config = SettingsConfigDict(env_prefix="HARD_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # A list in the environment is JSON: HARD_CORS_ORIGINS='["https://shop.example"]'
    cors_origins: list[str] = ["http://localhost:3000"]
    cors_allow_credentials: bool = True
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    rate_limit_capacity: int = Field(default=60, gt=0)
    rate_limit_refill_per_second: float = Field(default=10.0, gt=0)
    rate_limit_max_clients: int = Field(default=10_000, gt=0)
    gzip_minimum_size: int = Field(default=1000, ge=0)
    summary_ttl_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def no_wildcard_with_credentials(self) -> Self:
        # Browsers ignore "Access-Control-Allow-Origin: *" on credentialed requests, and
        # Starlette "fixes" that by echoing any origin back, which lets every site on the web
        # call the API with the user's cookies. Refuse the combination outright.
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("cors_origins cannot contain '*' while cors_allow_credentials is true; list the origins")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


# --------------------------------------------------------------------------- security headers

# Sent on every response, a 500 included (SecurityHeadersMiddleware answers that one itself).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # frame-ancestors is the modern X-Frame-Options. A stricter default-src 'none' suits a pure
    # JSON API but would break the /docs page, which loads scripts and styles.
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    # Browsers only honour HSTS over HTTPS; behind a TLS-terminating proxy that is what they see.
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
}


# --------------------------------------------------------------------------- middleware


class CORSMiddlewareWithProblems(CORSMiddleware):
    """Starlette's CORS, but a refused preflight is a problem like every other error."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await super().__call__(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if "origin" not in headers or "access-control-request-method" not in headers:
            await super().__call__(scope, receive, send)  # not a preflight: the app answers it
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code >= 400:
            # Starlette explains the refusal in plain text ("Disallowed CORS origin"); keep its
            # reason and its headers (never an Allow-Origin for a refused origin), as a problem.
            kept = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
            reason = bytes(response.body).decode() + "."
            response = problem_response(Request(scope), response.status_code, reason, headers=kept)
        await response(scope, receive, send)


class SecurityHeadersMiddleware:
    """The security headers on every response, and the 500 of an unexpected exception answered
    here, so that it carries them too (Starlette's outermost ServerErrorMiddleware, which would
    send it otherwise, is outside every middleware of ours)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)  # a route may set a stricter value itself
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            if not started:  # the given 500 problem: it says nothing about the exception
                response = await unexpected_problem(Request(scope), exc)
                await response(scope, receive, send_with_headers)
            raise  # the server logs the traceback; the client has its answer already


class BodySizeLimitMiddleware:
    """Refuse request bodies above `max_bytes`, whether or not the client declared their size."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"The request body exceeds {self.max_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # Cheap early refusal when the client says how much it will send...
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(Request(scope), status.HTTP_413_CONTENT_TOO_LARGE, self._too_large())
            await response(scope, receive, send)
            return

        # ...and counting for a chunked body, which has no Content-Length at all.
        received = 0
        more_body = declared is None  # a declared length within the limit needs no count
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, more_body
            message = await receive()
            more_body = message.get("more_body", False)  # an http.disconnect ends the body too
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: FastAPI re-raises HTTPException as is,
                    # and the given handler turns it into a problem.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._too_large())
            return message

        async def send_after_the_body(message: Message) -> None:
            # A route that never reads the body (a GET, an unknown path's 404) would answer a
            # chunked body of any size. Before its answer goes out, read what it left, at most up
            # to the limit, and refuse an oversized body with the same 413 as a declared one.
            nonlocal refused
            if message["type"] == "http.response.start":
                try:
                    while more_body:
                        await counting_receive()
                except HTTPException:
                    refused = True
                    await problem_response(Request(scope), status.HTTP_413_CONTENT_TOO_LARGE, self._too_large())(
                        scope, receive, send
                    )
            if not refused:  # the route's own answer is dropped once the 413 went out instead
                await send(message)

        await self.app(scope, counting_receive, send_after_the_body)


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """A token bucket per client: `capacity` requests in a burst, refilled at `rate` per second.

    At most `max_clients` buckets are kept, least recently seen first out, so that a flood of
    new addresses costs bounded memory and O(1) per check. A forgotten client comes back with a
    full bucket, which is what it would have after a short wait anyway.

    The state lives in this process. With several replicas each would allow the full rate, so
    a shared store (Redis) has to hold the buckets instead; see the lesson.
    """

    def __init__(self, capacity: int, rate: float, clock: Clock, max_clients: int) -> None:
        self.capacity = capacity
        self.rate = rate
        self.clock = clock
        self.max_clients = max_clients
        # key -> (tokens, last update), in the order the clients were last seen.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until one is available."""
        # No await in here, so no other request can interleave between the read and the write.
        now = self.clock()
        # pop, then store again: the client moves to the most recently seen end, in O(1).
        tokens, updated = self._buckets.pop(key, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - updated) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0.0 else tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # the least recently seen client
        return wait


class RateLimitMiddleware:
    """Every request but the exempt paths takes a token first, before anything reads its body.

    A dependency would be too late: FastAPI reads and parses the body before it runs any
    dependency, so a flood of malformed JSON (422) or of unknown paths (404) would never be
    counted.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limiter = limiter
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        # The peer address. Behind a proxy, run uvicorn with --proxy-headers and
        # --forwarded-allow-ips so that this is the real client, not the proxy.
        client = scope.get("client")
        wait = self.limiter.acquire(client[0] if client else "unknown")
        if wait > 0:
            response = problem_response(
                Request(scope),
                status.HTTP_429_TOO_MANY_REQUESTS,
                "Too many requests; slow down.",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- caching


class TTLCache:
    """Remember values for `ttl` seconds; `invalidate` forgets them at once (after a write)."""

    def __init__(self, ttl: float, clock: Clock) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self.clock():
            self._entries.pop(key, None)
            return None
        return entry[1]

    def set(self, key: str, value: Any) -> None:
        self._entries[key] = (self.clock() + self.ttl, value)

    def invalidate(self, key: str | None = None) -> None:
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/"x" and "x" match; the header may list several."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag.removeprefix("W/") in wanted


# --------------------------------------------------------------------------- the catalogue


MAX_ID = 2**31 - 1
MAX_PRICE = 1_000_000
MAX_STOCK = 1_000_000


class ProductIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    # Finite and bounded: 1e309 is infinity to Python's json, and one infinite or huge value
    # would make every later summary infinite, or a 500 when it is written as JSON.
    price: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False)
    stock: int = Field(ge=0, le=MAX_STOCK)

    @field_validator("price", "stock", mode="before")
    @classmethod
    def a_json_number(cls, value: object) -> object:
        # Pydantic's lax mode would read "inf" or "12" from a string and 1 from true; the
        # schema promises a JSON number. (strict=True would also refuse 3.0 for the stock,
        # which JSON Schema counts as an integer.)
        if isinstance(value, (str, bool)):
            raise ValueError("must be a JSON number, not a string or a boolean")
        return value


class Product(ProductIn):
    id: int


PRODUCT_LIST = TypeAdapter(list[Product])


def seed_products() -> dict[int, Product]:
    return {
        n: Product(id=n, name=f"Product {n:03d} of the spring catalogue", price=round(2.5 * n, 2), stock=10 + n % 7)
        for n in range(1, 41)
    }


async def build_summary(products: list[Product]) -> dict[str, Any]:
    # Stands in for the expensive call (a slow aggregate query, a call to another service).
    # Every term is at most MAX_PRICE * MAX_STOCK (1e12), so no number of products can push the
    # sum past a float's range; fsum adds them without piling up rounding errors.
    return {
        "products": len(products),
        "total_stock": sum(p.stock for p in products),
        "stock_value": round(math.fsum(p.price * p.stock for p in products), 2),
    }


# --------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, *, clock: Clock = time.monotonic) -> FastAPI:
    """Build the app; `clock` (seconds, monotonic) drives the rate limiter and the cache."""
    settings = settings or get_settings()
    app = FastAPI(title="Hardened catalogue", version="1.3.0")
    # Every error is a problem (lesson 3): the given handlers, for ours, FastAPI's and Starlette's.
    install_problem_details(app)
    limiter = RateLimiter(
        settings.rate_limit_capacity, settings.rate_limit_refill_per_second, clock, settings.rate_limit_max_clients
    )
    products = seed_products()
    cache = TTLCache(settings.summary_ttl_seconds, clock)

    # add_middleware puts each new one outside the previous: the last added runs first.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_minimum_size)
    # Outside the body limit, so that a flood of oversized bodies is counted too; inside CORS,
    # so that a 429 carries the CORS headers a browser script needs to read it. Preflights are
    # answered by CORS before it: one costs no more than the 429 that would refuse it.
    # /health is exempt: a throttled probe would get a healthy replica restarted.
    app.add_middleware(RateLimitMiddleware, limiter=limiter, exempt=frozenset({"/health"}))
    app.add_middleware(
        CORSMiddlewareWithProblems,
        allow_origins=settings.cors_origins,
        allow_credentials=settings.cors_allow_credentials,
        allow_methods=["GET", "POST"],
        allow_headers=["Content-Type", "Authorization", "If-None-Match"],
        # Without this a browser script cannot read these headers on a cross-origin response.
        expose_headers=["ETag", "Retry-After", "X-Cache"],
        max_age=600,
    )
    app.add_middleware(SecurityHeadersMiddleware)

    # Every route can answer 413 (the body limit runs before routing); all but /health 429.
    @app.get("/health", tags=["ops"], responses=problem_responses(413))
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    api = APIRouter(responses=problem_responses(413, 429))

    @api.get(
        "/products",
        tags=["products"],
        responses={
            200: {"model": list[Product], "description": "The products"},
            304: {"description": "The client's copy (If-None-Match) is current"},
        },
    )
    async def list_products(request: Request) -> Response:
        body = PRODUCT_LIST.dump_json(list(products.values()))
        # Weak: the same content may go out gzip-compressed or not, byte-for-byte different.
        etag = f'W/"{hashlib.sha256(body).hexdigest()[:32]}"'
        # no-cache: a client may keep the copy but must revalidate it, which costs a 304.
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @api.get("/products/{product_id}", tags=["products"], responses=problem_responses(404, 422))
    async def read_product(product_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> Product:
        product = products.get(product_id)
        if product is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"Product {product_id} not found.")
        return product

    # 400: FastAPI's own answer to a body that cannot be decoded at all (not UTF-8).
    @api.post("/products", status_code=status.HTTP_201_CREATED, tags=["products"], responses=problem_responses(400, 422))
    async def create_product(payload: ProductIn, response: Response) -> Product:
        product = Product(id=max(products, default=0) + 1, **payload.model_dump())
        products[product.id] = product
        # The summary is now wrong: drop it rather than serve a stale one for up to a TTL.
        cache.invalidate("summary")
        response.headers["Location"] = f"/products/{product.id}"
        return product

    @api.get("/reports/summary", tags=["reports"])
    async def summary(response: Response) -> dict[str, Any]:
        cached = cache.get("summary")
        if cached is None:
            cached = await build_summary(list(products.values()))
            cache.set("summary", cached)
            response.headers["X-Cache"] = "miss"
        else:
            response.headers["X-Cache"] = "hit"
        return cached

    @api.post("/upload", tags=["files"])
    async def upload(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():  # the body size limit applies while streaming
            size += len(chunk)
        return {"size": size}

    app.include_router(api)
    return app


app = create_app()
