"""Attacks on the reference solution of exercise 15 (the capstone): the defences hold.

The four services run as real uvicorn processes on 127.0.0.1, as deployed, and are attacked as
a stranger would: paths that decode or resolve to internal routes (percent-encoded and literal
"../", sent as written over a raw socket), internal routes called without the gateway, one
order reserved and released at the same moment many times over, logins at production-like
Argon2 cost while /health is timed, numbers past 64 bits, passwords that a 422 could echo. The
poison event is sent in process, through a wire that refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import statistics
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from grader.live import free_port, http_only, serve_in_process
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "15_capstone"
SECRET = "attack-suite-secret-0123456789abcdef-0123456789"
INTERNAL = "attack-suite-internal-token-0123456789abcdef"
SERVICE = {"Authorization": f"Bearer {INTERNAL}"}
SERVICES = ("users", "catalog", "orders", "gateway")


def mint(username: str, scopes: str) -> dict[str, str]:
    now = datetime.now(timezone.utc)
    claims = {"sub": username, "scope": scopes, "iss": "microshop-users", "iat": now, "exp": now + timedelta(minutes=5)}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def admin() -> dict[str, str]:
    """An admin's headers, minted when sent: the course suite may reach a test long after this
    module was imported, and a token minted at import would have expired by then."""
    return mint("admin", "catalog:write orders:read orders:write")


def customer() -> dict[str, str]:
    return mint("eve", "orders:read orders:write")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("attack-shop")
    ports = {name: free_port() for name in SERVICES}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = {
        "USERS_DATABASE_URL": f"sqlite+aiosqlite:///{data}/users.db", "USERS_JWT_SECRET": SECRET,
        "USERS_INTERNAL_TOKEN": INTERNAL,
        # Production's shape at a third of its memory: slow enough that a blocked loop shows.
        "USERS_ARGON2_TIME_COST": "3", "USERS_ARGON2_MEMORY_KIB": "16384", "USERS_MAX_CONCURRENT_HASHES": "2",
        "CATALOG_DATABASE_URL": f"sqlite+aiosqlite:///{data}/catalog.db", "CATALOG_JWT_SECRET": SECRET,
        "CATALOG_INTERNAL_TOKEN": INTERNAL,
        "ORDERS_DATABASE_URL": f"sqlite+aiosqlite:///{data}/orders.db", "ORDERS_JWT_SECRET": SECRET,
        "ORDERS_INTERNAL_TOKEN": INTERNAL, "ORDERS_CATALOG_URL": url["catalog"], "ORDERS_USERS_URL": url["users"],
        "ORDERS_OUTBOX_INTERVAL": "0",
        "GATEWAY_USERS_URL": url["users"], "GATEWAY_CATALOG_URL": url["catalog"], "GATEWAY_ORDERS_URL": url["orders"],
    }
    managers = {
        name: serve_in_process(
            [sys.executable, "-m", "uvicorn", f"microshop.{name}:create_app", "--factory", "--app-dir", str(SOLUTION),
             "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
            cwd=data, env=env, port=ports[name], ready_path="/health", timeout=30,
        )
        for name in SERVICES
    }
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(managers)) as pool:
        for future in [pool.submit(stack.enter_context, manager) for manager in managers.values()]:
            future.result()
        yield url


def raw(base_url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> int:
    """One request with the path exactly as written: no client library resolves its "..".."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        content = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=content, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=20, verify=http_only(),
                             limits=httpx.Limits(max_connections=50))


async def stock(catalog: httpx.AsyncClient, sku: str) -> int:
    response = await catalog.get(f"/products/{sku}")
    assert response.status_code == 200, response.text
    return response.json()["stock"]


# ---------------------------------------------------------------------------------------
# The gateway: no spelling of "../" reaches an internal route
# ---------------------------------------------------------------------------------------

