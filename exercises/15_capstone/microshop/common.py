"""What every service of the shop shares. Read README.md for the contracts.

Shared *code*, not shared state: each service runs in its own process with its own copy.
Some plumbing is done for you (sessions, timezone-aware datetimes, the event model);
the TODOs are yours.
"""

import base64
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, NoReturn

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from jwt.algorithms import OKPAlgorithm
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Receive, Scope, Send


def todo(what: str) -> NoReturn:
    """Answer 501 Not Implemented: the route exists, its step is not done yet."""
    raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, detail=f"TODO: {what}")


# ---------------------------------------------------------------------------------------
# Traces and request IDs (step 6; lesson 12 teaches both)
# ---------------------------------------------------------------------------------------

PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent: extract(carrier), inject(carrier)
REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # use .fullmatch: all of it, up to its end
_request_id: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def outgoing_headers() -> dict[str, str]:
    """Headers for a call to another service."""
    # TODO (step 6): {"X-Request-ID": <the current request ID>} when there is one.
    return {}


def service_tracer(service: str, tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    """Given: the tracer of one service's app, from the provider its create_app is given (the
    tests pass one with an in-memory exporter), else from a provider of its own. Never
    OpenTelemetry's global provider: it is one per process, shared by every app of a test run."""
    provider = tracer_provider or TracerProvider(resource=Resource.create({"service.name": service}))
    return provider.get_tracer(f"microshop.{service}")


class RequestContextMiddleware:
    """A pure ASGI middleware, added last to every service with `service=<its name>` and its tracer."""

    def __init__(self, app: ASGIApp, service: str, tracer: trace.Tracer) -> None:
        self.app = app
        self.service = service
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # TODO (step 6): for HTTP requests:
        #   - start a SERVER span (self.tracer.start_as_current_span, kind=SpanKind.SERVER) whose
        #     context is PROPAGATOR.extract(<the request's headers as a dict>): a valid traceparent
        #     is continued, a malformed one starts a new trace. Once the app has run, rename it
        #     "<METHOD> <route template>" (scope["route"].path; never the raw path).
        #   - the request ID: the incoming X-Request-ID when it fully matches VALID_REQUEST_ID
        #     (VALID_REQUEST_ID.fullmatch(...)), else the span's trace ID (format_trace_id); keep it
        #     in _request_id while the request runs; add it to the response headers (wrap `send`,
        #     edit the "http.response.start" message); reset the context variable afterwards.
        #   - an exception from the app before the response started: send the 500 problem
        #     (problems.unexpected_problem) through your wrapped `send`, then re-raise.
        #   Optional: log one JSON line per request (method, route, status, duration, request ID, trace ID).
        await self.app(scope, receive, send)


def service_client(
    tracer: trace.Tracer, base_url: str, transport: httpx.AsyncBaseTransport | None = None, **options: Any
) -> httpx.AsyncClient:
    """The httpx client for calls to one other service (`options`: timeout, auth...)."""
    # TODO (step 6): every call it makes carries the request's trace: wrap `transport` (or
    #   httpx.AsyncHTTPTransport() when None) in a transport of yours whose handle_async_request
    #   starts a CLIENT span and calls PROPAGATOR.inject(request.headers) inside it.
    return httpx.AsyncClient(base_url=base_url, transport=transport, **options)


# ---------------------------------------------------------------------------------------
# Tokens and scopes (steps 1 and 2)
# ---------------------------------------------------------------------------------------

ALGORITHM = "EdDSA"  # Ed25519: users signs with its private key, the others verify with the public one
ISSUER = "microshop-users"  # the "iss" of every token
API_AUDIENCE = "microshop-api"  # the "aud" of a user's token (public routes)
INTERNAL_AUDIENCE = "microshop-internal"  # the "aud" of a service's token (internal routes)
JWKS_PATH = "/.well-known/jwks.json"
SCOPES = {
    "orders:read": "Read your orders",
    "orders:write": "Place orders",
    "catalog:write": "Create products",
}


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)

    username: str
    scopes: frozenset[str]


def load_signing_key(pem: str) -> Ed25519PrivateKey:
    """The users service's private key from its settings (PEM). Given."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("signing_key must be an Ed25519 private key in PEM")
    return key


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK whose kid is its RFC 7638 thumbprint. Given."""
    jwk = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    members = json.dumps({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True)
    kid = base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode()
    return {"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "kid": kid, "alg": ALGORITHM, "use": "sig"}


def issue_token(key: Ed25519PrivateKey, subject: str, scopes: Iterable[str], ttl: timedelta, audience: str) -> str:
    """A signed JWT with the claims of README.md: sub, scope, iss, aud, iat, exp; kid in its header."""
    # TODO (step 1): jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": ...}).
    raise NotImplementedError("TODO (step 1): issue_token")


bearer = OAuth2PasswordBearer(tokenUrl="/api/token", scopes=SCOPES)


async def current_principal(
    security_scopes: SecurityScopes,
    request: Request,
    token: Annotated[str, Depends(bearer)],
) -> Principal:
    """Who calls, with which scopes. Used as Security(current_principal, scopes=[...])."""
    # TODO (steps 1, 2): find the public key named by the token's kid (jwt.get_unverified_header)
    #   in request.app.state.public_keys (fetched from the users service's JWKS and cached; an
    #   unknown kid fetches again, at most once every jwks_refresh_seconds); decode with
    #   algorithms pinned to [ALGORITHM], issuer=ISSUER, audience=API_AUDIENCE, and sub, exp,
    #   iss and aud required. Invalid, expired, unknown key -> 401 with WWW-Authenticate: Bearer;
    #   keys that cannot be fetched -> 503. A scope the token lacks -> 403.
    todo("step 1: check the bearer token and its scopes")


# ---------------------------------------------------------------------------------------
# Service identity: the internal routes (README: "Internal routes")
# ---------------------------------------------------------------------------------------


async def require_service(request: Request) -> None:
    """Use as dependencies=[Depends(require_service)] on every internal route."""
    # TODO: let the request through only with "Authorization: Bearer <a service's token>":
    #   checked like a user's token, with audience=INTERNAL_AUDIENCE. Otherwise 401 with
    #   WWW-Authenticate: Bearer.
    todo("the service token")


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
    """Published by orders once an order is stored (stream ORDERS, subject orders.placed);
    consumed by users through its durable consumer."""

    event_id: str = Field(min_length=1, max_length=64)
    type: Literal["OrderPlaced"] = "OrderPlaced"
    order_id: str = Field(min_length=1, max_length=64)
    username: str
    total_cents: int = Field(ge=0)  # TODO (step 5): at most 10**12 (README)
    occurred_at: datetime


# ---------------------------------------------------------------------------------------
# The broker (step 5): NATS JetStream, as in lesson 11
# ---------------------------------------------------------------------------------------

# The names orders, users and the broker share (README, step 5).
ORDERS_STREAM = "ORDERS"  # subjects orders.>, file storage, a duplicate window of 2 minutes
ORDER_PLACED_SUBJECT = "orders.placed"
DEAD_LETTER_STREAM = "DEADLETTER"  # subjects dead.>, file storage
DEAD_LETTER_SUBJECT = "dead.orders.placed"

# TODO (step 5): what orders and users both need from the broker: connect in the lifespan
#   (nats.connect with reconnects for ever, in a task, so that an app starts even when the
#   broker is down), create both streams if they do not exist (js.add_stream), and drain the
#   connection at shutdown.
