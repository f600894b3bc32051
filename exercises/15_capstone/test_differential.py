"""Differential tests for exercise 15: for the same requests, your shop answers as the reference's does.

Each shop, yours and the reference's, is the four services wired together in this process as
README.md shows the tests wire them (and as test_capstone.py's `open_shop` does): users with the
suite's Ed25519 signing key, the admin and orders' client secret; catalog and orders fetching
users' public keys through `users_transport`; orders reaching the catalog and users through its
transports; the gateway reaching all three through `transports`. Each service has its own SQLite
file, new for every copy of the shop, and the catalog starts with four products (PRODUCTS below,
created through its POST /products with an admin's token). The broker is down (no NATS server
listens at `nats_url`): orders are still placed and their events wait in the outbox (README,
step 5), so nothing that depends on a broker's timing is compared here (test_capstone.py covers
the events).

The shop is sent requests as one app: `/api/...`, `/health` and `/ready` go to the gateway; the
internal routes (`/service-token`, `/.well-known/jwks.json`, `/reservations...`,
`/outbox/dispatch`) to the service that owns them, directly, as another service would call them.
The requests come from the services' OpenAPI documents (each public route of the gateway with the
body of the service route it forwards to, and an Authorization header wherever the service route
takes a token: a valid token made with the suite's key with most requests, each refused kind of
token once) and from the `[differential]` table of
exercise.toml, which says what is compared, what the README leaves free, and which task each input
belongs to: registrations and logins at every bound, products at every bound, orders that run the
stock out or name unknown products, reads of orders by id (yours and others'), tokens that are
valid, forged, expired or lacking a scope, and paths the gateway must not forward however they
are encoded. A failure shows the shortest sequence of requests found, both answers, and where
they differ.

Compared: the status, the JSON body (a problem's `detail`, generated ids and timestamps are free;
a token is compared by what it claims), `Content-Type`, `Location` (an order's own id in it is
free, as long as it is the id of the order in the body) and, on a 401, `WWW-Authenticate`; and
that every answer has an `X-Request-ID`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import itertools
import json
import os
import shutil
import tempfile
import time
import weakref
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from grader import differential
from grader.live import free_port

# The users service's signing key in this suite, the same in every run: the tokens exercise.toml
# lists (valid ones, and forged ones) were made with it (`python test_differential.py` prints them).
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"microshop differential signing key").digest())
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"an attacker's key").digest())
KEY_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
ORDERS_SECRET = "orders-client-secret-0123456789abcdef"
ADMIN = {"username": "admin", "password": "admin-password-1"}
ISSUER, API_AUDIENCE, INTERNAL_AUDIENCE = "microshop-users", "microshop-api", "microshop-internal"
# Argon2 at a cost that keeps hundreds of registrations and logins within a second or two.
FAST_HASH = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
SERVICES = ("users", "catalog", "orders", "gateway")  # the order their lifespans start in

# The gateway's public routes, each with the route of the service it forwards to (README, step 6).
PUBLIC = {
    "/api/users": ("users", "/users"),
    "/api/token": ("users", "/token"),
    "/api/users/me": ("users", "/users/me"),
    "/api/products": ("catalog", "/products"),
    "/api/products/{sku}": ("catalog", "/products/{sku}"),
    "/api/orders": ("orders", "/orders"),
    "/api/orders/{order_id}": ("orders", "/orders/{order_id}"),
}
# The internal routes, called directly on their service (as orders or an operator calls them).
DIRECT = {"/service-token": "users", "/.well-known/jwks.json": "users", "/reservations": "catalog",
          "/reservations/{order_id}": "catalog", "/outbox/dispatch": "orders"}
# The Authorization header of the routes that take a token (a user's on the public routes, a
# service's on the internal ones): exercise.toml sends a valid token with most requests, and each
# refused kind of token (forged, expired, without the route's scope, a service's for a user's) once.
AUTHORIZATION = {"name": "authorization", "in": "header", "required": False, "schema": {"type": "string"}}
# The catalog every shop starts with, created through POST /products with an admin's token, so
# that orders find stock from the first request: a little of it (it runs out), none, and plenty.
PRODUCTS = [{"sku": "PEN-1", "name": "Pen", "price_cents": 250, "stock": 3},
            {"sku": "INK-2", "name": "Ink", "price_cents": 1200, "stock": 1},
            {"sku": "CUP-3", "name": "Cup", "price_cents": 100000000, "stock": 1000000},
            {"sku": "NIL-0", "name": "Nothing", "price_cents": 1, "stock": 0}]
# Paths the gateway must answer 404 or 405 for, whatever follows /api/ (exercise.toml sends them).
PROBE = "/api/{path}"


def owner(path: str) -> str:
    """The service a request of the shop goes to, by its (decoded) path."""
    if path.startswith(("/service-token", "/.well-known/")):
        return "users"
    if path == "/reservations" or path.startswith("/reservations/"):
        return "catalog"
    if path.startswith("/outbox/"):
        return "orders"
    return "gateway"


class Databases:
    """A folder of SQLite files, one per service and copy of the shop, in memory where the
    system offers it (Linux's /dev/shm: a commit's fsync costs more than a request). Made when
    the first shop is built, not at import: a graded run may get a /tmp and a /dev/shm of its own
    after the suite was imported."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self.numbers = itertools.count(1)

    @property
    def folder(self) -> Path:
        if self._folder is None or not self._folder.is_dir():
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._folder = Path(tempfile.mkdtemp(prefix="graded-15-diff-", dir=base))
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def url(self, service: str) -> str:
        return f"sqlite+aiosqlite:///{self.folder / f'{service}-{next(self.numbers)}.db'}"


