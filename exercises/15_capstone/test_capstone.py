"""Graded tests for exercise 15, the capstone. Run: pytest exercises/15_capstone

Most tests wire the four services together in this process (every call between them goes
through httpx.ASGITransport, so no port is opened). The end_to_end tests start every service
as a real uvicorn process on loopback, exactly as README.md says they are deployed.

Tests of one step only need the services of that step: the users tests talk to users alone,
the catalog tests to catalog alone, and so on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import itertools
import json
import random
import re
import sqlite3
import sys
import threading
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import base64
import hashlib
import hmac

import httpx
import jwt
import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from grader.broker import NatsServer
from grader.catalog import load_exercise
from grader.expect import expect_header, expect_json, expect_problem, expect_status, explain, json_of
from grader.live import free_port, http_only, serve_in_process
from grader.pytest_plugin import target_folder
from grader.upstreams import Streaming

KEY = Ed25519PrivateKey.generate()  # the users service's signing key in these tests
KEY_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
OTHER_KEY = Ed25519PrivateKey.generate()  # a key users never published: an attacker's
ORDERS_SECRET = "orders-client-secret-0123456789abcdef"  # orders' own client secret (client credentials)
ISSUER = "microshop-users"
API_AUDIENCE = "microshop-api"  # the aud of a user's token
INTERNAL_AUDIENCE = "microshop-internal"  # the aud of a service's token
ADMIN = {"username": "admin", "password": "admin-password-1"}
CUSTOMER_SCOPES = ["orders:read", "orders:write"]
# Argon2 at production cost takes ~0.3 s of CPU per hash; tests hash a lot, so they pass a cheap one.
FAST_HASH = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
# The broker's names (README, "Step 5"), and how users' consumer is set in these tests: an event not
# acknowledged within a second comes again; three failed deliveries and it is a dead letter.
ORDERS_STREAM, SUBJECT, DEAD_STREAM, DEAD_SUBJECT, DURABLE = "ORDERS", "orders.placed", "DEADLETTER", "dead.orders.placed", "users"
CONSUMER = {"ack_wait": 1.0, "max_deliver": 3, "backoff": 0.05}
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an X-Request-ID a service keeps (README)
NOT_READY = "https://course.example/problems/not-ready"  # the problem type of the gateway's /ready 503


# ---------------------------------------------------------------------------------------
# Building the services in this process
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _imported() -> dict[str, types.ModuleType]:
    return {}


@pytest.fixture
def load(load, _imported):
    """Each service module imported once per test module, not once per test: importing four
    modules (their models, their routes) costs more than building their apps. Isolation
    comes from `create_app`, which every test calls for a fresh app with a fresh database;
    README.md asks you to keep all state in the app, none in module globals."""

    def load_once(module: str) -> types.ModuleType:
        if module not in _imported:
            _imported[module] = load(module)  # a failed import fails this test and is retried by the next
        return _imported[module]

    return load_once


class Traces:
    """What a tracing backend collects from the shop: one in-memory exporter per service, each
    behind the TracerProvider that service's create_app(tracer_provider=...) is given (README:
    "Traces"). Nothing here touches OpenTelemetry's global provider."""

    SERVICES = ("gateway", "orders", "catalog", "users")

    def __init__(self) -> None:
        self.exporters = {name: InMemorySpanExporter() for name in self.SERVICES}

    def provider(self, service: str) -> TracerProvider:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(self.exporters[service]))
        return provider

    def spans(self, service: str) -> list[ReadableSpan]:
        return list(self.exporters[service].get_finished_spans())

    def servers(self, service: str) -> list[ReadableSpan]:
        return [span for span in self.spans(service) if span.kind == SpanKind.SERVER]

    def clear(self) -> None:
        for exporter in self.exporters.values():
            exporter.clear()

    def waterfall(self) -> str:
        """Every span collected, as a tree per trace (what a backend would draw), for a failure message."""
        spans = [(name, span) for name in self.SERVICES for span in self.spans(name)]
        ids = {span.context.span_id for _, span in spans}
        lines: list[str] = []

        def show(parent: int | None, trace_id: int, depth: int) -> None:
            for name, span in sorted(spans, key=lambda pair: pair[1].start_time or 0):
                own_parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
                if span.context.trace_id == trace_id and own_parent == parent:
                    link = "" if span.parent is None else f" (parent {format_span_id(span.parent.span_id)})"
                    lines.append(f"{'  ' * depth}{name:<8} {span.kind.name:<6} {span.name}{link}")
                    show(span.context.span_id, trace_id, depth + 1)

        for trace_id in dict.fromkeys(span.context.trace_id for _, span in spans):
            lines.append(f"trace {format_trace_id(trace_id)}:")
            show(None, trace_id, 1)
        return "\n".join(lines) or "(no span at all: is the tracer_provider given to create_app used?)"


def traced(service: str, traces: Traces | None) -> dict[str, Any]:
    """create_app's tracer_provider keyword, only for tests that read spans: the other steps do
    not need tracing done yet."""
    return {} if traces is None else {"tracer_provider": traces.provider(service)}


# ---------------------------------------------------------------------------------------
# The broker: one real nats-server for the whole module, emptied before every test
# ---------------------------------------------------------------------------------------


BROKER: dict[str, NatsServer] = {}  # the module's server, for the helpers that build services


@pytest.fixture(scope="module")
def _nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:  # a free port on 127.0.0.1, JetStream files in a temporary folder
        yield server


async def forget_every_stream(url: str) -> None:
    async with broker_client(url) as js:
        for stream in await js.streams_info():
            await js.delete_stream(stream.config.name)


@pytest_asyncio.fixture(autouse=True)
async def broker(_nats_server: NatsServer) -> NatsServer:
    """The module's broker, running (a test that stopped it and failed is not the next test's
    problem) and empty: no stream, no consumer, nothing another test published."""
    if not _nats_server.running:
        await asyncio.to_thread(_nats_server.start)
    await forget_every_stream(_nats_server.url)
    BROKER["server"] = _nats_server
    return _nats_server


def nats_url() -> str:
    """The module's broker; outside this suite's fixtures (the course's own checks build single
    services with build_app), a free port where no broker listens: the services start anyway."""
    server = BROKER.get("server")
    return server.url if server is not None and server.running else f"nats://127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def broker_client(url: str | None = None) -> AsyncIterator[Any]:
    """The test's own JetStream client, to publish as orders does and to read the streams."""
    client = await nats.connect(url or nats_url(), connect_timeout=5, allow_reconnect=False)
    try:
        yield client.jetstream(timeout=5)
    finally:
        await client.close()


def sqlite(tmp_path: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}.db"


def users_app(load, tmp_path: Path, password_hash: PasswordHash | None = None, *, traces: Traces | None = None,
              **overrides: Any):
    module = load("microshop/users")
    fields = {"database_url": sqlite(tmp_path, "users"), "signing_key": KEY_PEM, "service_clients": {"orders": ORDERS_SECRET},
              "admin_username": ADMIN["username"], "admin_password": ADMIN["password"], "nats_url": nats_url(), **CONSUMER}
    settings = module.Settings(**(fields | overrides))
    return module.create_app(settings, password_hash=password_hash or FAST_HASH, **traced("users", traces))


class JwksHost(httpx.AsyncBaseTransport):
    """Plays the users service for catalog and orders tests that need only its public keys:
    serves GET /.well-known/jwks.json with the public keys of `keys`, and counts the fetches."""

    def __init__(self, *keys: Ed25519PrivateKey) -> None:
        self.keys = list(keys or (KEY,))
        self.fetches = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/.well-known/jwks.json":
            self.fetches += 1
            return httpx.Response(200, json={"keys": [public_jwk(key.public_key()) for key in self.keys]}, request=request)
        return httpx.Response(404, json={"detail": "not here"}, request=request)


def catalog_app(load, tmp_path: Path, users_transport: httpx.AsyncBaseTransport | None = None, *,
                traces: Traces | None = None, **overrides: Any):
    module = load("microshop/catalog")
    settings = module.Settings(**({"database_url": sqlite(tmp_path, "catalog"), "users_url": "http://users"} | overrides))
    return module.create_app(settings, users_transport=users_transport or JwksHost(), **traced("catalog", traces))


@contextlib.asynccontextmanager
async def serving(app: Any, base_url: str = "http://service") -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan, and give a client that calls it in process."""
    failure: BaseException | None = None
    async with LifespanManager(app, startup_timeout=10), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url
    ) as client:
        try:
            yield client
        except Exception as exc:  # a failed check: still shut the app down (LifespanManager would not)
            failure = exc
        except pytest.fail.Exception as exc:
            failure = exc
    if failure is not None:
        raise failure


class Network(httpx.AsyncBaseTransport):
    """The wire between two services, in process: passes requests to a real app, records them,
    and can fail the way a network fails.

    mode None:          pass everything through
    "refuse":           matching requests fail to connect (nothing reaches the service)
    "error_after":      matching requests reach the service, then the caller gets a 500
    "lose_reply":       matching requests reach the service, the reply never comes back
    "hang":             matching requests never reach the service and nothing comes back
    "reject":           matching requests never reach the service; the caller gets a 500

    `mode`, `method` and `path` make one rule; `also` holds more (mode, method, path) rules, and
    `when` narrows every rule to the requests it accepts.
    """

    def __init__(self, app: Any, mode: str | None = None, method: str = "", path: str = "") -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.mode, self.method, self.path = mode, method, path
        self.also: list[tuple[str, str, str]] = []
        self.when: Callable[[httpx.Request], bool] | None = None
        self.seen: list[httpx.Request] = []

    def rule_for(self, request: httpx.Request) -> str | None:
        if self.when is not None and not self.when(request):
            return None
        rules = ([(self.mode, self.method, self.path)] if self.mode else []) + self.also
        for mode, method, path in rules:
            if (not method or request.method == method) and request.url.path.startswith(path):
                return mode
        return None

    async def wait_for_the_callers_deadline(self, request: httpx.Request) -> None:
        # A real socket honours httpx's read timeout; so does this one. Without any timeout,
        # give up after 5 s so that the test can say what went wrong.
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        await asyncio.sleep(5.0 if read_timeout is None else read_timeout)
        raise httpx.ReadTimeout("no reply", request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        mode = self.rule_for(request)
        if mode is None:
            return await self.inner.handle_async_request(request)
        if mode == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if mode == "reject":
            return httpx.Response(500, json={"detail": "internal error"}, request=request)
        if mode == "hang":
            await self.wait_for_the_callers_deadline(request)
        reply = await self.inner.handle_async_request(request)
        await reply.aread()
        if mode == "error_after":
            return httpx.Response(500, json={"detail": "internal error"}, request=request)
        await self.wait_for_the_callers_deadline(request)  # "lose_reply"
        raise AssertionError("unreachable")


class Unreachable(httpx.AsyncBaseTransport):
    """A service that is not there: every request fails to connect, as on a port where nothing
    listens. For a test that builds a service whose calls to the others it does not look at (a
    transport of its own costs it no CA bundle, no connection pool)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused (nothing listens there in this test)", request=request)


def unreachable(*names: str) -> dict[str, httpx.AsyncBaseTransport]:
    return {name: Unreachable() for name in names}


@dataclass
class Shop:
    """All four services, wired together in process."""

    gateway: httpx.AsyncClient
    users: httpx.AsyncClient
    catalog: httpx.AsyncClient
    orders: httpx.AsyncClient
    catalog_wire: Network  # what orders sends to catalog
    users_wire: Network  # what orders sends to users (its service token, the JWKS)
    gateway_wires: dict[str, Network] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def open_shop(
    load, tmp_path: Path, *, catalog_timeout: float = 2.0, gateway_timeout: float = 5.0, traces: Traces | None = None,
) -> AsyncIterator[Shop]:
    u_app = users_app(load, tmp_path, traces=traces)
    c_app = catalog_app(load, tmp_path, users_transport=Network(u_app), traces=traces)  # the catalog's keys come from users
    catalog_wire, users_wire = Network(c_app), Network(u_app)
    orders = load("microshop/orders")
    o_app = orders.create_app(
        orders.Settings(
            database_url=sqlite(tmp_path, "orders"), client_id="orders", client_secret=ORDERS_SECRET,
            catalog_url="http://catalog", users_url="http://users", nats_url=nats_url(),
            catalog_timeout=catalog_timeout, events_timeout=catalog_timeout, outbox_interval=0,
        ),
        catalog_transport=catalog_wire, users_transport=users_wire, **traced("orders", traces),
    )
    gateway = load("microshop/gateway")
    wires = {"users": Network(u_app), "catalog": Network(c_app), "orders": Network(o_app)}
    g_app = gateway.create_app(
        gateway.Settings(users_url="http://users", catalog_url="http://catalog", orders_url="http://orders",
                         timeout=gateway_timeout),
        transports=wires, **traced("gateway", traces),
    )
    async with (
        serving(u_app, "http://users") as users,
        serving(c_app, "http://catalog") as catalog,
        serving(o_app, "http://orders") as orders_client,
        serving(g_app, "http://gateway") as gateway_client,
    ):
        yield Shop(gateway_client, users, catalog, orders_client, catalog_wire, users_wire, wires)


# ---------------------------------------------------------------------------------------
# Small helpers that speak the contracts of README.md
# ---------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The JWK of a public key, its kid the RFC 7638 thumbprint (README, "Tokens")."""
    x = b64url(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    thumbprint = b64url(hashlib.sha256(json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":")).encode()).digest())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": thumbprint, "alg": "EdDSA", "use": "sig"}


