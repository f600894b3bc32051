"""What every service of the shop shares. Read README.md for the contracts.

Shared *code*, not shared state: each service runs in its own process with its own copy.
Some plumbing is done for you (sessions, timezone-aware datetimes, the event model);
the TODOs are yours.
"""

import re
import uuid
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal, NoReturn

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Receive, Scope, Send


def todo(what: str) -> NoReturn:
    """Answer 501 Not Implemented: the route exists, its step is not done yet."""
    raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, detail=f"TODO: {what}")


# ---------------------------------------------------------------------------------------
# Request IDs (step 6)
# ---------------------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # use .fullmatch: all of it, up to its end
_request_id: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def outgoing_headers() -> dict[str, str]:
    """Headers for a call to another service."""
    # TODO (step 6): {"X-Request-ID": <the current request ID>} when there is one.
    return {}


class RequestContextMiddleware:
    """A pure ASGI middleware, added to every service with `service=<its name>`."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # TODO (step 6): for HTTP requests, adopt the incoming X-Request-ID when it fully matches
        #   VALID_REQUEST_ID (VALID_REQUEST_ID.fullmatch(...)), else make one (uuid.uuid4().hex); keep it in _request_id while the
        #   request runs; add it to the response headers (wrap `send`, edit the
        #   "http.response.start" message); reset the context variable afterwards.
        #   Optional: log one JSON line per request (method, route, status, duration, request ID).
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------
# Tokens and scopes (steps 1 and 2)
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
    """A signed JWT with the claims of README.md: sub, scope, iss, iat, exp."""
    # TODO (step 1): jwt.encode(...) with ALGORITHM. "scope" is the scopes joined by spaces.
    raise NotImplementedError("TODO (step 1): issue_token")


bearer = OAuth2PasswordBearer(tokenUrl="/api/token", scopes=SCOPES)


async def current_principal(
    security_scopes: SecurityScopes,
    request: Request,
    token: Annotated[str, Depends(bearer)],
) -> Principal:
    """Who calls, with which scopes. Used as Security(current_principal, scopes=[...])."""
    # TODO (step 1): decode with request.app.state.jwt_secret, algorithms pinned to [ALGORITHM],
    #   the issuer checked and sub/exp/iss required. Invalid or expired -> 401 with
    #   WWW-Authenticate: Bearer. A scope in security_scopes.scopes that the token lacks -> 403.
    todo("step 1: check the bearer token and its scopes")


# ---------------------------------------------------------------------------------------
# The service credential of the internal routes (README: "What every service has")
# ---------------------------------------------------------------------------------------


async def require_service(request: Request) -> None:
    """Use as dependencies=[Depends(require_service)] on every internal route."""
    # TODO: let the request through only when it carries "Authorization: Bearer <internal
    #   token>", the token in request.app.state.internal_token (bytes). Compare with
    #   hmac.compare_digest, never ==. Otherwise 401 with WWW-Authenticate: Bearer.
    todo("the service credential")


# Errors are problem details: problems.py is given (the same file as in lesson 4 on). Every
# create_app calls install_problem_details(app); a route raises HTTPException or
# ProblemError(status, detail, ...) and declares its errors with responses=problem_responses(...).
# Its 422 already keeps "loc", "msg" and "type" and never the value that was sent.


# ---------------------------------------------------------------------------------------
# Database plumbing (done for you)
# ---------------------------------------------------------------------------------------


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, from the sessionmaker the app stored in app.state.sessions."""
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on SQLite, which stores no offset: UTC in, UTC out."""

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


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------
# Health (step 6) and the event contract (step 5)
# ---------------------------------------------------------------------------------------


def health_router(service: str) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        # TODO (step 6): also say which service answers: {"status": "ok", "service": service}
        return {"status": "ok"}

    return router


class OrderPlaced(BaseModel):
    """Published by orders once an order is stored; consumed by users (POST /events)."""

    event_id: str = Field(min_length=1, max_length=64)
    type: Literal["OrderPlaced"] = "OrderPlaced"
    order_id: str = Field(min_length=1, max_length=64)
    username: str
    total_cents: int = Field(ge=0)  # TODO (step 5): at most 10**12 (README)
    occurred_at: datetime