DATABASES = Databases()


class Shop:
    """The four services of one copy (yours or the reference's) as one ASGI app.

    Its lifespan runs the four lifespans (users' first: the others call it); a request goes to the
    service that owns its path, in the running app its lifespan made. What a client observes of
    an answer is passed on, with two things the README leaves free made plain (see `observed`).
    """

    def __init__(self, modules: dict[str, Any]) -> None:
        users, catalog, orders, gateway = (modules[name] for name in SERVICES)
        self.running: dict[str, Any] = {}
        broker = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: the broker is down

        def wire(name: str) -> httpx.ASGITransport:
            return httpx.ASGITransport(app=differential.Later(self, name))

        self.apps = {
            "users": users.create_app(
                users.Settings(database_url=DATABASES.url("users"), signing_key=KEY_PEM,
                               service_clients={"orders": ORDERS_SECRET}, admin_username=ADMIN["username"],
                               admin_password=ADMIN["password"], nats_url=broker),
                password_hash=FAST_HASH),
            "catalog": catalog.create_app(
                catalog.Settings(database_url=DATABASES.url("catalog"), users_url="http://users"),
                users_transport=wire("users")),
            "orders": orders.create_app(
                orders.Settings(database_url=DATABASES.url("orders"), client_id="orders", client_secret=ORDERS_SECRET,
                                catalog_url="http://catalog", users_url="http://users", nats_url=broker,
                                catalog_timeout=2.0, events_timeout=1.0, outbox_interval=0),
                catalog_transport=wire("catalog"), users_transport=wire("users")),
            "gateway": gateway.create_app(
                gateway.Settings(users_url="http://users", catalog_url="http://catalog", orders_url="http://orders",
                                 timeout=5.0),
                transports={name: wire(name) for name in ("users", "catalog", "orders")}),
        }

    def openapi(self) -> dict:
        """The shop's contract as one document: the gateway's own routes, each public route with
        the parameters, body and security of the service route it forwards to, the internal
        routes as their services declare them, and the probe of paths that are not routes."""
        documents = {name: self.apps[name].openapi() for name in SERVICES}
        merged: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": "microshop", "version": "1"}, "paths": {},
                                  "components": {"schemas": {}, "securitySchemes": {}}}
        for document in documents.values():
            for kind in ("schemas", "securitySchemes"):
                for name, body in document.get("components", {}).get(kind, {}).items():
                    merged["components"][kind].setdefault(name, body)
        merged["paths"]["/health"] = documents["gateway"]["paths"]["/health"]
        merged["paths"]["/ready"] = documents["gateway"]["paths"]["/ready"]
        for public, (service, path) in PUBLIC.items():
            merged["paths"][public] = documents[service]["paths"][path]
        for path, service in DIRECT.items():
            merged["paths"][path] = documents[service]["paths"][path]
        # A route that takes a token has an Authorization header of its own in this document, an input
        # like any other: exercise.toml says which tokens each route is sent (valid ones usually).
        for item in merged["paths"].values():
            for operation in item.values():
                if operation.pop("security", None):
                    operation["parameters"] = [*operation.get("parameters", []), AUTHORIZATION]
        anything = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
        merged["paths"][PROBE] = {method: {"parameters": [anything], "responses": {}} for method in ("get", "post", "delete")}
        return merged

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await observed(self.running[owner(scope["path"])], scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                for name in SERVICES:
                    manager = await stack.enter_async_context(LifespanManager(self.apps[name], startup_timeout=10))
                    self.running[name] = manager.app
            except Exception as exc:  # noqa: BLE001 - a startup that fails is reported, like the app's own
                await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            await self.stock_the_catalog()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


    async def stock_the_catalog(self) -> None:
        """PRODUCTS, through the catalog's POST /products (what it answers shows in later reads)."""
        now = int(time.time())
        admin = {"sub": ADMIN["username"], "scope": "catalog:write orders:read orders:write", "iss": ISSUER,
                 "aud": API_AUDIENCE, "iat": now, "exp": now + 300}
        token = jwt.encode(admin, KEY, algorithm="EdDSA", headers={"kid": public_kid()})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.running["catalog"]),
                                     base_url="http://catalog") as catalog:
            for product in PRODUCTS:
                await catalog.post("/products", json=product, headers={"Authorization": f"Bearer {token}"})


