"""What every service of the shop shares: traces, request IDs and access logs, tokens and scopes,
service identity (signed tokens, their public keys, service tokens for the internal routes),
database sessions, the health route and the
event contract. Errors are problem details: `problems.py`, given, the same in every service.

This is shared *code*, not shared state: each service imports its own copy and runs in its
own process, with its own database. Services only talk to each other over the network.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2PasswordBearer, SecurityScopes
from jwt.algorithms import OKPAlgorithm
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, TypeDecorator, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import unexpected_problem

# ---------------------------------------------------------------------------------------
# Traces and request IDs: one trace, and one ID, follow a request through every service
# ---------------------------------------------------------------------------------------

# W3C Trace Context, named explicitly: the global propagator can be changed by OTEL_PROPAGATORS,
# and the shop's services promise each other `traceparent`.
PROPAGATOR = TraceContextTextMapPropagator()

REQUEST_ID_HEADER = "X-Request-ID"
# Nothing that could forge a log line. fullmatch, not match with ^...$: "$" also matches
# before a trailing newline, so match would let "abc\n" through.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_id: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def outgoing_headers() -> dict[str, str]:
    """Headers for a call to another service: the current request ID travels along (the trace
    context travels in every call of a `service_client`, whatever the headers)."""
    request_id = current_request_id()
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


def service_tracer(service: str, tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    """The tracer of one service's app. Tests hand in a provider with an in-memory exporter;
    without one the service makes its own (spans with real IDs and nowhere to go: a deployment
    adds an exporter). Never OpenTelemetry's global provider: it is one per process, and a
    second app in the same process (every test) would share or lose the first one's spans."""
    provider = tracer_provider or TracerProvider(resource=Resource.create({"service.name": service}))
    return provider.get_tracer(f"microshop.{service}")


def request_id_for(scope: Scope, trace_id: str) -> str:
    """The one request-ID rule: a caller's plain ID is kept; otherwise the ID is the trace ID,
    so the ID a client quotes finds the log lines and the trace alike."""
    incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
    return incoming if _VALID_REQUEST_ID.fullmatch(incoming) else trace_id


def _header_carrier(scope: Scope) -> dict[str, str]:
    """The request's traceparent, for the propagator. Not its tracestate (vendors' data): the shop
    keeps none, and OpenTelemetry logs a malformed one whole, a stranger's kilobytes per request."""
    traceparent = Headers(scope=scope).get("traceparent")
    return {} if traceparent is None else {"traceparent": traceparent}


class RequestContextMiddleware:
    """The server span of every request, its request ID in a header, one JSON log line, and the
    500 of a crash. Add it last in `create_app`, so that it is the outermost of the app's own.

    A pure ASGI middleware: the span and the context variable stay current for the whole
    request, including background tasks that run after the response has been sent.
    """

    def __init__(self, app: ASGIApp, service: str, tracer: trace.Tracer) -> None:
        self.app = app
        self.service = service
        self.tracer = tracer
        self.logger = logging.getLogger(f"microshop.{service}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Continue the caller's trace when its traceparent is valid; a missing or malformed one
        # extracts to an empty context, and the span starts a new trace (never an error).
        parent = PROPAGATOR.extract(_header_carrier(scope))
        with self.tracer.start_as_current_span(
            scope["method"], context=parent, kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False
        ) as span:
            context = span.get_span_context()
            trace_id, span_id = format_trace_id(context.trace_id), format_span_id(context.span_id)
            request_id = request_id_for(scope, trace_id)
            token = _request_id.set(request_id)
            started = time.perf_counter()
            status_code = 500  # what the client gets if the app raises before it answers
            started_response = False

            async def send_with_id(message: Message) -> None:
                nonlocal status_code, started_response
                if message["type"] == "http.response.start":
                    status_code, started_response = message["status"], True
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                span.record_exception(exc)
                if not started_response:
                    # Answer the 500 problem here, through send_with_id, so that it carries the
                    # request ID (Starlette's ServerErrorMiddleware, outside this one, would send
                    # it without). Then re-raise: the server logs the traceback, never the client.
                    response = await unexpected_problem(Request(scope), exc)
                    await response(scope, receive, send_with_id)
                raise
            finally:
                # Routing has run by now: name the span by the route template, never the raw
                # path (backends group spans by name; ids in names make one group per order).
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.request.method", scope["method"])
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status_code)
                if status_code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.logger.info(json.dumps({
                    "service": self.service,
                    "request_id": request_id,
                    "trace_id": trace_id,
                    "span_id": span_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                }))
                _request_id.reset(token)