DOT_DOT = ("../", "..%2F", "..%2f", "%2E%2E/", "%2e%2e%2f", ".%2E/", "%2E./", "..%5C", "..\\", "..%252F", ".%2e%2f")
PREFIXES = ("products", "users", "orders", "token", "products/PEN-1", "users/me", "orders/x")


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_no_spelling_of_dot_dot_gets_through_the_real_gateway(shop):
    async with client(shop["gateway"]) as gateway, client(shop["users"]) as users, client(shop["catalog"]) as catalog:
        created = await gateway.post("/api/products", json={"sku": "GADGET", "name": "Gadget", "price_cents": 999, "stock": 7},
                                     headers=admin())
        assert created.status_code == 201, created.text
        placed = await gateway.post("/api/orders", json={"items": [{"sku": "GADGET", "quantity": 2}]}, headers=customer())
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["id"]
        registered = await gateway.post("/api/users", json={"username": "victim", "password": "victim-password"})
        assert registered.status_code == 201, registered.text
        victim = mint("victim", "orders:read orders:write")
        totals = (await users.get("/users/me", headers=victim)).json()["total_spent_cents"]

        forged = {"event_id": "forged-1", "type": "OrderPlaced", "order_id": "x", "username": "victim",
                  "total_cents": 10**12, "occurred_at": datetime.now(timezone.utc).isoformat()}
        targets = (("POST", "reservations", {"order_id": "attack", "items": [{"sku": "GADGET", "quantity": 5}]}),
                   ("DELETE", f"reservations/{order_id}", None), ("POST", "events", forged),
                   ("POST", "outbox/dispatch", None), ("GET", "health", None))
        attempts = []
        for prefix in PREFIXES:
            for dots in DOT_DOT:
                for method, route, body in targets:
                    up = dots * (1 + prefix.count("/"))  # out of every segment of the prefix
                    attempts.append((method, f"/api/{prefix}/{up}{route}", body))
        attempts += [(method, f"/api/{route}", body) for method, route, body in targets]

        def send_all() -> list[tuple[str, str, int]]:
            return [(method, path, raw(shop["gateway"], method, path, body, SERVICE)) for method, path, body in attempts]

        results = await asyncio.to_thread(send_all)
        through = [f"{method} {path}: {status}" for method, path, status in results if status not in (400, 404, 405)]
        assert not through, f"{len(through)} of {len(results)} traversal attempts got past the gateway:\n" + "\n".join(through[:10])
        assert await stock(catalog, "GADGET") == 5, "nothing reserved or released through the gateway"
        assert (await users.get("/users/me", headers=victim)).json()["total_spent_cents"] == totals, "no forged event applied"


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_internal_routes_stay_closed_without_the_gateway(shop):
    near_miss = {"Authorization": f"Bearer {INTERNAL[:-1]}?"}
    attempts = [
        ("catalog", "POST", "/reservations", {"order_id": "direct", "items": [{"sku": "GADGET", "quantity": 1}]}),
        ("catalog", "DELETE", "/reservations/direct", None),
        ("users", "POST", "/events", {"event_id": "direct", "type": "OrderPlaced", "order_id": "x", "username": "victim",
                                      "total_cents": 1, "occurred_at": datetime.now(timezone.utc).isoformat()}),
        ("orders", "POST", "/outbox/dispatch", None),
        ("orders", "GET", "/outbox/dead", None),
    ]
    for service, method, path, body in attempts:
        for headers in ({}, near_miss, admin(), {"Authorization": INTERNAL}, {"X-Internal-Token": INTERNAL}):
            status = await asyncio.to_thread(raw, shop[service], method, path, body, headers)
            assert status == 401, f"{method} {service}{path} with {list(headers.values())[:1]}: {status}, expected 401"