def claims_for(subject: str, scopes: list[str], audience: str, minutes: int = 5) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {"sub": subject, "scope": " ".join(scopes), "iss": ISSUER, "aud": audience, "iat": now,
            "exp": now + timedelta(minutes=minutes)}


def signed(claims: dict[str, Any], key: Ed25519PrivateKey = KEY, kid: str | None = None) -> dict[str, str]:
    """An Authorization header with these claims, signed with EdDSA by `key`, its kid `kid`
    (by default the key's own)."""
    header = {"kid": kid if kid is not None else public_jwk(key.public_key())["kid"]}
    return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='EdDSA', headers=header)}"}


def mint(username: str, scopes: list[str], *, minutes: int = 5) -> dict[str, str]:
    """An Authorization header with a user's token exactly as users issues them (see README)."""
    return signed(claims_for(username, scopes, API_AUDIENCE, minutes))


def service(client_id: str = "orders", *, minutes: int = 5) -> dict[str, str]:
    """An Authorization header with a service's token, as users issues it for client credentials."""
    return signed(claims_for(client_id, [], INTERNAL_AUDIENCE, minutes))


def hs256_with_the_public_key(claims: dict[str, Any]) -> dict[str, str]:
    """Algorithm confusion: an HS256 token whose HMAC secret is the public key, which every
    verifier has. A verifier that lets the token choose its algorithm accepts it."""
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": public_jwk(KEY.public_key())["kid"]}
    body = {k: int(v.timestamp()) if isinstance(v, datetime) else v for k, v in claims.items()}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    signature = b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    return {"Authorization": f"Bearer {signing_input}.{signature}"}


def forged_tokens(audience: str) -> list[tuple[str, dict[str, str]]]:
    """Tokens a verifier must refuse, each with what is wrong with it."""
    good = claims_for("admin", ["catalog:write", "orders:read", "orders:write"], audience)
    kid = public_jwk(KEY.public_key())["kid"]
    return [
        ("signed by a key users never published", signed(good, OTHER_KEY)),
        ("signed by another key under the published kid", signed(good, OTHER_KEY, kid=kid)),
        ("another issuer", signed(good | {"iss": "someone-else"})),
        ("another audience", signed(good | {"aud": "someone-else"})),
        ("no audience", signed({k: v for k, v in good.items() if k != "aud"})),
        ("no issuer", signed({k: v for k, v in good.items() if k != "iss"})),
        ("expired", signed(good | {"exp": datetime.now(timezone.utc) - timedelta(minutes=1)})),
        ("HS256 with the public key as its secret (algorithm confusion)", hs256_with_the_public_key(good)),
        ("alg none", {"Authorization": "Bearer " + b64url(json.dumps({"alg": "none", "kid": kid}).encode()) + "."
                      + b64url(json.dumps({k: str(v) for k, v in good.items()}).encode()) + "."}),
    ]


def admin_headers() -> dict[str, str]:
    """An admin's Authorization header, minted when it is used (a watch session may reuse this
    module for longer than a token lives)."""
    return mint("admin", ["catalog:write", "orders:read", "orders:write"])


async def login(client: httpx.AsyncClient, username: str, password: str, prefix: str = "", scope: str = "") -> dict[str, str]:
    form = {"username": username, "password": password} | ({"scope": scope} if scope else {})
    response = await client.post(f"{prefix}/token", data=form)
    expect_status(response, 200, f"POST {prefix}/token with the right username and password (a form, not JSON)")
    body = json_of(response)
    assert body.get("token_type", "").lower() == "bearer" and body.get("access_token"), explain(
        response, '{"access_token": "<jwt>", "token_type": "bearer"}'
    )
    return {"Authorization": f"Bearer {body['access_token']}"}


async def customer(client: httpx.AsyncClient, name: str = "ada", prefix: str = "") -> dict[str, str]:
    password = f"{name}-secret-pw"
    response = await client.post(f"{prefix}/users", json={"username": name, "password": password})
    expect_status(response, 201, f"registering {name}")
    return await login(client, name, password, prefix)


async def add_product(client: httpx.AsyncClient, sku: str, stock: int, price_cents: int = 250, prefix: str = "",
                      headers: dict[str, str] | None = None) -> None:
    response = await client.post(f"{prefix}/products", json={"sku": sku, "name": sku.title(), "price_cents": price_cents,
                                                             "stock": stock}, headers=headers or admin_headers())
    expect_status(response, 201, f"creating product {sku} with a catalog:write token")


async def stock_of(catalog: httpx.AsyncClient, sku: str) -> int:
    response = await catalog.get(f"/products/{sku}")
    return expect_json(response, {"sku": sku}, "the product exists in the catalog")["stock"]


