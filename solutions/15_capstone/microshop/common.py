"""What every service of the shop shares: request IDs and access logs, tokens and scopes,
the service credential of the internal routes, database sessions, the health route and the
event contract. Errors are problem details: `problems.py`, given, the same in every service.

This is shared *code*, not shared state: each service imports its own copy and runs in its
own process, with its own database. Services only talk to each other over HTTP.
"""

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import jwt
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, TypeDecorator, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# ---------------------------------------------------------------------------------------
# Request IDs: one ID follows a request through every service it touches
# ---------------------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
# Nothing that could forge a log line. fullmatch, not match with ^...$: "$" also matches
# before a trailing newline, so match would let "abc\n" through.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_id: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def outgoing_headers() -> dict[str, str]:
    """Headers for a call to another service: the current request ID travels along."""
    request_id = current_request_id()
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


class RequestContextMiddleware:
    """Adopts or creates the request ID, returns it in a header and logs one JSON line per request.

    A pure ASGI middleware: the context variable stays set for the whole request, including
    background tasks that run after the response has been sent.
    """

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self.logger = logging.getLogger(f"microshop.{service}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status_code = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.logger.info(json.dumps({
                "service": self.service,
                "request_id": request_id,
                "method": scope["method"],
                # the route template, not the raw path: bounded, groupable
                "route": getattr(route, "path", "unmatched"),
                "status": status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }))
            _request_id.reset(token)


# ---------------------------------------------------------------------------------------
# Tokens and scopes
# ---------------------------------------------------------------------------------------

ALGORITHM = "HS256"
ISSUER = "microshop-users"
SCOPES = {
    "orders:read": "Read your orders",
    "orders:write": "Place orders",
    "catalog:write": "Create products",
}


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)

    username: str
    scopes: frozenset[str]


def issue_token(secret: str, username: str, scopes: Iterable[str], ttl: timedelta) -> str:
    now = datetime.now(timezone.utc)
    claims = {"sub": username, "scope": " ".join(sorted(scopes)), "iss": ISSUER, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# The token is issued by the users service; clients get it through the gateway.
bearer = OAuth2PasswordBearer(tokenUrl="/api/token", scopes=SCOPES)


async def current_principal(
    security_scopes: SecurityScopes,
    request: Request,
    token: Annotated[str, Depends(bearer)],
) -> Principal:
    """Who is calling, with which scopes. Each service checks tokens itself: no trust by position."""
    try:
        claims = jwt.decode(
            token,
            request.app.state.jwt_secret,
            algorithms=[ALGORITHM],  # pinned: never let the token choose its algorithm
            issuer=ISSUER,
            options={"require": ["sub", "exp", "iss"]},
        )
    except jwt.InvalidTokenError:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="invalid or expired token",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None
    principal = Principal(username=claims["sub"], scopes=frozenset(str(claims.get("scope", "")).split()))
    missing = sorted(set(security_scopes.scopes) - principal.scopes)
    if missing:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"missing scope: {' '.join(missing)}",
            headers={"WWW-Authenticate": f'Bearer scope="{security_scopes.scope_str}"'},
        )
    return principal


# ---------------------------------------------------------------------------------------
# The service credential: internal routes answer only the shop's own services
# ---------------------------------------------------------------------------------------

# The gateway does not route to /reservations, /events or /outbox/..., but hiding is not
# protecting: anyone who reaches a service directly (a neighbour on the network, a gateway bug)
# could call them. So they also demand a credential that only the services hold: one shared
# internal token from the settings, sent as "Authorization: Bearer <token>".
service_bearer = HTTPBearer(
    scheme_name="ServiceToken",
    description="The internal token that the shop's services share (settings: internal_token)",
    auto_error=False,
)


async def require_service(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(service_bearer)],
) -> None:
    """Let a request through only when it carries the internal token."""
    expected: bytes = request.app.state.internal_token
    presented = credentials.credentials.encode() if credentials is not None else b""
    # compare_digest takes as long for a near miss as for a far one: timing does not tell an
    # attacker how many leading characters they guessed right.
    if not hmac.compare_digest(presented, expected):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="this route is for the shop's services only",
            headers={"WWW-Authenticate": "Bearer"},
        )


SERVICE_ONLY = [Depends(require_service)]  # dependencies=SERVICE_ONLY on every internal route


def service_headers(internal_token: str) -> dict[str, str]:
    """The header a service sends with its calls to another service's internal routes."""
    return {"Authorization": f"Bearer {internal_token}"}


# ---------------------------------------------------------------------------------------
# Database sessions and health
# ---------------------------------------------------------------------------------------


def create_engine(database_url: str) -> AsyncEngine:
    """The engine of a service's own SQLite database, set for many requests at once.

    WAL (write-ahead logging): readers go on while one writer writes, and a commit appends to
    the log instead of rewriting the database. synchronous=NORMAL: a commit does not wait for
    the disk; a power cut may lose the last commits, never corrupt the file. That is the usual
    choice for a web service on SQLite: a commit costs microseconds, not milliseconds, so the
    one writer SQLite allows holds its lock for less time, and the others wait less.
    """
    engine = create_async_engine(database_url)

    @event.listens_for(engine.sync_engine, "connect")
    def configure(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, from the sessionmaker the app's lifespan created."""
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on any database: SQLite stores no offset, so store UTC and
    give the offset back on the way out."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


def health_router(service: str) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": service}

    return router


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------


# SQLite stores integers in 64 bits. A number past that is not a big number to it but an error
# (OverflowError, a 500), so every integer a client sends has an upper bound in its schema.
INT64_MAX = 2**63 - 1
MAX_ORDER_TOTAL_CENTS = 10**12  # 20 lines x 100 units x the catalog's highest price, with room


class OrderPlaced(BaseModel):
    """Published by orders once an order is stored; consumed by users for its read model.

    `event_id` identifies the event, not the delivery: a redelivered event has the same ID,
    which is how a consumer recognises it.
    """

    event_id: str = Field(min_length=1, max_length=64)
    type: Literal["OrderPlaced"] = "OrderPlaced"
    order_id: str = Field(min_length=1, max_length=64)
    username: str = Field(min_length=1, max_length=32)
    total_cents: int = Field(ge=0, le=MAX_ORDER_TOTAL_CENTS)
    occurred_at: datetime


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