async def observed(app: Any, scope: Any, receive: Any, send: Any) -> None:
    """Call `app`; pass its answer on with what the README leaves free made plain.

    - An order's id is free (each shop makes its own), and it shows in more than the body: an
      order's `Location` that is the path of the order in the body (`.../orders/<its id>`) becomes
      `.../orders/{id}`, and a problem's `instance` that is the path requested (which may hold your
      order's id) becomes "(the path requested)". Any other Location or instance is passed on as it
      is, and compared.
    - `WWW-Authenticate` is promised on a 401 (`Bearer`); on other answers it is not compared.
    """
    start: dict | None = None
    chunks: list[bytes] = []

    async def keep(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False) and start is not None:
                head, body = plain(scope, start, b"".join(chunks))
                await send(head)
                await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await send(message)

    await app(scope, receive, keep)


REQUESTED = "(the path requested)"


def plain(scope: Any, start: dict, body: bytes) -> tuple[dict, bytes]:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("instance") in (scope["path"], scope.get("raw_path", b"").decode("latin-1")):
        body = json.dumps({**answer, "instance": REQUESTED}).encode()
    headers = []
    for name, value in start.get("headers", []):
        lower = name.decode("latin-1").lower()
        if lower == "www-authenticate" and start["status"] != 401:
            continue
        if lower == "content-length":
            value = str(len(body)).encode()
        if lower == "location":
            own = answer.get("id") if isinstance(answer, dict) else None
            text = value.decode("latin-1")
            if isinstance(own, str) and own and text.endswith(f"/orders/{own}"):
                value = (text[: -len(own)] + "{id}").encode("latin-1")
        headers.append((name, value))
    return {**start, "headers": headers}, body


def build(module: Any) -> Shop:
    """The shop of the copy `module` belongs to: its sibling modules, from its own package."""
    package = module.__name__.rpartition(".")[0]
    modules = {name: module if module.__name__.endswith(f".{name}") else importlib.import_module(f"{package}.{name}")
               for name in SERVICES}
    return Shop(modules)