class TracingTransport(httpx.AsyncBaseTransport):
    """Wraps the transport of a client that calls another service: each call is a CLIENT span,
    and its `traceparent` goes out with the request, so the callee's server span is its child."""

    def __init__(self, tracer: trace.Tracer, inner: httpx.AsyncBaseTransport) -> None:
        self.tracer, self.inner = tracer, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # The method alone names the span: the path holds ids (/reservations/<order id>).
        with self.tracer.start_as_current_span(request.method, kind=SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("server.address", request.url.host)
            span.set_attribute("url.path", request.url.path)
            PROPAGATOR.inject(request.headers)
            response = await self.inner.handle_async_request(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def service_client(
    tracer: trace.Tracer, base_url: str, transport: httpx.AsyncBaseTransport | None = None, **options: Any
) -> httpx.AsyncClient:
    """An httpx client for one other service (its `base_url`): every call it makes carries the
    current trace. `transport` replaces the network (tests); `options` are the client's own
    (timeout, auth)."""
    return httpx.AsyncClient(
        base_url=base_url, transport=TracingTransport(tracer, transport or httpx.AsyncHTTPTransport()), **options
    )


# ---------------------------------------------------------------------------------------
# Tokens and scopes: users signs with its private key, every service verifies with the public one
# ---------------------------------------------------------------------------------------

# EdDSA (Ed25519): an asymmetric signature. Only users holds the private key; catalog and
# orders fetch the public keys (a JWKS) from users and can verify a token, never make one. With
# HS256 every service that checks tokens holds the secret that makes them, so any of them, or
# anyone who steals its settings, can mint an admin's token.
ALGORITHM = "EdDSA"
ISSUER = "microshop-users"  # the "iss" of every token; one spelling for the whole shop
API_AUDIENCE = "microshop-api"  # the "aud" of a user's token: the public routes
INTERNAL_AUDIENCE = "microshop-internal"  # the "aud" of a service's token: the internal routes
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
    """The users service's private key, from its settings (PEM, PKCS#8)."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("signing_key must be an Ed25519 private key in PEM")
    return key


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK, with its id: the RFC 7638 thumbprint, so that the same key
    always has the same kid, whoever computes it."""
    jwk = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    members = json.dumps({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True)
    kid = base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode()
    return {"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "kid": kid, "alg": ALGORITHM, "use": "sig"}


def issue_token(key: Ed25519PrivateKey, subject: str, scopes: Iterable[str], ttl: timedelta, audience: str) -> str:
    now = datetime.now(timezone.utc)
    claims = {"sub": subject, "scope": " ".join(sorted(scopes)), "iss": ISSUER, "aud": audience, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": public_jwk(key.public_key())["kid"]})


class KeysUnavailable(Exception):
    """The public keys cannot be fetched now: no token can be checked."""


class PublicKeys:
    """The users service's public keys, by kid, fetched from its JWKS and cached.

    A token with a kid not in the cache may be signed by a key users has just rotated in, so
    the JWKS is fetched again, but at most once every `refresh_seconds`: a stranger who sends
    tokens with made-up kids must not turn each request into a request to users.
    """

    def __init__(self, fetch: Callable[[], Awaitable[Any]], refresh_seconds: float) -> None:
        self.fetch = fetch
        self.refresh_seconds = refresh_seconds
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.fetched_at: float | None = None
        self.lock = asyncio.Lock()  # one fetch at a time; the others wait and reuse it

    async def key(self, kid: str) -> Ed25519PublicKey | None:
        if kid in self.keys:
            return self.keys[kid]
        async with self.lock:
            recent = self.fetched_at is not None and time.monotonic() - self.fetched_at < self.refresh_seconds
            if kid not in self.keys and not recent:
                await self.refresh()
        return self.keys.get(kid)

    async def refresh(self) -> None:
        try:
            document = await self.fetch()
        except Exception as exc:  # unreachable, slow, or not a JWKS: nothing to verify with
            raise KeysUnavailable(str(exc)) from None
        keys: dict[str, Ed25519PublicKey] = {}
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            if isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and isinstance(jwk.get("kid"), str):
                with contextlib.suppress(jwt.InvalidKeyError, ValueError, TypeError):
                    key = OKPAlgorithm.from_jwk(jwk)
                    if isinstance(key, Ed25519PublicKey):
                        keys[jwk["kid"]] = key
        self.keys = keys
        self.fetched_at = time.monotonic()


def jwks_from(client: httpx.AsyncClient, timeout: float) -> Callable[[], Awaitable[Any]]:
    """How catalog and orders fetch the users service's JWKS: with a deadline, like every call."""

    async def fetch() -> Any:
        async with asyncio.timeout(timeout):
            reply = await client.get(JWKS_PATH, headers=outgoing_headers())
        reply.raise_for_status()
        return reply.json()

    return fetch


class LocalKeys(PublicKeys):
    """The users service verifies its own tokens with its own public key: nothing to fetch,
    and an unknown kid is simply not one of its keys."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        own = public_jwk(private_key.public_key())

        async def fetch() -> dict[str, Any]:
            return {"keys": [own]}

        super().__init__(fetch, refresh_seconds=float("inf"))
        self.keys = {own["kid"]: private_key.public_key()}

    async def key(self, kid: str) -> Ed25519PublicKey | None:
        return self.keys.get(kid)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def verify_token(request: Request, token: str, audience: str) -> dict[str, Any]:
    """The claims of a token users signed for `audience`; 401 for any other token."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise unauthorized("The token is malformed.") from None
    if not isinstance(kid, str) or not 0 < len(kid) <= 128:
        raise unauthorized("The token names no signing key.")
    try:
        key = await request.app.state.public_keys.key(kid)
    except KeysUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="The keys that check tokens cannot be fetched now.",
                            headers={"Retry-After": "1"}) from None
    if key is None:
        raise unauthorized("The token is signed by a key the users service does not publish.")
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],  # pinned: never let the token choose its algorithm
            issuer=ISSUER,
            audience=audience,  # a token for the internal routes is not a user's, and back
            options={"require": ["sub", "exp", "iss", "aud"]},
        )
    except jwt.InvalidTokenError:
        raise unauthorized("The token is invalid or expired.") from None


# The token is issued by the users service; clients get it through the gateway.
bearer = OAuth2PasswordBearer(tokenUrl="/api/token", scopes=SCOPES)


async def current_principal(
    security_scopes: SecurityScopes,
    request: Request,
    token: Annotated[str, Depends(bearer)],
) -> Principal:
    """Who is calling, with which scopes. Each service checks tokens itself: no trust by position."""
    claims = await verify_token(request, token, API_AUDIENCE)
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
# Service identity: internal routes answer only the shop's own services
# ---------------------------------------------------------------------------------------

# The gateway does not route to /reservations, /events or /outbox/..., but hiding is not
# protecting: anyone who reaches a service directly (a neighbour on the network, a gateway bug)
# could call them. So they demand a token of a service: one users signed for the internal
# audience after the service proved who it is with its own id and secret (client credentials).
service_bearer = HTTPBearer(
    scheme_name="ServiceToken",
    description="A service's token from POST /service-token on the users service",
    auto_error=False,
)


async def require_service(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(service_bearer)],
) -> str:
    """Let a request through only with a service's token; answers the service's id."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorized("This route is for the shop's services only.")
    claims = await verify_token(request, credentials.credentials, INTERNAL_AUDIENCE)
    return str(claims["sub"])


SERVICE_ONLY = [Depends(require_service)]  # dependencies=SERVICE_ONLY on every internal route


class ServiceCredentials(httpx.Auth):
    """httpx auth for a service's calls to internal routes: a token from users, fetched with the
    service's client id and secret (OAuth2 client credentials), reused until shortly before it
    expires, fetched again after a 401 (the key may have been rotated).

    The token is fetched through `users` (the client of the users service), whichever client
    the call itself goes through. A users service that cannot be reached raises the client's
    error, as the call itself would.
    """

    def __init__(self, users: httpx.AsyncClient, client_id: str, client_secret: str) -> None:
        self.users, self.client_id, self.client_secret = users, client_id, client_secret
        self.token: str | None = None
        self.expires_at = 0.0
        self.lock = asyncio.Lock()  # one fetch for many calls at once

    async def current(self) -> str | None:
        async with self.lock:
            if self.token is None or time.monotonic() >= self.expires_at:
                form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.client_secret}
                reply = await self.users.post("/service-token", data=form, headers=outgoing_headers())
                self.token = None
                if reply.status_code == status.HTTP_200_OK:
                    body = reply.json()
                    self.token = str(body["access_token"])
                    # Renew a little early: a token that expires on its way is refused.
                    self.expires_at = time.monotonic() + max(float(body.get("expires_in", 60)) * 0.8, 1.0)
            return self.token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.current()
        if token is not None:  # without one, the call goes unauthenticated and is refused with a 401
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == status.HTTP_401_UNAUTHORIZED:
            self.token = None  # the next call fetches a new one


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


# ---------------------------------------------------------------------------------------
# The broker: OrderPlaced events travel through NATS JetStream (lesson 11)
# ---------------------------------------------------------------------------------------

# Kept beside the code that uses them: only orders and users talk to the broker.
import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402
from nats.js.client import JetStreamContext  # noqa: E402

broker_logger = logging.getLogger("microshop.broker")

# The contract between orders, users and the broker: names, not code, are what they share.
ORDERS_STREAM = "ORDERS"
ORDER_PLACED_SUBJECT = "orders.placed"
DEAD_LETTER_STREAM = "DEADLETTER"
DEAD_LETTER_SUBJECT = "dead.orders.placed"
DUPLICATE_WINDOW = 120.0  # seconds: a second publish with the same Nats-Msg-Id within it is stored once


class BrokerUnavailable(Exception):
    """The broker cannot be reached now: what needs it waits (the outbox keeps the events)."""


def event_streams() -> list[StreamConfig]:
    """The events stream and the dead letters, on disk: a broker restart loses neither."""
    return [
        StreamConfig(name=ORDERS_STREAM, subjects=["orders.>"], storage=StorageType.FILE,
                     duplicate_window=DUPLICATE_WINDOW),
        StreamConfig(name=DEAD_LETTER_STREAM, subjects=["dead.>"], storage=StorageType.FILE,
                     duplicate_window=DUPLICATE_WINDOW),
    ]


class Broker:
    """One app's connection to NATS: opened in the lifespan, drained at shutdown.

    The client reconnects on its own, for ever. Meanwhile `jetstream()` raises BrokerUnavailable
    at once, rather than letting a publish wait for a connection that may take minutes: the
    caller keeps its work (the outbox, an unacknowledged message) and tries again later. A broker
    that is down when the app starts does not stop the app: the first connection goes on in
    the background.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.client: NATS | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._refused = asyncio.Event()
        self._streams_ready = False

    async def start(self) -> None:
        """Connect; return once connected, or once the first attempt failed (then keep trying)."""
        self._connecting = asyncio.create_task(self._connect(), name=f"{self.name}-broker-connect")
        refused = asyncio.create_task(self._refused.wait())
        await asyncio.wait({self._connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if not self._connecting.done():
            broker_logger.warning("broker %s unreachable at startup; connecting in the background", self.url)

    async def _connect(self) -> None:
        self.client = await nats.connect(
            self.url, name=self.name, connect_timeout=2, reconnect_time_wait=0.25, max_reconnect_attempts=-1,
            drain_timeout=2, error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
        )

    # The client's events, one log line each (nats-py would log a traceback per error).
    async def _error(self, error: Exception) -> None:
        self._refused.set()
        broker_logger.warning("broker: %r", error)

    async def _disconnected(self) -> None:
        if self.client is not None and not (self.client.is_closed or self.client.is_draining):
            broker_logger.warning("broker: disconnected; reconnecting")

    async def _reconnected(self) -> None:
        broker_logger.info("broker: reconnected")

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def jetstream(self) -> JetStreamContext:
        """JetStream, with the shop's streams created (once; a stream that exists is kept as it is)."""
        if self.client is None or not self.client.is_connected:
            raise BrokerUnavailable(f"not connected to {self.url}")
        js = self.client.jetstream()
        if not self._streams_ready:
            for config in event_streams():
                with contextlib.suppress(nats.js.errors.BadRequestError):  # it exists, with an operator's settings
                    await js.add_stream(config)
            self._streams_ready = True
        return js

    def streams_missing(self) -> None:
        """A publish found no stream (an operator deleted it): create them again next time."""
        self._streams_ready = False

    async def close(self) -> None:
        """Stop connecting; drain the connection (what was published is flushed, subscriptions end)."""
        connecting = self._connecting
        while connecting is not None and not connecting.done():
            # On Python 3.11 a cancel that meets a connection attempt's asyncio.wait_for just as the
            # attempt ends is swallowed, and the client goes on trying: cancel until it has stopped.
            connecting.cancel()
            await asyncio.wait({connecting}, timeout=0.5)
        if connecting is not None and not connecting.cancelled():
            connecting.exception()  # a first connection that failed for good: nothing to close
        client = self.client
        if client is not None and not client.is_closed:
            try:
                await client.drain()
            except (nats.errors.Error, OSError):  # the broker is away: nothing left to flush to it
                await client.close()