# ---------------------------------------------------------------------------------------
# The catalog: one order reserved and released at once, over and over
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_racing_reserve_and_release_lose_no_stock(shop):
    async with client(shop["catalog"]) as catalog:
        created = await catalog.post("/products", json={"sku": "RACE-1", "name": "Race", "price_cents": 100, "stock": 500},
                                     headers=admin())
        assert created.status_code == 201, created.text

        def reserve(order_id: str) -> Any:
            return catalog.post("/reservations", json={"order_id": order_id, "items": [{"sku": "RACE-1", "quantity": 3}]},
                                headers=SERVICE)

        # The audit's race: each order reserved and released at the same moment, 20 times.
        replies = await asyncio.gather(*(
            call for i in range(20) for call in (reserve(f"pair-{i}"), catalog.delete(f"/reservations/pair-{i}", headers=SERVICE))
        ))
        # Then each order sent three times at once, and released twice at once.
        replies += await asyncio.gather(*(reserve(f"dup-{i // 3}") for i in range(30)))
        held = await stock(catalog, "RACE-1")
        replies += await asyncio.gather(*(catalog.delete(f"/reservations/dup-{i // 2}", headers=SERVICE) for i in range(20)))
        errors = [f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:80]}" for r in replies
                  if r.status_code >= 500]
        assert not errors, "\n".join(errors[:10])
        assert held == 500 - 10 * 3, f"10 orders of 3 held once each: stock {held}, expected 470"
        assert await stock(catalog, "RACE-1") == 500, "every reservation released: stock back to 500"


# ---------------------------------------------------------------------------------------
# Users: Argon2 at real cost never stops the service; no secret in a 422; 64-bit numbers
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_logins_do_not_stop_health(shop):
    async with client(shop["users"]) as users, client(shop["users"]) as prober:
        registered = await users.post("/users", json={"username": "timer", "password": "timer-password"})
        assert registered.status_code == 201, registered.text

        async def health() -> float:
            started = time.perf_counter()
            assert (await prober.get("/health")).status_code == 200
            return time.perf_counter() - started

        idle = [await health() for _ in range(5)]
        started = time.perf_counter()
        assert (await users.post("/token", data={"username": "timer", "password": "timer-password"})).status_code == 200
        one_login = time.perf_counter() - started
        logins = asyncio.gather(*(users.post("/token", data={"username": "timer", "password": "wrong-password"})
                                  for _ in range(4)))
        busy = []
        while not logins.done():
            busy.append(await health())
        assert all(r.status_code == 401 for r in await logins)
        # Blocked, every probe waits for a whole hash (about one login), so the typical probe
        # takes about a login; free, the typical probe answers about as fast as when idle. The
        # median, not the worst: on a busy machine one probe may wait for the CPU now and then.
        limit = max(one_login / 2, 10 * max(idle))
        assert statistics.median(busy) < limit, (
            f"/health took {statistics.median(busy) * 1000:.0f} ms (median of {len(busy)} probes) during logins "
            f"(one login: {one_login * 1000:.0f} ms, idle median {statistics.median(idle) * 1000:.1f} ms)")


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_a_422_never_echoes_a_password(shop):
    async with client(shop["gateway"]) as gateway:
        for password in ("hunter2", "hunter2" * 150_000, "hunter2-but-valid"):
            for path, kwargs in (("/api/users", {"json": {"username": "Not Valid!", "password": password}}),
                                 ("/api/users", {"json": {"username": "echo", "password": [password]}}),
                                 ("/api/token", {"data": {"password": password}})):
                response = await gateway.post(path, **kwargs)
                assert response.status_code in (413, 422), (path, response.status_code)
                assert "hunter2" not in response.text and len(response.content) < 4096, (path, response.text[:200])