def claims(token: Any) -> Any:
    """What README.md promises of a token (its bytes are free: iat, exp and the signature vary):
    signed with EdDSA by the signing key and naming its kid, its subject, scopes in any order,
    issuer, audience and lifetime, and an iat within a minute of now."""
    if not isinstance(token, str):
        return f"(not a token: {token!r})"
    try:
        header = jwt.get_unverified_header(token)
        body = jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"], options={"verify_aud": False, "verify_exp": False})
    except jwt.InvalidTokenError as exc:
        return f"(not a JWT that the signing key verifies: {exc})"
    kid = public_kid()
    issued, expires = body.get("iat"), body.get("exp")
    lifetime = expires - issued if isinstance(issued, int) and isinstance(expires, int) else None
    return {
        "header": {"alg": header.get("alg"), "kid names the signing key": header.get("kid") == kid},
        "sub": body.get("sub"),
        "scope": sorted(str(body.get("scope", "")).split()),
        "iss": body.get("iss"),
        "aud": body.get("aud"),
        "exp - iat (seconds)": lifetime,
        "iat within a minute of now": isinstance(issued, int) and abs(issued - time.time()) < 60,
        "claims": sorted(body),
    }


def public_kid(key: Ed25519PrivateKey = KEY) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    members = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode()


# How a differential run builds 15's shops (tests/test_differential.py uses it too). `$.scopes`
# is compared as a set: the README lists a user's scopes, not their order.
SESSION_OPTIONS = {"app": build, "views": {"$.access_token": claims, "$.scopes": lambda value: sorted(value)
                                           if isinstance(value, list) and all(isinstance(v, str) for v in value) else value}}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, module="microshop/users", **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)


# --------------------------------------------------------------------------- the tokens of exercise.toml


def minted() -> dict[str, str]:
    """The Authorization values exercise.toml sends, made with KEY (valid until 2100, or refused)."""
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def token(claims: dict, key: Ed25519PrivateKey = KEY, kid: str | None = None) -> str:
        return "Bearer " + jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid or public_kid(key)})

    admin = {"sub": "admin", "scope": "catalog:write orders:read orders:write", "iss": ISSUER, "aud": API_AUDIENCE,
             "iat": 1764000000, "exp": 4102444800}  # lives until 2100
    service = {"sub": "orders", "scope": "", "iss": ISSUER, "aud": INTERNAL_AUDIENCE, "iat": 1764000000, "exp": 4102444800}
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": public_kid()}).encode())
    payload = b64(json.dumps(admin).encode())
    confused = f"{header}.{payload}"
    confused += "." + b64(hmac.new(pem, confused.encode(), hashlib.sha256).digest())
    none = b64(json.dumps({"alg": "none", "kid": public_kid()}).encode()) + "." + payload + "."
    internal = {
        "orders' service token, expired in 2025": token(service | {"exp": 1764000300}),
        "orders' service token, signed by a key users never published": token(service, OTHER_KEY),
        "orders' service token, another issuer": token(service | {"iss": "someone-else"}),
        "orders' service token, no audience": token({k: v for k, v in service.items() if k != "aud"}),
        "orders' service token, alg none": "Bearer " + b64(json.dumps({"alg": "none", "kid": public_kid()}).encode()) + "."
                                           + b64(json.dumps(service).encode()) + ".",
    }
    return {
        "admin, valid until 2100": token(admin),
        "ada, valid until 2100": token(admin | {"sub": "ada", "scope": "orders:read orders:write"}),
        "bob, valid until 2100": token(admin | {"sub": "bob", "scope": "orders:read orders:write"}),
        "admin, orders:read only": token(admin | {"scope": "orders:read"}),
        "admin, no scope": token(admin | {"scope": ""}),
        "orders' service token, valid until 2100": token(service),
        "admin, expired in 2025": token(admin | {"exp": 1764000300}),
        "admin, signed by a key users never published": token(admin, OTHER_KEY),
        "admin, signed by another key under the published kid": token(admin, OTHER_KEY, public_kid()),
        "admin, another issuer": token(admin | {"iss": "someone-else"}),
        "admin, another audience": token(admin | {"aud": "someone-else"}),
        "admin, no audience": token({k: v for k, v in admin.items() if k != "aud"}),
        "admin, no exp": token({k: v for k, v in admin.items() if k != "exp"}),
        "admin, no sub": token({k: v for k, v in admin.items() if k != "sub"}),
        "admin, HS256 with the public key as its secret": f"Bearer {confused}",
        "admin, alg none": f"Bearer {none}",
    } | internal


if __name__ == "__main__":
    for what, value in minted().items():
        print(f'  "{value}",  # {what}')