async def order_count(orders: httpx.AsyncClient, headers: dict[str, str]) -> int:
    response = await orders.get("/orders", headers=headers)
    expect_status(response, 200, "GET /orders lists the caller's orders")
    return len(json_of(response))


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 3.0) -> bool:
    """Events are delivered after the response: poll a little instead of sleeping a lot."""
    deadline = time.monotonic() + seconds
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def order_body(*lines: tuple[str, int]) -> dict[str, Any]:
    return {"items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines]}


# ---------------------------------------------------------------------------------------
# Step 1 — users: accounts and tokens with scopes
# ---------------------------------------------------------------------------------------


@pytest.mark.promise("P1")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_register_answers_201_with_the_customer_scopes(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        response = await users.post("/users", json={"username": "ada", "password": "lovelace-1815"})
        expect_status(response, 201, "a new account is created")
        expect_json(response, {"username": "ada", "scopes": CUSTOMER_SCOPES}, "never the password, not even hashed", exact=True)


@pytest.mark.promise("P1", "P25")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_register_validates_and_refuses_duplicates(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        expect_status(await users.post("/users", json={"username": "ada", "password": "lovelace-1815"}), 201)
        expect_problem(await users.post("/users", json={"username": "ada", "password": "another-pass"}), 409,
                      "the username is taken")
        for body in ({"username": "Ada!", "password": "lovelace-1815"}, {"username": "ab", "password": "lovelace-1815"},
                     {"username": "a" * 33, "password": "lovelace-1815"},
                     {"username": "grace", "password": "short"}, {"username": "grace", "password": "p" * 129}):
            expect_problem(await users.post("/users", json=body), 422,
                          "usernames are 3-32 of a-z 0-9 _, passwords 8-128 characters")


def user_claims(response: httpx.Response, token: str, audience: str = API_AUDIENCE) -> dict[str, Any]:
    """The claims of a token users issued, checked as catalog and orders check them."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        claims = jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"], issuer=ISSUER, audience=audience,
                            options={"require": ["sub", "exp", "iss", "aud"]})
    except jwt.InvalidTokenError as exc:
        pytest.fail(explain(response, f"an EdDSA JWT signed with signing_key, iss {ISSUER!r}, aud {audience!r}, with sub "
                                      f"and exp (decoding it said: {exc})"), pytrace=False)
    expected_kid = public_jwk(KEY.public_key())["kid"]
    assert kid == expected_kid, explain(response, f'a "kid" header naming the key: its RFC 7638 thumbprint {expected_kid!r}; '
                                                  f"got {kid!r}")
    return claims


@pytest.mark.promise("P2", "P27")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_token_is_a_jwt_with_the_granted_scopes(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        await users.post("/users", json={"username": "ada", "password": "lovelace-1815"})
        response = await users.post("/token", data={"username": "ada", "password": "lovelace-1815"})
        expect_status(response, 200, "the right password gets a token")
        token = json_of(response).get("access_token", "")
        claims = user_claims(response, token)
        assert claims["sub"] == "ada" and sorted(claims.get("scope", "").split()) == CUSTOMER_SCOPES, explain(
            response, f'claims sub "ada" and scope "orders:read orders:write"; got {claims}'
        )
        lifetime = claims["exp"] - claims.get("iat", 0)
        assert abs(lifetime - 30 * 60) <= 5, explain(
            response, f"exp 30 minutes after iat (token_ttl_minutes defaults to 30); got {lifetime} s. "
                      "timedelta(30) is 30 days: name the unit, timedelta(minutes=...)"
        )
        narrow = await users.post("/token", data={"username": "ada", "password": "lovelace-1815", "scope": "orders:read catalog:write"})
        scope = user_claims(narrow, json_of(narrow).get("access_token", "")).get("scope", "")
        assert scope.split() == ["orders:read"], explain(
            narrow, f"asking for 'orders:read catalog:write' grants only what ada may have: 'orders:read' (got {scope!r})"
        )


@pytest.mark.promise("P2", "P25")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_token_refuses_wrong_credentials(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        await users.post("/users", json={"username": "ada", "password": "lovelace-1815"})
        wrong = await users.post("/token", data={"username": "ada", "password": "not-her-password"})
        expect_problem(wrong, 401, "a wrong password is 401")
        expect_header(wrong, "www-authenticate", "Bearer")
        expect_problem(await users.post("/token", data={"username": "nobody", "password": "whatever-123"}), 401,
                      "an unknown user gets the same 401 as a wrong password")


@pytest.mark.promise("P3", "P25")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_me_needs_a_valid_token(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        headers = await customer(users)
        expect_json(await users.get("/users/me", headers=headers),
                    {"username": "ada", "scopes": CUSTOMER_SCOPES, "orders_placed": 0, "total_spent_cents": 0}, exact=True)
        expect_problem(await users.get("/users/me"), 401, "no token, no profile")
        garbage = await users.get("/users/me", headers={"Authorization": "Bearer not-a-jwt"})
        expect_problem(garbage, 401, "a garbage token")
        expect_header(garbage, "www-authenticate", "Bearer", "every 401 tells the client which scheme to use")
        expired = await users.get("/users/me", headers=mint("ada", CUSTOMER_SCOPES, minutes=-1))
        expect_problem(expired, 401, "an expired token")
        expect_header(expired, "www-authenticate", "Bearer", "every 401 tells the client which scheme to use")


@pytest.mark.promise("P27")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_users_publishes_its_public_key_and_only_that(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        response = await users.get("/.well-known/jwks.json")
        expect_status(response, 200, "GET /.well-known/jwks.json answers the public keys, no token needed")
        body = json_of(response)
        body = body if isinstance(body, dict) else {}
        wanted = public_jwk(KEY.public_key())
        keys = body.get("keys") if isinstance(body.get("keys"), list) else []
        mine = [jwk for jwk in keys if isinstance(jwk, dict) and jwk.get("kid") == wanted["kid"]]
        assert mine and all(mine[0].get(member) == wanted[member] for member in ("kty", "crv", "x")), explain(
            response, f"a key {{kty: OKP, crv: Ed25519, x: <the public key>, kid: {wanted['kid']!r} (its RFC 7638 "
                      f"thumbprint)}}; got {keys}"
        )
        private = [jwk.get("kid") for jwk in keys if isinstance(jwk, dict) and "d" in jwk]
        assert not private, explain(response, f'no private key: a JWK with "d" holds the private part ({private})')


@pytest.mark.promise("P28", "P25")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_a_service_gets_a_token_with_its_client_credentials(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        form = {"grant_type": "client_credentials", "client_id": "orders", "client_secret": ORDERS_SECRET}
        response = await users.post("/service-token", data=form)
        expect_status(response, 200, "orders' client id and secret get a service token")
        body = json_of(response)
        claims = user_claims(response, body.get("access_token", ""), INTERNAL_AUDIENCE)
        assert claims["sub"] == "orders" and body.get("token_type", "").lower() == "bearer", explain(
            response, f'sub "orders", aud {INTERNAL_AUDIENCE!r}, "token_type": "bearer"; got claims {claims}'
        )
        near_miss = ORDERS_SECRET[:-1] + ("x" if ORDERS_SECRET[-1] != "x" else "y")
        for why, bad in (("a wrong secret", form | {"client_secret": near_miss}),
                         ("an unknown client", form | {"client_id": "mallory"})):
            refused = await users.post("/service-token", data=bad)
            expect_problem(refused, 401, f"{why}: no service token")
            expect_header(refused, "www-authenticate", "Bearer")
        for who, headers in (("a service token on a user's route", {"Authorization": f"Bearer {body.get('access_token')}"}),
                             *forged_tokens(API_AUDIENCE)):
            refused = await users.get("/users/me", headers=headers)
            expect_problem(refused, 401, f"GET /users/me with a token {who}")
        admin = await users.get("/users/me", headers=admin_headers())
        expect_status(admin, 200, "after all those forged tokens, a token users signed still works: a kid it does not "
                                  "know is not one of its keys, and forgets none of them")


@pytest.mark.promise("P4")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_the_admin_from_settings_may_write_the_catalog(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users:
        headers = await login(users, ADMIN["username"], ADMIN["password"])
        me = expect_json(await users.get("/users/me", headers=headers), {"username": "admin"})
        assert sorted(me.get("scopes", [])) == ["catalog:write", *CUSTOMER_SCOPES], (
            f"\nexpected: the admin seeded from Settings.admin_username/admin_password has the scopes "
            f"catalog:write orders:read orders:write\ngot:      {me.get('scopes')}"
        )


class SlowHasher(Argon2Hasher):
    """A cheap Argon2 that, once armed, takes SLOW seconds per hash or check, as the real cost
    does. It sleeps instead of computing, so it costs no CPU on a busy machine, and it blocks
    the thread that calls it exactly as a real hash would. It counts how many run at once, and
    how many /health answers arrive while it runs (`answered` is the probe's counter)."""

    SLOW = 0.15

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.armed = False
        self.running = self.most = 0
        self.answered = [0]
        self.answered_meanwhile = 0
        self.lock = threading.Lock()

    def slowly(self, work: Callable[[], Any]) -> Any:
        if not self.armed:
            return work()
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        before = self.answered[0]
        try:
            time.sleep(self.SLOW)
            return work()
        finally:
            with self.lock:
                self.running -= 1
                # On the event loop, no other request moves while this thread sleeps: 0.
                self.answered_meanwhile += self.answered[0] - before

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        return self.slowly(lambda: super(SlowHasher, self).hash(password, salt=salt))

    def verify(self, password: str | bytes, hash: str | bytes) -> bool:
        return self.slowly(lambda: super(SlowHasher, self).verify(password, hash))


async def probe_health(client: httpx.AsyncClient, until: asyncio.Event, answered: list[int]) -> list[float]:
    """GET /health back to back until `until` is set, counting the answers. Each latency counts
    from the moment the probe gives the other tasks their turn (in process, a request may never
    pause by itself) until its answer."""
    latencies: list[float] = []
    while not until.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0)
        expect_status(await client.get("/health"), 200, "GET /health")
        latencies.append(time.perf_counter() - started)
        answered[0] += 1
    return latencies


@pytest.mark.promise("P5")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_password_hashing_never_stops_the_service(load, tmp_path):
    slow = SlowHasher()
    app = users_app(load, tmp_path, PasswordHash((slow,)), admin_username=None, max_concurrent_hashes=2)
    async with serving(app) as users:
        expect_status(await users.post("/users", json={"username": "ada", "password": "lovelace-1815"}), 201)
        slow.armed = True
        done = asyncio.Event()

        async def hashing() -> list[httpx.Response]:
            try:
                return await asyncio.gather(
                    users.post("/token", data={"username": "ada", "password": "lovelace-1815"}),
                    users.post("/token", data={"username": "ada", "password": "not-her-password"}),
                    users.post("/users", json={"username": "grace", "password": "hopper-1906"}),
                )
            finally:
                done.set()

        replies, latencies = await asyncio.gather(hashing(), probe_health(users, done, slow.answered))
        slow.armed = False
        assert [r.status_code for r in replies] == [200, 401, 201], explain(
            replies[0], f"two logins (right and wrong password) and a registration; got {[r.status_code for r in replies]}"
        )
        assert slow.answered_meanwhile > 0, (
            f"\nsent:     two logins and a registration at once (each hash takes {slow.SLOW} s), and GET /health "
            f"back to back meanwhile\nexpected: /health keeps answering while the passwords are hashed\n"
            f"got:      not one /health answered while a hash ran; the slowest took {max(latencies, default=0):.2f} s\n"
            "Argon2 is a blocking call: in an async def route it stops the event loop, and every other request "
            "waits. Run it in a worker thread: await anyio.to_thread.run_sync(hasher.verify, ..., limiter=...)."
        )
        assert slow.most <= 2, (
            f"\nsent:     three requests that hash at once, with max_concurrent_hashes=2\n"
            f"expected: at most 2 hashes at the same time (each holds argon2_memory_kib of memory)\n"
            f"got:      {slow.most} at once. Pass a limiter: anyio.CapacityLimiter(settings.max_concurrent_hashes)"
        )


@pytest.mark.promise("P6", "P25")
@pytest.mark.task("users")
@pytest.mark.asyncio
async def test_a_422_never_repeats_a_password(load, tmp_path):
    async with serving(users_app(load, tmp_path, admin_username=None)) as users:
        huge = "correct-horse-" * 75_000  # about a megabyte
        for what, (path, body) in (
            ("a password too short", ("/users", {"json": {"username": "ada", "password": "hunter2"}})),
            ("a password too long", ("/users", {"json": {"username": "ada", "password": "hunter2-" * 20}})),
            ("a megabyte of password", ("/users", {"json": {"username": "ada", "password": huge}})),
            ("a password that is a number", ("/users", {"json": {"username": "ada", "password": 7_345_678_901}})),
            ("a valid password with an invalid username",
             ("/users", {"json": {"username": "Ada Lovelace", "password": "hunter2-hunter2"}})),
            ("a login without a username", ("/token", {"data": {"password": "hunter2-hunter2"}})),
            ("a login with a password too long", ("/token", {"data": {"username": "ada", "password": "hunter2-" * 20}})),
        ):
            response = await users.post(path, **body)  # one at a time: a failure leaves no request unsent
            expect_problem(response, 422, f"{what} is invalid")
            secret = next(s for s in ("correct-horse-", "hunter2", "7345678901") if s in (response.request.content or b"").decode())
            assert secret not in response.text and len(response.content) < 4096, explain(
                response, f"{what}: a 422 that says where and why, never the value sent: {secret!r} must not come "
                          f"back ({len(response.content)} bytes came back). Drop \"input\" from the validation errors."
            )


# ---------------------------------------------------------------------------------------
# Step 2 — catalog: products and stock reservations
# ---------------------------------------------------------------------------------------


@pytest.mark.promise("P3", "P7", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_creating_products_needs_the_catalog_write_scope(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        body = {"sku": "PEN-1", "name": "Pen", "price_cents": 150, "stock": 10}
        expect_problem(await catalog.post("/products", json=body), 401, "no token")
        expect_problem(await catalog.post("/products", json=body, headers=mint("ada", CUSTOMER_SCOPES)), 403,
                      "a customer token has no catalog:write scope")
        created = await catalog.post("/products", json=body, headers=admin_headers())
        expect_status(created, 201, "catalog:write may create products")
        expect_json(created, body, exact=True)
        expect_header(created, "location", "/products/PEN-1")
        expect_problem(await catalog.post("/products", json=body, headers=admin_headers()), 409, "the SKU exists")
        for invalid, why in (({"price_cents": 0}, "a price must be positive"), ({"stock": -1}, "stock cannot be negative"),
                             ({"name": ""}, "a name has 1-100 characters"), ({"name": "n" * 101}, "a name has 1-100 characters")):
            expect_status(await catalog.post("/products", json=body | {"sku": "PEN-2"} | invalid, headers=admin_headers()),
                          422, why)
        expect_problem(await catalog.get("/products/PEN-2"), 404, "none of the invalid products was created")


@pytest.mark.promise("P29", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_the_catalog_checks_tokens_with_the_published_keys(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        body = {"sku": "PEN-1", "name": "Pen", "price_cents": 150, "stock": 10}
        for what, headers in (*forged_tokens(API_AUDIENCE),
                              ("for the internal routes (a service's token)", service())):
            response = await catalog.post("/products", json=body, headers=headers)
            expect_problem(response, 401, f"POST /products with a token {what}")
            expect_header(response, "www-authenticate", "Bearer", "every 401 tells the client which scheme to use")
        expect_problem(await catalog.get("/products/PEN-1"), 404, "none of the forged tokens created anything")
        expect_status(await catalog.post("/products", json=body, headers=admin_headers()), 201,
                      "an admin's token signed with the published key, iss microshop-users, aud microshop-api")


@pytest.mark.promise("P30")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_a_rotated_key_is_fetched_and_made_up_kids_are_not(load, tmp_path):
    old, new = KEY, Ed25519PrivateKey.generate()
    host = JwksHost(old)
    async with serving(catalog_app(load, tmp_path, users_transport=host, jwks_refresh_seconds=0.2)) as catalog:
        good = claims_for("admin", ["catalog:write"], API_AUDIENCE)
        first = await catalog.post("/products", json={"sku": "OLD-1", "name": "Old", "price_cents": 1, "stock": 1},
                                   headers=signed(good, old))
        expect_status(first, 201, "a token signed with the key users publishes")
        host.keys = [new, old]  # users rotates: it publishes a new key and signs with it
        await asyncio.sleep(0.3)  # longer than jwks_refresh_seconds since the last fetch
        rotated = await catalog.post("/products", json={"sku": "NEW-1", "name": "New", "price_cents": 1, "stock": 1},
                                     headers=signed(good, new))
        expect_status(rotated, 201, "a token signed with the new key: its kid is unknown, so the catalog fetches the "
                                    "JWKS again and finds it")
    host, folder = JwksHost(KEY), tmp_path / "bounded"
    folder.mkdir()
    async with serving(catalog_app(load, folder, users_transport=host, jwks_refresh_seconds=60)) as catalog:
        expect_status(await catalog.post("/products", json={"sku": "ONE-1", "name": "One", "price_cents": 1, "stock": 1},
                                         headers=admin_headers()), 201, "a valid token")
        fetched = host.fetches
        for i in range(25):
            made_up = signed(claims_for("admin", ["catalog:write"], API_AUDIENCE), OTHER_KEY, kid=f"made-up-{i}")
            expect_problem(await catalog.post("/products", json={"sku": f"BAD-{i}", "name": "x", "price_cents": 1, "stock": 1},
                                              headers=made_up), 401, "a token whose kid users never published")
        assert host.fetches - fetched <= 1, (
            f"\nsent:     25 tokens with made-up kids, within jwks_refresh_seconds (60) of the last fetch of the JWKS\n"
            f"expected: at most one more fetch of /.well-known/jwks.json\ngot:      {host.fetches - fetched} more fetches: "
            "a stranger can make the catalog hammer users. Refetch on an unknown kid at most once every "
            "jwks_refresh_seconds."
        )


@pytest.mark.promise("P7", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_products_can_be_read_by_anyone(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "PEN-1", 10, 150)
        await add_product(catalog, "INK-2", 3, 400)
        expect_json(await catalog.get("/products/INK-2"), {"sku": "INK-2", "name": "Ink-2", "price_cents": 400, "stock": 3}, exact=True)
        expect_problem(await catalog.get("/products/NOPE-9"), 404, "an unknown SKU")
        listed = expect_json(await catalog.get("/products"), [
            {"sku": "INK-2", "name": "Ink-2", "price_cents": 400, "stock": 3},
            {"sku": "PEN-1", "name": "Pen-1", "price_cents": 150, "stock": 10},
        ], "every product, sorted by SKU", exact=True)
        assert listed


@pytest.mark.promise("P8", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_a_reservation_takes_every_line_or_none(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "INK-2", 5, 400)
        await add_product(catalog, "PEN-1", 1, 150)
        # The failing line comes last, in the request and by SKU: a line-by-line reservation
        # would already have taken the first one.
        too_much = await catalog.post("/reservations", json={"order_id": "o-1", **order_body(("INK-2", 2), ("PEN-1", 2))}, headers=service())
        expect_problem(too_much, 409, "PEN-1 has 1 left, 2 were asked")
        assert (await stock_of(catalog, "INK-2"), await stock_of(catalog, "PEN-1")) == (5, 1), explain(
            too_much, "no stock taken at all when one line fails: INK-2 still 5, PEN-1 still 1 (all or nothing)"
        )
        unknown = await catalog.post("/reservations", json={"order_id": "o-2", **order_body(("INK-2", 1), ("ZZZ-9", 1))}, headers=service())
        expect_problem(unknown, 404, "an unknown SKU")
        assert await stock_of(catalog, "INK-2") == 5, explain(unknown, "INK-2 untouched after the failed reservation")
        ok = await catalog.post("/reservations", json={"order_id": "o-3", **order_body(("PEN-1", 1), ("INK-2", 2))}, headers=service())
        expect_status(ok, 201, "enough stock for every line")
        expect_json(ok, {"order_id": "o-3", "status": "held", "total_cents": 950})
        lines = sorted((line["sku"], line["quantity"], line["price_cents"]) for line in json_of(ok)["items"])
        assert lines == [("INK-2", 2, 400), ("PEN-1", 1, 150)], explain(ok, "items with sku, quantity and the current price_cents")
        assert (await stock_of(catalog, "INK-2"), await stock_of(catalog, "PEN-1")) == (3, 0), explain(ok, "stock taken: 3 and 0 left")


@pytest.mark.promise("P8")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_reserving_twice_for_one_order_reserves_once(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "PEN-1", 5)
        body = {"order_id": "o-1", **order_body(("PEN-1", 2))}
        first = await catalog.post("/reservations", json=body, headers=service())
        expect_status(first, 201)
        again = await catalog.post("/reservations", json=body, headers=service())
        expect_status(again, 200, "a retry of the same reservation answers 200 with the same reservation")
        expect_json(again, json_of(first), exact=True)
        assert await stock_of(catalog, "PEN-1") == 3, explain(again, "stock taken once (5 -> 3), not twice: the order ID is the idempotency key")


@pytest.mark.promise("P8", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_releasing_returns_the_stock_and_is_safe_to_repeat(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "PEN-1", 5)
        await catalog.post("/reservations", json={"order_id": "o-1", **order_body(("PEN-1", 2))}, headers=service())
        released = await catalog.delete("/reservations/o-1", headers=service())
        expect_status(released, 204, "releasing a reservation")
        assert await stock_of(catalog, "PEN-1") == 5, explain(released, "the 2 units are back: stock 5")
        again = await catalog.delete("/reservations/o-1", headers=service())
        expect_status(again, 204, "releasing twice is harmless")
        assert await stock_of(catalog, "PEN-1") == 5, explain(again, "stock still 5, not 7")
        expect_status(await catalog.delete("/reservations/never-made", headers=service()), 204, "releasing what was never reserved is harmless too")
        for unknown in ("u" * 65, "u" * 2000):  # longer than any reservation's ID: unknown all the same
            expect_status(await catalog.delete(f"/reservations/{unknown}", headers=service()), 204,
                          f"releasing an order ID of {len(unknown)} characters, never reserved (README: 204 for an unknown order_id, whatever it is)")
        late = await catalog.post("/reservations", json={"order_id": "never-made", **order_body(("PEN-1", 1))}, headers=service())
        expect_problem(late, 409, "a reservation arriving after its order was released is refused")
        assert await stock_of(catalog, "PEN-1") == 5, explain(late, "stock untouched")


@pytest.mark.promise("P9")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_two_orders_racing_for_the_last_unit(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "LAST-1", 1)
        replies = await asyncio.gather(*(
            catalog.post("/reservations", json={"order_id": f"race-{i}", **order_body(("LAST-1", 1))}, headers=service()) for i in range(4)
        ))
        codes = sorted(reply.status_code for reply in replies)
        stock = await stock_of(catalog, "LAST-1")
        assert codes == [201, 409, 409, 409] and stock == 0, (
            "\nsent:     four reservations of the last unit of LAST-1 at the same time\n"
            f"expected: exactly one 201 and three 409, stock 0\ngot:      {codes}, stock {stock}\n"
            "Check and take the stock in one statement (UPDATE ... WHERE stock >= quantity), "
            "not read-then-write."
        )


@pytest.mark.promise("P9")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_racing_reservations_and_releases_lose_no_stock(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        await add_product(catalog, "PEN-1", 100)

        async def at_once(calls: list[tuple[str, str, int]]) -> list[tuple[str, str, httpx.Response]]:
            random.Random(14).shuffle(calls)
            replies = await asyncio.gather(*(
                catalog.post("/reservations", json={"order_id": order_id, **order_body(("PEN-1", quantity))}, headers=service())
                if method == "POST" else catalog.delete(f"/reservations/{order_id}", headers=service())
                for method, order_id, quantity in calls
            ))
            failed = [f"{method} {order_id}: {reply.status_code}" for (method, order_id, _), reply in zip(calls, replies, strict=True)
                      if reply.status_code >= 500 or (method == "DELETE" and reply.status_code != 204)
                      or reply.status_code not in (200, 201, 204, 409)]
            assert not failed, (
                f"\nsent:     {len(calls)} reservations and releases at once, several for the same order\n"
                f"expected: no 5xx; each reservation 201, 200 (the same order again) or 409, each release 204\n"
                f"got:      {failed[:6]}\nA race on one order_id is the normal case for an idempotent "
                "route: insert the reservation with ON CONFLICT DO NOTHING (or catch the IntegrityError) "
                "and answer as for a repeat."
            )
            return [(method, order_id, reply) for (method, order_id, _), reply in zip(calls, replies, strict=True)]

        # Each order reserved twice and released, all at once: whichever runs first, every
        # order ends released and every unit back on the shelf.
        await at_once([(m, f"a-{i}", 3) for i in range(6) for m in ("POST", "POST", "DELETE")])
        stock = await stock_of(catalog, "PEN-1")
        assert stock == 100, (
            "\nsent:     6 orders, each reserved twice (3 units) and released, all at the same time\n"
            f"expected: every order released in the end, so stock 100\ngot:      stock {stock}: "
            f"{'units lost' if stock < 100 else 'units given back twice'}"
        )
        # Each order reserved three times at once: one 201, two 200 with the same reservation.
        replies = await at_once([("POST", f"b-{i}", 2) for i in range(5) for _ in range(3)])
        for i in range(5):
            mine = [reply for _, order_id, reply in replies if order_id == f"b-{i}"]
            codes = sorted(reply.status_code for reply in mine)
            assert codes == [200, 200, 201] and all(json_of(r) == json_of(mine[0]) for r in mine), explain(
                mine[0], f"the same reservation of order b-{i} three times at once: one 201 and two 200, all with the "
                         f"same reservation; got {codes}"
            )
        stock = await stock_of(catalog, "PEN-1")
        assert stock == 100 - 5 * 2, (
            f"\nexpected: 5 reservations of 2 units held once each: stock + reserved == 100, so stock 90\ngot:      stock {stock}"
        )
        # Each of them released twice at once: the units come back once.
        await at_once([("DELETE", f"b-{i}", 0) for i in range(5) for _ in range(2)])
        stock = await stock_of(catalog, "PEN-1")
        assert stock == 100, f"\nsent:     5 held reservations, each released twice at once\nexpected: stock 100\ngot:      stock {stock}"


@pytest.mark.promise("P10", "P25")
@pytest.mark.task("catalog")
@pytest.mark.asyncio
async def test_numbers_too_large_to_store_are_refused(load, tmp_path):
    async with serving(catalog_app(load, tmp_path)) as catalog:
        largest = {"sku": "BIG-1", "name": "Big", "price_cents": 100_000_000, "stock": 1_000_000}
        expect_status(await catalog.post("/products", json=largest, headers=admin_headers()), 201,
                      "price_cents 100,000,000 and stock 1,000,000 are the largest allowed")
        for field_name, value in (("price_cents", "100000001"), ("stock", "1000001"), ("price_cents", str(2**63)),
                                  ("stock", str(2**63)), ("stock", str(2**64 + 1)), ("price_cents", "1" + "0" * 40),
                                  ("stock", "1e309"), ("price_cents", "NaN"), ("stock", "-" + str(2**63 + 1))):
            raw = json.dumps(largest | {"sku": "BIG-2", field_name: 0}).replace(f'"{field_name}": 0', f'"{field_name}": {value}')
            response = await catalog.post("/products", content=raw, headers=admin_headers() | {"Content-Type": "application/json"})
            expect_problem(response, 422, f"{field_name} {value[:24]} is out of range: refused before it reaches the database "
                                         "(SQLite stores 64-bit integers; past that is a 500)")
        expect_problem(await catalog.get("/products/BIG-2"), 404, "none of them was created")


# ---------------------------------------------------------------------------------------
# Step 3 — orders: placing an order reserves stock over HTTP
# ---------------------------------------------------------------------------------------


@pytest.mark.promise("P11")
@pytest.mark.task("orders")
@pytest.mark.asyncio
async def test_placing_an_order_reserves_stock_and_stores_it(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5, 150)
        await add_product(shop.catalog, "INK-2", 5, 400)
        ada = mint("ada", CUSTOMER_SCOPES)
        response = await shop.orders.post("/orders", json=order_body(("PEN-1", 2), ("INK-2", 1)), headers=ada)
        expect_status(response, 201, "an order with enough stock is placed")
        order = expect_json(response, {"username": "ada", "status": "placed", "total_cents": 700})
        expect_header(response, "location", f"/orders/{order.get('id')}")
        lines = sorted((line["sku"], line["quantity"], line["price_cents"]) for line in order.get("items", []))
        assert lines == [("INK-2", 1, 400), ("PEN-1", 2, 150)], explain(response, "the items with the catalog's prices")
        assert "created_at" in order, explain(response, "a created_at timestamp")
        assert (await stock_of(shop.catalog, "PEN-1"), await stock_of(shop.catalog, "INK-2")) == (3, 4), explain(
            response, "the catalog's stock went down: PEN-1 3, INK-2 4"
        )
        expect_json(await shop.orders.get(f"/orders/{order['id']}", headers=ada), order, "the stored order reads back the same", exact=True)


@pytest.mark.promise("P31")
@pytest.mark.task("orders")
@pytest.mark.asyncio
async def test_orders_calls_the_catalog_with_its_own_service_token(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        placed = await shop.orders.post("/orders", json=order_body(("PEN-1", 1)), headers=mint("ada", CUSTOMER_SCOPES))
        expect_status(placed, 201, "an order")
        calls = [r for r in shop.catalog_wire.seen if r.url.path == "/reservations"]
        sent = calls[-1].headers.get("authorization", "") if calls else ""
        scheme, _, token = sent.partition(" ")
        assert scheme.lower() == "bearer" and token, explain(placed, f"orders' call to POST /reservations carries "
                                                                     f"Authorization: Bearer <its service token>; got {sent!r}")
        claims = user_claims(placed, token, INTERNAL_AUDIENCE)
        assert claims.get("sub") == "orders", explain(placed, f'the token users issued to orders (sub "orders"), got {claims}')
        asked = [r for r in shop.users_wire.seen if r.url.path == "/service-token"]
        assert asked, explain(placed, "orders asked users for its token (POST /service-token with its client id and secret)")


@pytest.mark.promise("P3", "P25")
@pytest.mark.task("orders")
@pytest.mark.asyncio
async def test_orders_check_scopes(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        body = order_body(("PEN-1", 1))
        expect_problem(await shop.orders.post("/orders", json=body), 401, "no token")
        expect_problem(await shop.orders.post("/orders", json=body, headers=mint("ada", ["orders:read"])), 403,
                      "placing an order needs orders:write")
        expect_problem(await shop.orders.get("/orders", headers=mint("ada", ["orders:write"])), 403,
                      "reading orders needs orders:read")
        assert await stock_of(shop.catalog, "PEN-1") == 5, "a refused order must not touch the stock"


@pytest.mark.promise("P11", "P25")
@pytest.mark.task("orders")
@pytest.mark.asyncio
async def test_customers_only_see_their_own_orders(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        ada, bob = mint("ada", CUSTOMER_SCOPES), mint("bob", CUSTOMER_SCOPES)
        placed = await shop.orders.post("/orders", json=order_body(("PEN-1", 1)), headers=ada)
        order_id = expect_json(placed, {"username": "ada"})["id"]
        expect_problem(await shop.orders.get(f"/orders/{order_id}", headers=bob), 404, "bob cannot see ada's order: for him it does not exist")
        expect_problem(await shop.orders.get("/orders/no-such-order", headers=ada), 404, "an order that does not exist")
        assert await order_count(shop.orders, bob) == 0, "GET /orders for bob lists none of ada's orders"
        second = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=ada)
        second_id = expect_json(second, {"username": "ada"})["id"]
        listed = await shop.orders.get("/orders", headers=ada)
        ids = [o.get("id") for o in json_of(listed)]
        assert ids == [second_id, order_id], explain(
            listed, f"ada's two orders, newest first: {[second_id, order_id]}; got {ids}"
        )


@pytest.mark.promise("P12", "P25")
@pytest.mark.task("orders")
@pytest.mark.asyncio
async def test_orders_that_cannot_be_served_place_nothing(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 1)
        ada = mint("ada", CUSTOMER_SCOPES)
        short = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=ada)
        expect_problem(short, 409, "the catalog has too little stock: the catalog's 409 is passed on")
        unknown = await shop.orders.post("/orders", json=order_body(("NOPE-9", 1)), headers=ada)
        expect_problem(unknown, 422, "the catalog does not know the SKU: the order is invalid")
        for body, why in (({"items": []}, "no lines"), (order_body(("PEN-1", 0)), "a quantity of 0"),
                          (order_body(("PEN-1", 101)), "a quantity above 100"),
                          (order_body(*[(f"SKU-{i}", 1) for i in range(21)]), "21 lines, at most 20"),
                          (order_body(("pen lowercase", 1)), "a malformed SKU")):
            expect_problem(await shop.orders.post("/orders", json=body, headers=ada), 422,
                          f"invalid order lines ({why}): orders validates them itself")
        assert await order_count(shop.orders, ada) == 0, "none of these orders may be stored"
        assert await stock_of(shop.catalog, "PEN-1") == 1, "and the stock is untouched"


# ---------------------------------------------------------------------------------------
# Step 4 — failures: a failing catalog leaves no half-placed order
# ---------------------------------------------------------------------------------------


FAILURE_STATUS = {
    502: "502 Bad Gateway, the catalog failed",
    503: "503 Service Unavailable, the catalog cannot be reached",
    504: "504 Gateway Timeout, the catalog did not answer in time",
}


async def failed_order(shop: Shop, mode: str) -> tuple[httpx.Response, float]:
    await add_product(shop.catalog, "PEN-1", 5)
    shop.catalog_wire.mode, shop.catalog_wire.method, shop.catalog_wire.path = mode, "POST", "/reservations"
    started = time.monotonic()
    response = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=mint("ada", CUSTOMER_SCOPES))
    elapsed = time.monotonic() - started
    shop.catalog_wire.mode = None
    return response, elapsed


async def expect_nothing_placed(shop: Shop, response: httpx.Response, status: int, what: str) -> None:
    expect_problem(response, status, f"{what}: {FAILURE_STATUS[status]}")
    assert await order_count(shop.orders, mint("ada", CUSTOMER_SCOPES)) == 0, explain(response, f"{what}: no order stored")
    stock = await stock_of(shop.catalog, "PEN-1")
    assert stock == 5, explain(
        response, f"{what}: the stock back at 5 (got {stock}). If the catalog may have reserved, release the "
                  "reservation (DELETE /reservations/{order_id}) before answering."
    )


@pytest.mark.promise("P13", "P25")
@pytest.mark.task("failures")
@pytest.mark.asyncio
async def test_an_unreachable_catalog_places_nothing(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        response, _ = await failed_order(shop, "refuse")
        await expect_nothing_placed(shop, response, 503, "the catalog refused the connection")


@pytest.mark.promise("P13", "P25")
@pytest.mark.task("failures")
@pytest.mark.asyncio
async def test_a_catalog_error_after_reserving_is_compensated(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        response, _ = await failed_order(shop, "error_after")
        await expect_nothing_placed(shop, response, 502, "the catalog reserved, then answered 500")


@pytest.mark.promise("P13", "P25")
@pytest.mark.task("failures")
@pytest.mark.asyncio
async def test_a_lost_reply_times_out_and_is_compensated(load, tmp_path):
    async with open_shop(load, tmp_path, catalog_timeout=0.3) as shop:
        response, elapsed = await failed_order(shop, "lose_reply")
        assert elapsed < 2.5, explain(
            response, f"an answer within about catalog_timeout (0.3 s), not after {elapsed:.1f} s: "
                      "put a deadline on the call to the catalog"
        )
        await expect_nothing_placed(shop, response, 504, "the catalog reserved but its reply never came")


@pytest.mark.promise("P13", "P25")
@pytest.mark.task("failures")
@pytest.mark.asyncio
async def test_a_hanging_catalog_does_not_hang_the_order(load, tmp_path):
    async with open_shop(load, tmp_path, catalog_timeout=0.3) as shop:
        response, elapsed = await failed_order(shop, "hang")
        assert elapsed < 2.5, explain(response, f"an answer within about catalog_timeout (0.3 s), not after {elapsed:.1f} s")
        await expect_nothing_placed(shop, response, 504, "the catalog never answered")


@pytest.mark.promise("P14")
@pytest.mark.task("failures")
@pytest.mark.asyncio
async def test_a_release_that_fails_is_retried_until_the_catalog_confirms_it(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        # The catalog reserves and then fails, and the release cannot reach it either.
        shop.catalog_wire.mode, shop.catalog_wire.method, shop.catalog_wire.path = "error_after", "POST", "/reservations"
        shop.catalog_wire.also = [("refuse", "DELETE", "/reservations")]
        response = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=mint("ada", CUSTOMER_SCOPES))
        expect_problem(response, 502, "the catalog failed after reserving")
        assert await stock_of(shop.catalog, "PEN-1") == 3, "the release could not reach the catalog: 2 units still held"
        still_down = await shop.orders.post("/outbox/dispatch", headers=service())
        expect_status(still_down, 200, "a dispatch while the catalog still refuses")
        shop.catalog_wire.mode, shop.catalog_wire.also = None, []
        dispatched = await shop.orders.post("/outbox/dispatch", headers=service())
        expect_status(dispatched, 200, "POST /outbox/dispatch with the service token")
        stock = await stock_of(shop.catalog, "PEN-1")
        releases = [r.url.path for r in shop.catalog_wire.seen if r.method == "DELETE"]
        assert stock == 5, explain(
            dispatched, f"the release that failed is retried once the catalog is back: stock 5 again (got {stock}). "
                        f"orders sent these releases: {releases}. Write the release down (a table of pending "
                        "releases) and retry it on every dispatch until the catalog answers 2xx."
        )
        await shop.orders.post("/outbox/dispatch", headers=service())
        assert await stock_of(shop.catalog, "PEN-1") == 5, "a confirmed release is not sent again"
        assert await order_count(shop.orders, mint("ada", CUSTOMER_SCOPES)) == 0, "and no order was stored"


# ---------------------------------------------------------------------------------------
# Step 5 — events: OrderPlaced goes through JetStream to the users' read model, once in effect
# ---------------------------------------------------------------------------------------


def order_placed(event_id: str, username: str = "ada", total_cents: int = 300) -> dict[str, Any]:
    return {"event_id": event_id, "type": "OrderPlaced", "order_id": f"order-{event_id}", "username": username,
            "total_cents": total_cents, "occurred_at": datetime.now(timezone.utc).isoformat()}


async def stats(users: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int]:
    me = json_of(await users.get("/users/me", headers=headers))
    return me.get("orders_placed"), me.get("total_spent_cents")


async def _stats_are(users: httpx.AsyncClient, headers: dict[str, str], wanted: tuple[int, int]) -> bool:
    return await stats(users, headers) == wanted


async def publish_event(js: Any, body: dict[str, Any] | bytes, message_id: str) -> None:
    """Publish on orders.placed as orders does (README, step 5), with this Nats-Msg-Id."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        await js.publish(SUBJECT, data, headers={"Nats-Msg-Id": message_id})
    except nats.errors.NoRespondersError:
        pytest.fail(f"\nsent:     a message on {SUBJECT} once users had started\nexpected: the stream {ORDERS_STREAM} "
                    f"stores it\ngot:      no stream takes {SUBJECT}: create {ORDERS_STREAM} and {DEAD_STREAM} at "
                    "startup (js.add_stream), whichever service starts first (README, step 5)", pytrace=False)


async def stream_messages(js: Any, stream: str) -> list[Any]:
    """Every message a stream holds, oldest first (none when the stream does not exist)."""
    try:
        state = (await js.stream_info(stream)).state
    except nats.js.errors.NotFoundError:
        return []
    return [await js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)] if state.messages else []


async def consumer_info(js: Any) -> Any | None:
    try:
        return await js.consumer_info(ORDERS_STREAM, DURABLE)
    except nats.js.errors.NotFoundError:
        return None


async def settled(js: Any) -> bool:
    """users' durable consumer has been handed every message of ORDERS, and has settled each
    (acknowledged, or ended it): nothing is waiting, nothing is in flight."""
    info = await consumer_info(js)
    if info is None:
        return False
    last = (await js.stream_info(ORDERS_STREAM)).state.last_seq
    return info.delivered.stream_seq >= last and info.num_pending == 0 and info.num_ack_pending == 0


async def describe_consumer(js: Any) -> str:
    info = await consumer_info(js)
    if info is None:
        return f"users has no durable consumer named {DURABLE!r} on {ORDERS_STREAM}"
    return (f"the consumer {DURABLE!r} was handed up to stream message {info.delivered.stream_seq}; "
            f"{info.num_ack_pending} in flight (not acknowledged), {info.num_pending} not handed out yet")


@pytest.mark.promise("P15")
@pytest.mark.task("events")
@pytest.mark.asyncio
async def test_the_same_event_twice_changes_nothing(load, tmp_path):
    async with serving(users_app(load, tmp_path)) as users, broker_client() as js:
        ada = await customer(users)
        event = order_placed("evt-1", total_cents=450)
        # Two copies that the broker's duplicate window does not catch (the second was published
        # with another Nats-Msg-Id, or after the window): only users can tell they are one event.
        await publish_event(js, event, "copy-1")
        await publish_event(js, event, "copy-2")
        await publish_event(js, order_placed("evt-2", total_cents=50), "evt-2")
        done = await eventually(lambda: settled(js), 10.0)
        got = await stats(users, ada)
        assert done and got == (2, 500), (
            "\nsent:     the OrderPlaced evt-1 (450 cents) twice on orders.placed, then evt-2 (50 cents)\n"
            "expected: GET /users/me shows orders_placed 2 and total_spent_cents 500: evt-1 counted once\n"
            f"got:      {got}; {await describe_consumer(js)}\n"
            "Record each event_id in the same transaction as the read model's change, and skip an ID you have seen."
        )


@pytest.mark.promise("P17")
@pytest.mark.task("events")
@pytest.mark.asyncio
async def test_an_event_users_cannot_apply_is_dead_lettered_and_blocks_no_other(load, tmp_path):
    async with serving(users_app(load, tmp_path, admin_username=None)) as users, broker_client() as js:
        ada = await customer(users)
        # Events no delivery can ever apply: not JSON, not an OrderPlaced, a total outside
        # 0-10**12 (SQLite stores 64-bit integers: 2**63 is an OverflowError on every delivery).
        poison = [b"not json", json.dumps({"type": "OrderPlaced", "event_id": "half"}).encode()]
        for value in (str(10**12 + 1), str(2**63), str(2**64), "1e309", "NaN", "-1"):
            raw = json.dumps(order_placed(f"evt-{value[:8]}", total_cents=0))
            poison.append(raw.replace('"total_cents": 0', f'"total_cents": {value}').encode())
        for number, body in enumerate(poison):
            await publish_event(js, body, f"poison-{number}")
        await publish_event(js, order_placed("evt-max", total_cents=10**12), "evt-max")  # the largest total allowed
        await publish_event(js, order_placed("evt-ok", total_cents=5), "evt-ok")

        async def all_set_aside() -> bool:
            return len(await stream_messages(js, DEAD_STREAM)) >= len(poison) and await settled(js)

        done = await eventually(all_set_aside, 15.0)
        dead = await stream_messages(js, DEAD_STREAM)
        got = await stats(users, ada)
        assert got == (2, 10**12 + 5), (
            f"\nsent:     {len(poison)} events users can never apply, then two valid events by ada (10**12 and 5 cents)\n"
            f"expected: ada's events applied, the others never counted: orders_placed 2, total_spent_cents {10**12 + 5}\n"
            f"got:      {got}; {await describe_consumer(js)}"
        )
        assert done and sorted(m.data for m in dead) == sorted(poison), (
            f"\nsent:     {len(poison)} events users can never apply (not JSON, not an OrderPlaced, a total_cents "
            "outside 0-10**12)\n"
            f"expected: each kept in the stream {DEAD_STREAM} on {DEAD_SUBJECT}, its body unchanged, after at most "
            "max_deliver deliveries, and never delivered again\n"
            f"got:      {len(dead)} dead letters: {[m.data[:40] for m in dead]}; {await describe_consumer(js)}\n"
            "A message that fails validation will fail on every delivery: dead-letter it (publish it to "
            f"{DEAD_SUBJECT}, then term()) instead of retrying it forever."
        )
        wrong = [(m.subject, m.data[:40]) for m in dead if m.subject != DEAD_SUBJECT or not (m.headers or {}).get("Dead-Reason")]
        assert not wrong, f"\nexpected: every dead letter on {DEAD_SUBJECT} with a Dead-Reason header saying why\ngot:      {wrong}"


@pytest.mark.promise("P15")
@pytest.mark.task("events")
@pytest.mark.asyncio
async def test_orders_placed_through_the_gateway_update_the_read_model(load, tmp_path):
    async with open_shop(load, tmp_path) as shop, broker_client() as js:
        await add_product(shop.catalog, "PEN-1", 10, 150)
        ada = await customer(shop.gateway, prefix="/api")
        for quantity in (1, 3):
            expect_status(await shop.gateway.post("/api/orders", json=order_body(("PEN-1", quantity)), headers=ada), 201)
        updated = await eventually(lambda: _stats_are(shop.users, ada, (2, 600)), 10.0)
        got = await stats(shop.users, ada)
        assert updated, (
            "\nsent:     two orders by ada through the gateway (150 and 450 cents)\n"
            "expected: GET /users/me soon shows orders_placed 2 and total_spent_cents 600, fed by OrderPlaced events "
            f"through {ORDERS_STREAM}\ngot:      {got}; the stream holds {len(await stream_messages(js, ORDERS_STREAM))} "
            f"message(s); {await describe_consumer(js)}"
        )


@pytest.mark.promise("P35")
@pytest.mark.task("events")
@pytest.mark.asyncio
async def test_each_order_is_published_once_with_its_event_id(load, tmp_path):
    async with open_shop(load, tmp_path) as shop, broker_client() as js:
        await add_product(shop.catalog, "PEN-1", 10, 150)
        placed = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=mint("ada", CUSTOMER_SCOPES))
        order = expect_json(placed, {"status": "placed"}, "an order by ada")

        async def published() -> bool:
            return len(await stream_messages(js, ORDERS_STREAM)) >= 1

        await eventually(published, 10.0)
        for _ in range(2):  # dispatching again publishes nothing new
            expect_json(await shop.orders.post("/outbox/dispatch", headers=service()), {"published": 0, "pending": 0},
                        "POST /outbox/dispatch once the event is published: nothing left", exact=True)
        messages = await stream_messages(js, ORDERS_STREAM)
        assert len(messages) == 1, (
            f"\nsent:     one order, then POST /outbox/dispatch twice\nexpected: one message in {ORDERS_STREAM}\n"
            f"got:      {len(messages)}: {[m.data[:60] for m in messages]}"
        )
        message = messages[0]
        try:
            event = json.loads(message.data)
        except ValueError:
            event = {}
        wanted = {"type": "OrderPlaced", "order_id": order.get("id"), "username": "ada", "total_cents": 300}
        assert message.subject == SUBJECT and isinstance(event, dict) and all(event.get(k) == v for k, v in wanted.items()), (
            f"\nexpected: on {SUBJECT}, the OrderPlaced of the order: {wanted} and an event_id\n"
            f"got:      on {message.subject}: {message.data[:300]!r}"
        )
        message_id = (message.headers or {}).get("Nats-Msg-Id")
        assert message_id and message_id == event.get("event_id"), (
            f"\nexpected: the header Nats-Msg-Id equal to the event's event_id ({event.get('event_id')!r}), so that a publish "
            "repeated after a lost acknowledgement is stored once (the stream's duplicate window)\n"
            f"got:      Nats-Msg-Id {message_id!r}"
        )


@pytest.mark.promise("P16")
@pytest.mark.task("events")
@pytest.mark.slow
@pytest.mark.asyncio
async def test_orders_placed_while_the_broker_is_down_are_published_once_it_is_back(load, tmp_path):
    server = BROKER["server"]
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 10, 100)
        ada = await customer(shop.users)
        await asyncio.to_thread(server.halt)  # the broker goes away; its files stay
        try:
            for quantity in (1, 2, 3):
                placed = await shop.orders.post("/orders", json=order_body(("PEN-1", quantity)), headers=ada)
                expect_status(placed, 201, "an order while the broker is down: taken, its event kept in the outbox")
            for _ in range(3):
                waiting = await shop.orders.post("/outbox/dispatch", headers=service())
                expect_json(waiting, {"published": 0, "pending": 3},
                            "POST /outbox/dispatch while the broker is down: nothing published, the 3 events wait",
                            exact=True)
        finally:
            await asyncio.to_thread(server.start)  # back, on the same port, with the same streams

        async def outbox_empty() -> bool:
            return json_of(await shop.orders.post("/outbox/dispatch", headers=service())).get("pending") == 0

        emptied = await eventually(outbox_empty, 20.0)
        applied = await eventually(lambda: _stats_are(shop.users, ada, (3, 600)), 20.0)
        async with broker_client() as js:
            messages = await stream_messages(js, ORDERS_STREAM)
            consumer = await describe_consumer(js)
        orders = {o["id"] for o in json_of(await shop.orders.get("/orders", headers=ada))}
        announced = sorted(json.loads(m.data).get("order_id", "?") for m in messages)
        assert emptied and announced == sorted(orders), (
            "\nsent:     3 orders while the broker was down, then the broker came back\n"
            f"expected: the outbox empties and {ORDERS_STREAM} holds each order's event once: {sorted(orders)}\n"
            f"got:      outbox {'empty' if emptied else 'still pending'}; the stream announces {announced}"
        )
        assert applied, explain(await shop.users.get("/users/me", headers=ada),
                                f"the read model counts the 3 orders once the broker is back ({consumer})")


@pytest.mark.promise("P36")
@pytest.mark.task("events")
@pytest.mark.slow
@pytest.mark.asyncio
async def test_users_stopped_before_acknowledging_gets_the_event_again(load, tmp_path):
    database = tmp_path / "users.db"  # users_app's database_url
    async with broker_client() as js:
        async with serving(users_app(load, tmp_path)) as users:
            ada = await customer(users)
            # The database is busy (another writer holds its lock): users can receive the event but
            # not commit it. While it waits, users is stopped.
            lock = sqlite3.connect(database, isolation_level=None, timeout=30)
            lock.execute("BEGIN IMMEDIATE")
            try:
                await publish_event(js, order_placed("evt-a", total_cents=300), "evt-a")

                async def received_it() -> bool:
                    info = await consumer_info(js)
                    return info is not None and info.delivered.stream_seq >= 1

                received = await eventually(received_it, 10.0)
                assert received, (
                    f"\nsent:     an OrderPlaced on {SUBJECT}\nexpected: users' durable consumer {DURABLE!r} receives it\n"
                    f"got:      {await describe_consumer(js)}"
                )
            finally:
                # Let the database go once the shutdown has begun: users must not commit, or
                # acknowledge, what it was cut off in the middle of.
                asyncio.get_running_loop().call_later(0.3, lock.close)
        await publish_event(js, order_placed("evt-b", total_cents=50), "evt-b")  # while users is stopped
        async with serving(users_app(load, tmp_path)) as users:
            applied = await eventually(lambda: _stats_are(users, ada, (2, 350)), 15.0)
            done = await eventually(lambda: settled(js), 10.0)
            got = await stats(users, ada)
            assert applied and done and got == (2, 350), (
                "\nsent:     evt-a (300 cents) to a users service stopped before it could write it, then evt-b "
                "(50 cents) while users was down; users started again\n"
                "expected: both applied once, after ack_wait: orders_placed 2, total_spent_cents 350\n"
                f"got:      {got}; {await describe_consumer(js)}\n"
                f"Acknowledge only after the read model's change is committed, through a durable consumer "
                f"({DURABLE!r}) that the broker remembers across restarts."
            )


@pytest.mark.promise("P37")
@pytest.mark.task("events")
@pytest.mark.asyncio
async def test_users_work_on_an_event_continues_the_trace_of_its_order(load, tmp_path):
    traces = Traces()
    async with open_shop(load, tmp_path, traces=traces) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        placed = await shop.gateway.post("/api/orders", json=order_body(("PEN-1", 1)),
                                         headers=mint("ada", CUSTOMER_SCOPES) | {"traceparent": CALLER_TRACEPARENT})
        expect_status(placed, 201)

        def consumer_spans() -> list[ReadableSpan]:
            return [span for span in traces.spans("users") if span.kind == SpanKind.CONSUMER]

        async def handled() -> bool:
            return any(format_trace_id(span.context.trace_id) == CALLER_TRACE for span in consumer_spans())

        found = await eventually(handled, 10.0)
        assert found, explain(
            placed, f"users handles the order's OrderPlaced in a CONSUMER span of the order's trace ({CALLER_TRACE}): the "
                    "outbox keeps the request's traceparent, the message carries it as a header, and users continues "
                    f"it. Spans collected:\n{traces.waterfall()}", TRACING)
        span = next(span for span in consumer_spans() if format_trace_id(span.context.trace_id) == CALLER_TRACE)
        in_orders = {other.context.span_id for other in traces.spans("orders")}
        assert span.parent is not None and span.parent.span_id in in_orders, explain(
            placed, "users' CONSUMER span is the child of a span of orders (the one that published the event, or the "
                    f"request's); spans collected:\n{traces.waterfall()}", TRACING)


# ---------------------------------------------------------------------------------------
# Step 6 — gateway: one public entry point
# ---------------------------------------------------------------------------------------


@pytest.mark.promise("P18", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_the_gateway_routes_the_public_api(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        gateway = shop.gateway
        admin = await login(gateway, ADMIN["username"], ADMIN["password"], prefix="/api")
        created = await gateway.post("/api/products", json={"sku": "PEN-1", "name": "Pen", "price_cents": 150, "stock": 5}, headers=admin)
        expect_status(created, 201, "POST /api/products reaches the catalog, with the Authorization header passed on")
        expect_header(created, "location", "/api/products/PEN-1", "a Location the client can follow through the gateway")
        ada = await customer(gateway, prefix="/api")
        placed = await gateway.post("/api/orders", json=order_body(("PEN-1", 2)), headers=ada)
        order = expect_json(placed, {"username": "ada", "total_cents": 300})
        expect_header(placed, "location", f"/api/orders/{order.get('id')}")
        expect_json(await gateway.get(f"/api/orders/{order['id']}", headers=ada), {"id": order["id"]})
        expect_json(await gateway.get("/api/products/PEN-1"), {"stock": 3})
        products = json_of(await gateway.get("/api/products"))
        assert [p.get("sku") for p in products] == ["PEN-1"], f"\nexpected: GET /api/products lists PEN-1\ngot:      {products}"
        queried = await gateway.get("/api/products?color=blue&page=2")
        forwarded = [r.url.raw_path.decode() for r in shop.gateway_wires["catalog"].seen]
        assert forwarded[-1:] == ["/products?color=blue&page=2"], explain(
            queried, f"the catalog asked for /products?color=blue&page=2 (the query string kept); it was asked for {forwarded[-1:]}"
        )
        expect_json(await gateway.get("/api/users/me", headers=ada), {"username": "ada"})
        anonymous = await gateway.get("/api/users/me", headers={"Authorization": "Bearer not-a-jwt"})
        expect_problem(anonymous, 401, "users refuses the token; the gateway passes its answer on")
        expect_header(anonymous, "www-authenticate", "Bearer", "the upstream WWW-Authenticate is kept")


# The internal routes, as (method, path) on the service. An order ID that would do harm if it
# got through: a release of a real reservation.
INTERNAL_ROUTES = (
    ("POST", "reservations"), ("DELETE", "reservations/{order}"), ("POST", "service-token"), ("POST", "outbox/dispatch"),
)
PUBLIC_PREFIXES = ("users", "token", "products", "orders", "users/me", "products/PEN-1", "orders/o-1")
# Ways to write "../" that a server decodes into it, or that a proxy may resolve after decoding.
DOT_DOT_SLASH = ("..%2F", "..%2f", "%2E%2E%2F", "%2e%2e/", ".%2E/", "%2E./", "..%5C", "%2E%2E%5C", "..%252F",
                 "%2e%2e%2f%2e%2e%2f", "..%2F..%2F")


def traversal_attempts(order_id: str) -> list[tuple[str, str]]:
    """(method, path) pairs that name an internal route through a public one."""
    attempts = []
    for i, (dots, (method, route)) in enumerate(itertools.product(DOT_DOT_SLASH, INTERNAL_ROUTES)):
        prefix = PUBLIC_PREFIXES[i % len(PUBLIC_PREFIXES)]  # every encoding, every route, every prefix
        up = "..%2F" * prefix.count("/")  # climb out of every segment of the prefix first
        attempts.append((method, f"/api/{prefix}/{up}{dots}{route.format(order=order_id)}"))
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):  # a bare dot segment, any method
        for path in ("/api/products/%2E%2E", "/api/orders/%2e", "/api/products/..%2F", "/api/users/%2E%2E%2Fusers%2Fme"):
            attempts.append((method, path))
    return attempts


@pytest.mark.promise("P19", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_the_gateway_hides_internal_routes(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        public = await shop.gateway.get("/api/products/PEN-1")
        expect_status(public, 200, "the public route next to them is forwarded (a gateway that 404s everything hides nothing)")
        for method, path, body in (
            ("POST", "/api/reservations", {"order_id": "x", **order_body(("PEN-1", 5))}),
            ("DELETE", "/api/reservations/x", None),
            ("POST", "/api/service-token", None),
            ("POST", "/api/outbox/dispatch", None),
        ):
            response = await shop.gateway.request(method, path, json=body, headers=service())
            expect_problem(response, 404, "internal routes are not part of the public API")
        assert await stock_of(shop.catalog, "PEN-1") == 5, "nothing reserved through the gateway"


@pytest.mark.promise("P19")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_no_encoding_of_dot_dot_reaches_an_internal_route(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        held = await shop.orders.post("/orders", json=order_body(("PEN-1", 2)), headers=mint("ada", CUSTOMER_SCOPES))
        order_id = expect_json(held, {"status": "placed"}, "an order to try to release behind its back")["id"]
        before = {name: len(wire.seen) for name, wire in shop.gateway_wires.items()}
        attempts = traversal_attempts(order_id)
        bodies = {"reservations": {"order_id": "evil", **order_body(("PEN-1", 3))}}
        headers = mint("ada", CUSTOMER_SCOPES)
        for method, path in attempts:
            body = next((b for name, b in bodies.items() if path.endswith(name)), None)
            response = await shop.gateway.request(method, path, json=body, headers=headers)
            forwarded = [(name, f"{r.method} {r.url.path}") for name, wire in shop.gateway_wires.items()
                         for r in wire.seen[before[name]:]]
            assert response.status_code in (404, 405) and not forwarded, explain(
                response, f"path traversal: {method} {path} is decoded to a path that is not public. 404 (or 405), and "
                          f"nothing forwarded; the gateway sent {forwarded}. Forward only an allow-list of exact routes, "
                          "and refuse a path segment that is empty, '.', '..' or holds '/' or '\\' once decoded."
            )
        assert await stock_of(shop.catalog, "PEN-1") == 3, f"after {len(attempts)} attempts the stock is as the order left it"


@pytest.mark.promise("P20", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_internal_routes_need_the_service_token(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        admin_jwt = mint("admin", ["catalog:write", "orders:read", "orders:write"])
        intruders = [("no credential", {}), ("a user's token, even the admin's", admin_jwt),
                     ("a service token in the wrong scheme", {"Authorization": "Basic " + service()["Authorization"].split()[1]}),
                     *((f"a service token {what}", headers) for what, headers in forged_tokens(INTERNAL_AUDIENCE))]
        for client, method, path, body in (
            (shop.catalog, "POST", "/reservations", {"order_id": "o-9", **order_body(("PEN-1", 5))}),
            (shop.catalog, "DELETE", "/reservations/o-9", None),
            (shop.orders, "POST", "/outbox/dispatch", None),
        ):
            for who, headers in intruders:
                response = await client.request(method, path, json=body, headers=headers)
                expect_problem(response, 401, f"{method} {path} with {who}: internal routes answer only a service's "
                                              "token, even when the gateway is bypassed")
                expect_header(response, "www-authenticate", "Bearer")
        assert await stock_of(shop.catalog, "PEN-1") == 5, "no refused request reserved anything"
        release = await shop.catalog.delete("/reservations/o-9", headers=service())
        expect_status(release, 204, "with the service token, the internal route works")


@pytest.mark.promise("P21", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_the_gateway_refuses_a_body_too_large(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        huge = b'{"username": "ada", "password": "' + b"x" * (1024 * 1024) + b'"}'
        response = await shop.gateway.post("/api/users", content=huge, headers={"Content-Type": "application/json"})
        expect_problem(response, 413, "a body over max_body_bytes (1 MiB by default) is refused by the gateway")
        assert not shop.gateway_wires["users"].seen, explain(response, "and never forwarded")


@pytest.mark.promise("P21", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_the_gateway_relays_no_answer_larger_than_its_limit(load, tmp_path):
    module = load("microshop/gateway")
    json_type = {"content-type": "application/json"}
    cases = {  # what the catalog streams -> its chunks, its headers, relayed or not
        "exactly max_body_bytes (1000), in 10 chunks": ([b"x" * 100] * 10, json_type, True),
        "one byte more, in 11 chunks": ([b"x" * 100] * 10 + [b"x"], json_type, False),
        "200 chunks of 100 bytes": ([b"x" * 100] * 200, json_type, False),
        "5000 bytes gzipped to a few dozen (Content-Encoding: gzip)": ([gzip.compress(b"x" * 5000)],
                                                                        json_type | {"content-encoding": "gzip"}, False),
    }
    for what, (chunks, headers, relayed) in cases.items():
        catalog = Streaming(chunks, headers)
        app = module.create_app(module.Settings(max_body_bytes=1000),
                                transports={"catalog": catalog} | unreachable("users", "orders"))
        async with serving(app) as gateway:
            response = await gateway.get("/api/products")
        why = f"GET /api/products with max_body_bytes=1000: the catalog answered 200 with a body of {what}"
        if relayed:
            assert (response.status_code, response.content) == (200, b"".join(chunks)), explain(
                response, f"{why}: at the limit, relayed as it is (200 and the same 1000 bytes)")
            continue
        expect_problem(response, 502, f"{why}: larger than the gateway relays (once decoded), a 502 problem")
        pulled = [answer.pulled for answer in catalog.answers]
        assert pulled and max(pulled) <= 14, explain(
            response, f"{why}: the answer is read as it streams in, and no further than the limit, so that a service "
            f"streaming gigabytes does not fill the gateway's memory; the catalog handed over {pulled} of its "
            f"{len(chunks)} chunks")


@pytest.mark.promise("P21", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_the_gateway_reports_unavailable_services(load, tmp_path):
    async with open_shop(load, tmp_path, gateway_timeout=0.3) as shop:
        shop.gateway_wires["catalog"].mode = "refuse"
        down = await shop.gateway.get("/api/products/PEN-1")
        expect_problem(down, 503, "the catalog cannot be reached: 503 Service Unavailable")
        assert "detail" in json_of(down), explain(down, 'a JSON body {"detail": "..."}')
        shop.gateway_wires["catalog"].mode = "hang"
        started = time.monotonic()
        slow = await shop.gateway.get("/api/products/PEN-1")
        expect_problem(slow, 504, "the catalog did not answer within the gateway's timeout: 504 Gateway Timeout")
        assert time.monotonic() - started < 2.5, explain(slow, "an answer within about the gateway timeout (0.3 s)")


@pytest.mark.promise("P22")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_a_request_id_follows_the_request_through_every_service(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        headers = mint("ada", CUSTOMER_SCOPES) | {"X-Request-ID": "trace-42"}
        placed = await shop.gateway.post("/api/orders", json=order_body(("PEN-1", 1)), headers=headers)
        expect_status(placed, 201)
        expect_header(placed, "x-request-id", "trace-42", "the gateway answers with the caller's request ID")
        to_orders = [r.headers.get("x-request-id") for r in shop.gateway_wires["orders"].seen]
        to_catalog = [r.headers.get("x-request-id") for r in shop.catalog_wire.seen if r.url.path == "/reservations"]
        assert to_orders == ["trace-42"] and to_catalog == ["trace-42"], explain(
            placed, f"X-Request-ID trace-42 on the gateway's call to orders and on orders' call to catalog; "
                    f"got {to_orders} and {to_catalog}"
        )
        fresh = await shop.gateway.get("/health")
        assert fresh.headers.get("x-request-id"), explain(fresh, "a request without an ID gets one, returned in X-Request-ID")
        services = (("gateway", shop.gateway), ("users", shop.users), ("catalog", shop.catalog), ("orders", shop.orders))
        for name, client in services:
            longest = "r" * 64
            kept = await client.get("/no-such-route", headers={"X-Request-ID": longest})
            expect_header(kept, "x-request-id", longest, f"{name}: an ID of 64 allowed characters is the caller's to "
                                                         "keep, on an error response too")
            for forged, why in (("two words", "a space"), ("x" * 65, "65 characters, one more than 64"),
                                ("trace-42\n", "a trailing newline (re.match with ^...$ lets it through: $ matches "
                                               "before a final newline; use re.fullmatch)"),
                                ("a/b", "a slash")):
                refused = await client.get("/health", headers={"X-Request-ID": forged})
                got = refused.headers.get("x-request-id", "")
                assert REQUEST_ID.fullmatch(got) and got != forged.strip(), explain(
                    refused, f"{name}: X-Request-ID {forged[:20]!r} ({why}) is not 1-64 letters, digits, '.', '_' or '-': "
                             f"a new ID instead of the caller's; got {got!r}"
                )


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"  # sampled (-01): the spans of its trace are recorded
MALFORMED_TRACEPARENTS = [
    ("garbage", "not Trace Context at all"),
    (f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01", "upper-case hex"),
    (f"00-{'0' * 32}-{CALLER_SPAN}-01", "an all-zero trace ID"),
    (f"00-{CALLER_TRACE}-{'0' * 16}-01", "an all-zero parent span ID"),
    (f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01", "the forbidden version ff"),
    (f"00-{CALLER_TRACE[:-1]}-{CALLER_SPAN}-01", "a trace ID one digit short"),
    (f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra", "version 00 with a fifth field"),
]
TRACING = "lesson 12, Distributed tracing; lesson 15, One trace across the shop"


async def one_server_span(traces: Traces, service: str, client: httpx.AsyncClient, path: str,
                          headers: dict[str, str]) -> tuple[httpx.Response, ReadableSpan]:
    """Send GET `path` to one service and return its answer and the one SERVER span it recorded."""
    traces.clear()
    response = await client.get(path, headers=headers)
    servers = traces.servers(service)
    if len(servers) != 1:
        pytest.fail(explain(response, f"{service}: exactly one SERVER span for this request, from the tracer_provider "
                                      f"given to create_app; got {len(servers)}. Spans collected:\n{traces.waterfall()}",
                            TRACING), pytrace=False)
    return response, servers[0]


@pytest.mark.promise("P32", "P22")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_every_service_continues_a_valid_traceparent_and_replaces_a_malformed_one(load, tmp_path):
    traces = Traces()
    async with open_shop(load, tmp_path, traces=traces) as shop:
        services = (("gateway", shop.gateway), ("users", shop.users), ("catalog", shop.catalog), ("orders", shop.orders))
        # A route with a path parameter, and the answer it gives here (no such product; no token).
        templated = {"gateway": ("/api/products/NOPE-1", "/api/products/{sku}", 404),
                     "catalog": ("/products/NOPE-1", "/products/{sku}", 404), "orders": ("/orders/x1", "/orders/{order_id}", 401)}
        for name, client in services:
            paths = [("/health", "/health", 200), ("/no-such-route", None, 404), *([templated[name]] if name in templated else [])]
            for path, route, code in paths:
                response, span = await one_server_span(traces, name, client, path, {"traceparent": CALLER_TRACEPARENT})
                expect_status(response, code)
                got = (format_trace_id(span.context.trace_id), span.parent and format_span_id(span.parent.span_id))
                assert got == (CALLER_TRACE, CALLER_SPAN), explain(
                    response, f"{name}: sent traceparent {CALLER_TRACEPARENT}: the SERVER span continues that trace "
                              f"({CALLER_TRACE}) with the caller's span ({CALLER_SPAN}) as its parent; got trace {got[0]}, "
                              f"parent {got[1]}", TRACING)
                if route is not None:
                    assert span.name == f"GET {route}", explain(
                        response, f"{name}: the SERVER span is named by method and route template, 'GET {route}'; "
                                  f"got {span.name!r}", TRACING)
                expect_header(response, "x-request-id", CALLER_TRACE,
                              f"{name}: no X-Request-ID was sent, so the request ID is the request's trace ID, on a "
                              f"{code} too")
            for malformed, why in MALFORMED_TRACEPARENTS:
                response, span = await one_server_span(traces, name, client, "/health", {"traceparent": malformed})
                expect_status(response, 200, f"{name}: a malformed traceparent ({why}) is ignored, never an error")
                trace_id = format_trace_id(span.context.trace_id)
                assert span.parent is None and trace_id != CALLER_TRACE, explain(
                    response, f"{name}: sent the malformed traceparent {malformed!r} ({why}): a new trace, the SERVER "
                              f"span a root with a fresh trace ID; got trace {trace_id}, parent "
                              f"{span.parent and format_span_id(span.parent.span_id)}", TRACING)
                expect_header(response, "x-request-id", trace_id,
                              f"{name}: without an X-Request-ID, the request ID is the new trace's ID")


def server_span(traces: Traces, service: str, name: str, response: httpx.Response) -> ReadableSpan:
    found = [span for span in traces.servers(service) if span.name == name]
    if len(found) != 1:
        pytest.fail(explain(response, f"one SERVER span {name!r} in {service}; got {len(found)}. Spans collected:\n"
                                      f"{traces.waterfall()}", TRACING), pytrace=False)
    return found[0]


@pytest.mark.promise("P33")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_one_order_through_the_gateway_is_one_trace_across_every_service(load, tmp_path):
    traces = Traces()
    async with open_shop(load, tmp_path, traces=traces) as shop:
        await add_product(shop.catalog, "PEN-1", 5)
        traces.clear()
        placed = await shop.gateway.post("/api/orders", json=order_body(("PEN-1", 1)),
                                         headers=mint("ada", CUSTOMER_SCOPES) | {"traceparent": CALLER_TRACEPARENT})
        expect_status(placed, 201)
        expect_header(placed, "x-request-id", CALLER_TRACE, "no X-Request-ID was sent: the request ID is the trace ID")
        gateway = server_span(traces, "gateway", "POST /api/orders", placed)
        # Each hop: the callee's SERVER span, and the service whose span must be its parent.
        hops = [("orders", "POST /orders", "gateway"), ("catalog", "POST /reservations", "orders"),
                ("users", "POST /service-token", "orders")]
        spans = {"gateway": gateway} | {callee: server_span(traces, callee, name, placed) for callee, name, _ in hops}
        wrong = [f"{service} {span.name}: trace {format_trace_id(span.context.trace_id)}"
                 for service, span in spans.items() if format_trace_id(span.context.trace_id) != CALLER_TRACE]
        assert not wrong, explain(
            placed, f"one trace ({CALLER_TRACE}, the caller's) across gateway, orders, catalog and users; got {wrong}. "
                    "A service that starts a trace of its own did not read the traceparent it was sent, or its caller "
                    f"did not send one. Spans collected:\n{traces.waterfall()}", TRACING)
        assert gateway.parent is not None and format_span_id(gateway.parent.span_id) == CALLER_SPAN, explain(
            placed, f"the gateway's SERVER span has the caller's span ({CALLER_SPAN}) as its parent", TRACING)
        for callee, name, caller in hops:
            callers = {span.context.span_id for span in traces.spans(caller)}
            parent = spans[callee].parent
            assert parent is not None and parent.span_id in callers, explain(
                placed, f"{callee}'s SERVER span {name!r} is the child of a span of {caller}, the service that called "
                        f"it (its traceparent names a span of {caller}: the current one when the call is made); got parent "
                        f"{parent and format_span_id(parent.span_id)}. Spans collected:\n{traces.waterfall()}", TRACING)
        strays = [f"{service} {span.name}" for service in Traces.SERVICES for span in traces.servers(service)
                  if format_trace_id(span.context.trace_id) != CALLER_TRACE]
        assert not strays, explain(
            placed, f"every SERVER span this order caused, in every service, belongs to its trace; these do not: {strays}. "
                    f"Spans collected:\n{traces.waterfall()}", TRACING)


def crashing(app: Any) -> Any:
    """The app with one more route, GET /crash, that raises as a bug would."""

    async def crash() -> None:
        raise RuntimeError("a bug in a route: secret-detail-42")

    app.add_api_route("/crash", crash, methods=["GET"])
    return app


@pytest.mark.promise("P34", "P22", "P25")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
@pytest.mark.parametrize("service", ["users", "catalog", "orders", "gateway"])
async def test_a_route_that_crashes_answers_a_500_problem_with_its_request_id(load, tmp_path, service):
    app = crashing(build_app(load, tmp_path, service))
    # raise_app_exceptions=False: the client gets the 500 the server sends, as over a real network.
    async with LifespanManager(app, startup_timeout=10), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://service"
    ) as client:
        kept = await client.get("/crash", headers={"X-Request-ID": "crash-1"})
        made_up = await client.get("/crash")
    # Checked once the app has shut down (LifespanManager skips the shutdown when its block raises).
    expect_problem(kept, 500, f"{service}: a route that raises answers the 500 problem")
    assert "secret-detail-42" not in kept.text and "RuntimeError" not in kept.text, explain(
        kept, f"{service}: a 500 that names no exception, message or traceback")
    expect_header(kept, "x-request-id", "crash-1",
                  f"{service}: the 500 of a crash carries the caller's X-Request-ID like any answer. Starlette's "
                  "ServerErrorMiddleware, outside every middleware you add, sends the 500 of an exception handler "
                  "for Exception without it: answer the 500 in your outermost middleware, then re-raise")
    got = made_up.headers.get("x-request-id", "")
    assert REQUEST_ID.fullmatch(got), explain(made_up, f"{service}: a 500 without an incoming ID still has an "
                                                       f"X-Request-ID; got {got!r}")


@pytest.mark.promise("P23")
@pytest.mark.task("gateway")
@pytest.mark.asyncio
async def test_every_service_reports_health_and_the_gateway_readiness(load, tmp_path):
    async with open_shop(load, tmp_path, gateway_timeout=0.3) as shop:
        for name, client in (("users", shop.users), ("catalog", shop.catalog), ("orders", shop.orders), ("gateway", shop.gateway)):
            expect_json(await client.get("/health"), {"status": "ok", "service": name}, exact=True)
        expect_json(await shop.gateway.get("/ready"),
                    {"status": "ready", "services": {"users": "up", "catalog": "up", "orders": "up"}}, exact=True)
        shop.gateway_wires["catalog"].mode = "refuse"
        not_ready = await shop.gateway.get("/ready")
        problem = expect_problem(not_ready, 503, "a service behind the gateway is down: the not-ready problem",
                                 type=NOT_READY)
        assert problem.get("title") == "Not ready", explain(not_ready, 'the title of the not-ready type: "Not ready"')
        expect_json(not_ready, {"services": {"users": "up", "catalog": "down", "orders": "up"}},
                    "the extra member `services` names each service up or down")


# The status codes each route must document in its service's OpenAPI schema (README.md).
DOCUMENTED = {
    "users": {("post", "/users"): {201, 409, 422}, ("post", "/token"): {200, 401, 422}, ("get", "/users/me"): {200, 401},
              ("get", "/.well-known/jwks.json"): {200},
              ("post", "/service-token"): {200, 401, 422}},
    "catalog": {("post", "/products"): {201, 401, 403, 409, 422, 503}, ("get", "/products"): {200},
                ("get", "/products/{sku}"): {200, 404}, ("post", "/reservations"): {200, 201, 401, 404, 409, 422, 503},
                ("delete", "/reservations/{order_id}"): {204, 401, 503}},
    "orders": {("post", "/orders"): {201, 401, 403, 409, 422, 502, 503, 504}, ("get", "/orders"): {200, 401, 403, 503},
               ("get", "/orders/{order_id}"): {200, 401, 403, 404, 503}, ("post", "/outbox/dispatch"): {200, 401, 503}},
    "gateway": {("get", "/ready"): {200, 503}, ("post", "/api/users"): {201, 409, 413, 422, 503, 504},
                ("post", "/api/token"): {200, 401, 413, 422, 503, 504}, ("get", "/api/users/me"): {200, 401, 503, 504},
                ("post", "/api/products"): {201, 401, 403, 409, 413, 422, 503, 504}, ("get", "/api/products"): {200, 503, 504},
                ("get", "/api/products/{sku}"): {200, 404, 503, 504},
                ("post", "/api/orders"): {201, 401, 403, 409, 413, 422, 502, 503, 504},
                ("get", "/api/orders"): {200, 401, 403, 503, 504}, ("get", "/api/orders/{order_id}"): {200, 401, 403, 404, 503, 504}},
}


def build_app(load, tmp_path: Path, service: str) -> Any:
    if service == "users":
        return users_app(load, tmp_path, admin_username=None)
    if service == "catalog":
        return catalog_app(load, tmp_path)
    module = load(f"microshop/{service}")
    if service == "orders":
        return module.create_app(module.Settings(database_url=sqlite(tmp_path, "orders"), client_secret=ORDERS_SECRET,
                                                 outbox_interval=0, nats_url=nats_url()),
                                 catalog_transport=Unreachable(), users_transport=Unreachable())
    return module.create_app(module.Settings(), transports=unreachable("users", "catalog", "orders"))


async def expect_every_status_documented(load, tmp_path: Path, service: str) -> None:
    app = build_app(load, tmp_path, service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        response = await client.get("/openapi.json")
    schema = expect_json(response, {"paths": {}}, f"the {service} service serves its OpenAPI schema")
    missing, not_problems = {}, {}
    for (method, path), codes in DOCUMENTED[service].items():
        responses = schema["paths"].get(path, {}).get(method, {}).get("responses", {})
        documented = {int(code) for code in responses if str(code).isdigit()}
        if codes - documented:
            missing[f"{method.upper()} {path}"] = sorted(codes - documented)
        plain = sorted(code for code in codes & documented if code >= 400
                       and "application/problem+json" not in responses[str(code)].get("content", {}))
        if plain:
            not_problems[f"{method.upper()} {path}"] = plain
    assert not not_problems, (
        f"\nexpected: every error status in the {service} service's OpenAPI schema answers application/problem+json\n"
        f"got:      {not_problems} without it\nDeclare errors with responses=problem_responses(404, ...) (problems.py): "
        "the schema then says that an error is a problem."
    )
    assert not missing, (
        f"\nexpected: the {service} service's OpenAPI schema lists every status code each route answers\n"
        f"got:      missing {missing}\nDeclare them in the route decorator: responses=problem_responses(404, ...); "
        "a client generated from the schema knows only the statuses it lists."
    )


@pytest.mark.task("users")
@pytest.mark.promise("P24")
@pytest.mark.asyncio
async def test_the_openapi_schema_documents_every_status_of_users(load, tmp_path):
    await expect_every_status_documented(load, tmp_path, "users")


@pytest.mark.task("catalog")
@pytest.mark.promise("P24")
@pytest.mark.asyncio
async def test_the_openapi_schema_documents_every_status_of_catalog(load, tmp_path):
    await expect_every_status_documented(load, tmp_path, "catalog")


@pytest.mark.task("orders")
@pytest.mark.promise("P24")
@pytest.mark.asyncio
async def test_the_openapi_schema_documents_every_status_of_orders(load, tmp_path):
    await expect_every_status_documented(load, tmp_path, "orders")


@pytest.mark.task("gateway")
@pytest.mark.promise("P24")
@pytest.mark.asyncio
async def test_the_openapi_schema_documents_every_status_of_gateway(load, tmp_path):
    await expect_every_status_documented(load, tmp_path, "gateway")


# ---------------------------------------------------------------------------------------
# Step 7 — end to end: in process, then as real processes
# ---------------------------------------------------------------------------------------


async def shopping_trip(gateway: httpx.AsyncClient) -> None:
    """The whole story through the gateway: the admin stocks a product, a customer registers,
    logs in, orders, and sees the order and the updated profile."""
    admin = await login(gateway, ADMIN["username"], ADMIN["password"], prefix="/api")
    await add_product(gateway, "MUG-7", 4, 900, prefix="/api", headers=admin)
    grace = await customer(gateway, "grace", prefix="/api")
    placed = await gateway.post("/api/orders", json=order_body(("MUG-7", 3)), headers=grace | {"X-Request-ID": "e2e-1"})
    order = expect_json(placed, {"username": "grace", "status": "placed", "total_cents": 2700})
    expect_header(placed, "x-request-id", "e2e-1")
    expect_json(await gateway.get("/api/products/MUG-7"), {"stock": 1}, "the catalog's stock went down")
    listed = json_of(await gateway.get("/api/orders", headers=grace))
    assert [o.get("id") for o in listed] == [order["id"]], f"\nexpected: GET /api/orders lists grace's order\ngot:      {listed}"
    refused = await gateway.post("/api/orders", json=order_body(("MUG-7", 2)), headers=grace)
    expect_problem(refused, 409, "only 1 mug is left")

    async def profile_updated() -> bool:
        me = json_of(await gateway.get("/api/users/me", headers=grace))
        return (me.get("orders_placed"), me.get("total_spent_cents")) == (1, 2700)

    assert await eventually(profile_updated, 5.0), (
        "\nexpected: GET /api/users/me shows orders_placed 1 and total_spent_cents 2700 within 5 s of the order\n"
        f"got:      {json_of(await gateway.get('/api/users/me', headers=grace))}"
    )


@pytest.mark.promise("P26")
@pytest.mark.task("end_to_end")
@pytest.mark.asyncio
async def test_a_shopping_trip_in_process(load, tmp_path):
    async with open_shop(load, tmp_path) as shop:
        await shopping_trip(shop.gateway)


SERVICES = ("users", "catalog", "orders", "gateway")


class LiveShop:
    """The four services as real uvicorn processes on loopback ports, as in production."""

    def __init__(self, folder: Path, data: Path, broker: NatsServer) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.url = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.env = {
            "USERS_DATABASE_URL": sqlite(data, "users"), "USERS_SIGNING_KEY": KEY_PEM,
            "USERS_SERVICE_CLIENTS": json.dumps({"orders": ORDERS_SECRET}),
            "USERS_ADMIN_USERNAME": ADMIN["username"], "USERS_ADMIN_PASSWORD": ADMIN["password"],
            "USERS_ARGON2_TIME_COST": "1", "USERS_ARGON2_MEMORY_KIB": "1024",  # as cheap as FAST_HASH
            "USERS_NATS_URL": broker.url, "ORDERS_NATS_URL": broker.url,
            "CATALOG_DATABASE_URL": sqlite(data, "catalog"), "CATALOG_USERS_URL": self.url["users"],
            "ORDERS_DATABASE_URL": sqlite(data, "orders"), "ORDERS_CLIENT_ID": "orders", "ORDERS_CLIENT_SECRET": ORDERS_SECRET,
            "ORDERS_CATALOG_URL": self.url["catalog"], "ORDERS_USERS_URL": self.url["users"],
            "ORDERS_CATALOG_TIMEOUT": "2", "ORDERS_OUTBOX_INTERVAL": "0.5",
            "GATEWAY_USERS_URL": self.url["users"], "GATEWAY_CATALOG_URL": self.url["catalog"],
            "GATEWAY_ORDERS_URL": self.url["orders"], "GATEWAY_TIMEOUT": "3",
        }
        self.folder, self.data = folder, data
        self.running: dict[str, contextlib.AbstractContextManager] = {}
        self.error = ""

    def command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "uvicorn", f"microshop.{name}:create_app", "--factory",
                "--app-dir", str(self.folder), "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]

    def start(self) -> None:
        # Start all four at once: each needs a second or so to import its libraries.
        managers = {name: serve_in_process(self.command(name), cwd=self.data, env=self.env, port=self.ports[name],
                                           ready_path="/health", timeout=30) for name in SERVICES}
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = {name: pool.submit(manager.__enter__) for name, manager in managers.items()}
        for name, future in futures.items():
            try:
                future.result()
                self.running[name] = managers[name]
            except RuntimeError as exc:
                self.error += f"\n{name}: {exc}"
        if self.error:
            self.error = ("Not every service started as a uvicorn process (their output is shown above):" + self.error
                          + "\nEach one runs as: " + " ".join(self.command("<service>")))

    def stop(self, name: str) -> None:
        manager = self.running.pop(name, None)
        if manager is not None:
            manager.__exit__(None, None, None)

    def stop_all(self) -> None:
        # In parallel: each uvicorn takes a moment to shut down gracefully.
        names = list(self.running)
        if names:
            with ThreadPoolExecutor(len(names)) as pool:
                list(pool.map(self.stop, names))


@pytest.fixture(scope="module")
def live_shop(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = target_folder(request.config, load_exercise(Path(__file__).parent))
    # A broker of their own: the in-process tests empty the module's broker before each test.
    with NatsServer() as broker:
        shop = LiveShop(folder, tmp_path_factory.mktemp("live-shop"), broker)
        shop.start()
        yield shop
        shop.stop_all()


def live(shop: LiveShop, *needed: str) -> None:
    if shop.error:
        pytest.fail(shop.error, pytrace=False)
    gone = [name for name in needed if name not in shop.running]
    if gone:
        pytest.fail(f"{gone} were stopped by an earlier test of this module.", pytrace=False)


@pytest.mark.promise("P26")
@pytest.mark.task("end_to_end")
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_a_shopping_trip_across_real_processes(live_shop):
    live(live_shop, *SERVICES)
    async with httpx.AsyncClient(base_url=live_shop.url["gateway"], timeout=10, verify=http_only()) as gateway:
        await shopping_trip(gateway)


def raw_request(base_url: str, method: str, path: str, body: Any = None) -> int:
    """One request with the path exactly as written: an HTTP client library would resolve "..",
    a client that means harm does not."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        content = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=content, headers={"Content-Type": "application/json"} | service())
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.promise("P26")
@pytest.mark.task("end_to_end")
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_literal_dot_dot_through_the_real_gateway_reaches_nothing_internal(live_shop):
    live(live_shop, *SERVICES)
    async with httpx.AsyncClient(base_url=live_shop.url["gateway"], timeout=10, verify=http_only()) as gateway:
        await add_product(gateway, "DOT-9", 4, 300, prefix="/api", headers=admin_headers())
        placed = await gateway.post("/api/orders", json=order_body(("DOT-9", 1)), headers=mint("turing", CUSTOMER_SCOPES))
        order_id = expect_json(placed, {"status": "placed"}, "an order whose reservation an attacker would release")["id"]
        reserve = {"order_id": "evil-1", **order_body(("DOT-9", 3))}
        attempts = [
            ("POST", "/api/products/../reservations", reserve), ("POST", "/api/products/%2E%2E/reservations", reserve),
            ("DELETE", f"/api/products/../reservations/{order_id}", None),
            ("DELETE", f"/api/orders/../reservations/{order_id}", None),
            ("DELETE", f"/api/products/..%2Freservations%2F{order_id}", None),
            ("POST", "/api/users/../service-token", None), ("POST", "/api/users/me/../../service-token", None),
            ("POST", "/api/orders/../outbox/dispatch", None), ("POST", "/api/orders/./../outbox/dispatch", None),
            ("POST", "/api/orders/..%2Foutbox%2Fdispatch", None), ("POST", "/api/../reservations", reserve),
        ]
        for method, path, body in attempts:
            status = await asyncio.to_thread(raw_request, live_shop.url["gateway"], method, path, body)
            assert status in (400, 404, 405), (
                f"\nsent:     {method} {path} to the gateway, a real uvicorn process, with the path as written\n"
                f"expected: 404 (or 405, or 400): the path is not a public route, however it resolves\n"
                f"got:      {status}: the gateway forwarded it to a service"
            )
        expect_json(await gateway.get("/api/products/DOT-9"), {"stock": 3},
                    "the stock is as the order left it: nothing reserved or released through the gateway")


@pytest.mark.promise("P25", "P26")
@pytest.mark.task("end_to_end")
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_a_stopped_catalog_process_leaves_no_half_placed_order(live_shop):
    live(live_shop, *SERVICES)
    async with httpx.AsyncClient(base_url=live_shop.url["gateway"], timeout=10, verify=http_only()) as gateway:
        # Tokens made here, as users would issue them: logging in was the trip's job.
        await add_product(gateway, "CUP-3", 2, 500, prefix="/api", headers=admin_headers())
        hopper = mint("hopper", CUSTOMER_SCOPES)
        live_shop.stop("catalog")  # SIGTERM: the process is gone, its port refuses connections
        response = await gateway.post("/api/orders", json=order_body(("CUP-3", 1)), headers=hopper)
        expect_problem(response, 503, "orders cannot reach the catalog: no order now, try later")
        listed = json_of(await gateway.get("/api/orders", headers=hopper))
        assert listed == [], explain(response, f"no order stored for hopper; GET /api/orders lists {listed}")