NUMBERS = ("9223372036854775808", "18446744073709551617", "-9223372036854775809", "1" + "0" * 60, "1e309", "NaN",
           "Infinity", "1.5")


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_numbers_past_64_bits_are_a_422(shop):
    async with client(shop["catalog"]) as catalog, client(shop["users"]) as users, client(shop["orders"]) as orders:
        for number in NUMBERS:
            for field in ("price_cents", "stock"):
                body = {"sku": "BIG-1", "name": "Big", "price_cents": 100, "stock": 1}
                raw_body = json.dumps(body).replace(f'"{field}": {body[field]}', f'"{field}": {number}')
                response = await catalog.post("/products", content=raw_body, headers=admin() | {"Content-Type": "application/json"})
                assert response.status_code == 422, (field, number, response.status_code, response.text[:200])
            event = ('{"event_id": "big", "type": "OrderPlaced", "order_id": "x", "username": "victim", '
                     f'"total_cents": {number}, "occurred_at": "2026-01-01T00:00:00Z"}}')
            response = await users.post("/events", content=event, headers=SERVICE | {"Content-Type": "application/json"})
            assert response.status_code == 422, (number, response.status_code, response.text[:200])
            order = f'{{"items": [{{"sku": "GADGET", "quantity": {number}}}]}}'
            response = await orders.post("/orders", content=order, headers=customer() | {"Content-Type": "application/json"})
            assert response.status_code == 422, (number, response.status_code, response.text[:200])


# ---------------------------------------------------------------------------------------
# The outbox: one event users always refuses, in process
# ---------------------------------------------------------------------------------------


class RefusesOne(httpx.AsyncBaseTransport):
    """The wire to users: answers 500 to every event about `poisoned`, passes the rest on."""

    def __init__(self, app: Any, poisoned: str) -> None:
        self.inner, self.poisoned, self.refused = httpx.ASGITransport(app=app), poisoned.encode(), 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events" and self.poisoned in request.content:
            self.refused += 1
            return httpx.Response(500, json={"detail": "cannot store this"}, request=request)
        return await self.inner.handle_async_request(request)


@pytest.mark.asyncio
async def test_15_capstone_a_poison_event_blocks_no_other(tmp_path):
    users_module = load_module(SOLUTION, "microshop/users")
    catalog_module = load_module(SOLUTION, "microshop/catalog")
    orders_module = load_module(SOLUTION, "microshop/orders")
    cheap = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
    users_app = users_module.create_app(users_module.Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/u.db", jwt_secret=SECRET, internal_token=INTERNAL), password_hash=cheap)
    catalog_app = catalog_module.create_app(catalog_module.Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/c.db", jwt_secret=SECRET, internal_token=INTERNAL))
    wire = RefusesOne(users_app, '"mallory"')
    orders_app = orders_module.create_app(
        orders_module.Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/o.db", jwt_secret=SECRET,
                               internal_token=INTERNAL, catalog_url="http://catalog", users_url="http://users",
                               outbox_interval=0, outbox_max_attempts=4),
        catalog_transport=httpx.ASGITransport(app=catalog_app), users_transport=wire,
    )
    async with (
        LifespanManager(users_app), LifespanManager(catalog_app), LifespanManager(orders_app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=catalog_app), base_url="http://catalog") as catalog,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=users_app), base_url="http://users") as users,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=orders_app), base_url="http://orders") as orders,
    ):
        await catalog.post("/products", json={"sku": "PEN-1", "name": "Pen", "price_cents": 100, "stock": 50}, headers=admin())
        await users.post("/users", json={"username": "ada", "password": "ada-password"})
        body = {"items": [{"sku": "PEN-1", "quantity": 1}]}
        assert (await orders.post("/orders", json=body, headers=mint("mallory", "orders:write"))).status_code == 201
        for placed in range(1, 6):  # each delivered at once, however often mallory's is refused meanwhile
            assert (await orders.post("/orders", json=body, headers=mint("ada", "orders:read orders:write"))).status_code == 201
            me = (await users.get("/users/me", headers=mint("ada", "orders:read"))).json()
            assert me["orders_placed"] == placed, f"ada's event waited behind mallory's: {me} after {placed} orders"
        for _ in range(6):
            result = (await orders.post("/outbox/dispatch", headers=SERVICE)).json()
        assert result == {"delivered": 0, "pending": 0, "dead": 1}, result
        assert wire.refused == 4, f"the poison event was sent {wire.refused} times; outbox_max_attempts is 4"
        dead = (await orders.get("/outbox/dead", headers=SERVICE)).json()
        assert [d["payload"]["username"] for d in dead] == ["mallory"] and dead[0]["last_error"].startswith("500"), dead
