"""Attacks on the reference solution of exercise 15 (the capstone): the defences hold.

The four services run as real uvicorn processes on 127.0.0.1, as deployed, and are attacked as
a stranger would: paths that decode or resolve to internal routes (percent-encoded and literal
"../", sent as written over a raw socket), internal routes called without the gateway, one
order reserved and released at the same moment many times over, logins at production-like
Argon2 cost while /health is timed, numbers past 64 bits, passwords that a 422 could echo. The
poison events go through a real nats-server to users in process: messages that are not events,
numbers past 64 bits, one event published many times at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
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
import nats
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from grader.broker import NatsServer
from grader.live import free_port, http_only, serve_in_process, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "15_capstone"
KEY = Ed25519PrivateKey.generate()  # the users service's signing key in this suite
KEY_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
ORDERS_SECRET = "attack-suite-orders-secret-0123456789abcdef"
SERVICES = ("users", "catalog", "orders", "gateway")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kid_of(key: Ed25519PrivateKey) -> str:
    x = b64url(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    members = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url(hashlib.sha256(members.encode()).digest())


def claims(subject: str, scopes: str, audience: str) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {"sub": subject, "scope": scopes, "iss": "microshop-users", "aud": audience, "iat": now,
            "exp": now + timedelta(minutes=5)}


def bearer(token_claims: dict[str, Any], key: Ed25519PrivateKey = KEY, kid: str | None = None) -> dict[str, str]:
    token = jwt.encode(token_claims, key, algorithm="EdDSA", headers={"kid": kid_of(key) if kid is None else kid})
    return {"Authorization": f"Bearer {token}"}


def mint(username: str, scopes: str) -> dict[str, str]:
    return bearer(claims(username, scopes, "microshop-api"))


def service() -> dict[str, str]:
    """A service token, as users issues one to orders."""
    return bearer(claims("orders", "", "microshop-internal"))


def admin() -> dict[str, str]:
    """An admin's headers, minted when sent: the course suite may reach a test long after this
    module was imported, and a token minted at import would have expired by then."""
    return mint("admin", "catalog:write orders:read orders:write")


def customer() -> dict[str, str]:
    return mint("eve", "orders:read orders:write")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("attack-shop")
    broker = NatsServer().start()
    ports = {name: free_port() for name in SERVICES}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = {
        "USERS_DATABASE_URL": f"sqlite+aiosqlite:///{data}/users.db", "USERS_SIGNING_KEY": KEY_PEM,
        "USERS_SERVICE_CLIENTS": json.dumps({"orders": ORDERS_SECRET}),
        # Production's shape at a third of its memory: slow enough that a blocked loop shows.
        "USERS_ARGON2_TIME_COST": "3", "USERS_ARGON2_MEMORY_KIB": "16384", "USERS_MAX_CONCURRENT_HASHES": "2",
        "CATALOG_DATABASE_URL": f"sqlite+aiosqlite:///{data}/catalog.db", "CATALOG_USERS_URL": url["users"],
        "ORDERS_DATABASE_URL": f"sqlite+aiosqlite:///{data}/orders.db", "ORDERS_CLIENT_SECRET": ORDERS_SECRET,
        "ORDERS_CATALOG_URL": url["catalog"], "ORDERS_USERS_URL": url["users"],
        "ORDERS_OUTBOX_INTERVAL": "0", "ORDERS_NATS_URL": broker.url, "USERS_NATS_URL": broker.url,
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
        stack.callback(broker.stop)  # after the services (the stack unwinds in reverse)
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


def forged_service_tokens() -> list[dict[str, str]]:
    """Service tokens nobody but an attacker made: another key, another key under the real kid,
    alg none, HS256 keyed with the public key, a kid that is a path, a huge kid."""
    good = claims("orders", "", "microshop-internal")
    stranger = Ed25519PrivateKey.generate()
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = b64url(json.dumps({k: int(v.timestamp()) if isinstance(v, datetime) else v for k, v in good.items()}).encode())
    hs_header = b64url(json.dumps({"alg": "HS256", "kid": kid_of(KEY)}).encode())
    hs_signature = b64url(hmac.new(pem, f"{hs_header}.{body}".encode(), hashlib.sha256).digest())
    none_header = b64url(json.dumps({"alg": "none", "kid": kid_of(KEY)}).encode())
    return [bearer(good, stranger), bearer(good, stranger, kid=kid_of(KEY)),
            {"Authorization": f"Bearer {none_header}.{body}."},
            {"Authorization": f"Bearer {hs_header}.{body}.{hs_signature}"},
            bearer(good, stranger, kid="../../.well-known/jwks.json"), bearer(good, stranger, kid="k" * 5000),
            bearer(good | {"aud": "microshop-api"}), bearer(good | {"iss": "microshop-orders"})]


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
        targets = (("POST", "reservations", {"order_id": "attack", "items": [{"sku": "GADGET", "quantity": 5}]}),
                   ("DELETE", f"reservations/{order_id}", None), ("POST", "service-token", None),
                   ("POST", "outbox/dispatch", None), ("GET", "health", None))
        attempts = []
        for prefix in PREFIXES:
            for dots in DOT_DOT:
                for method, route, body in targets:
                    up = dots * (1 + prefix.count("/"))  # out of every segment of the prefix
                    attempts.append((method, f"/api/{prefix}/{up}{route}", body))
        attempts += [(method, f"/api/{route}", body) for method, route, body in targets]

        def send_all() -> list[tuple[str, str, int]]:
            headers = service()
            return [(method, path, raw(shop["gateway"], method, path, body, headers)) for method, path, body in attempts]

        results = await asyncio.to_thread(send_all)
        through = [f"{method} {path}: {status}" for method, path, status in results if status not in (400, 404, 405)]
        assert not through, f"{len(through)} of {len(results)} traversal attempts got past the gateway:\n" + "\n".join(through[:10])
        assert await stock(catalog, "GADGET") == 5, "nothing reserved or released through the gateway"


@pytest.mark.servers
def test_15_capstone_header_bytes_above_127_are_forwarded_not_a_500(shop):
    # A header is bytes: a client may send any byte above 127 (http.client sends Latin-1). The
    # gateway forwards Authorization, Content-Type and Accept; forwarded as text, httpx encodes
    # them as ASCII and raises, a 500 for a malformed token that every service answers with 401.
    assert raw(shop["gateway"], "GET", "/api/orders", headers={"Authorization": "Bearer jéton"}) == 401
    assert raw(shop["gateway"], "GET", "/api/users/me", headers={"Authorization": "Bearer \xff\xfe"}) == 401
    assert raw(shop["gateway"], "GET", "/api/products", headers={"Accept": "application/json; q=é"}) == 200


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.asyncio
async def test_15_capstone_internal_routes_stay_closed_without_the_gateway(shop):
    token = service()["Authorization"].split()[1]
    signed_part, signature = token.rsplit(".", 1)
    flipped = signature[:10] + ("B" if signature[10] != "B" else "C") + signature[11:]  # a signature off by a few bits
    near_miss = {"Authorization": f"Bearer {signed_part}.{flipped}"}
    attempts = [
        ("catalog", "POST", "/reservations", {"order_id": "direct", "items": [{"sku": "GADGET", "quantity": 1}]}),
        ("catalog", "DELETE", "/reservations/direct", None),
        ("orders", "POST", "/outbox/dispatch", None),
    ]
    for name, method, path, body in attempts:
        for headers in ({}, near_miss, admin(), {"Authorization": token}, {"X-Internal-Token": token}, *forged_service_tokens()):
            status = await asyncio.to_thread(raw, shop[name], method, path, body, headers)
            assert status == 401, f"{method} {name}{path} with {list(headers.values())[:1]}: {status}, expected 401"


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
                                headers=service())

        # The audit's race: each order reserved and released at the same moment, 20 times.
        replies = await asyncio.gather(*(
            call for i in range(20) for call in (reserve(f"pair-{i}"), catalog.delete(f"/reservations/pair-{i}", headers=service()))
        ))
        # Then each order sent three times at once, and released twice at once.
        replies += await asyncio.gather(*(reserve(f"dup-{i // 3}") for i in range(30)))
        held = await stock(catalog, "RACE-1")
        replies += await asyncio.gather(*(catalog.delete(f"/reservations/dup-{i // 2}", headers=service()) for i in range(20)))
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


@pytest.mark.servers
def test_15_capstone_hostile_trace_headers_are_answered_and_stay_out_of_the_log(caplog):
    """traceparent and tracestate as a stranger writes them, sent as raw bytes to a real uvicorn:
    each request is answered; a malformed traceparent starts a trace of its own (the request ID a
    fresh trace ID), a valid one is continued whatever tracestate comes with it; and nothing the
    stranger sent reaches a log line (OpenTelemetry logs a malformed tracestate member whole)."""
    gateway = load_module(SOLUTION, "microshop/gateway")
    closed = f"http://127.0.0.1:{free_port()}"  # /health needs no service behind the gateway
    app = gateway.create_app(gateway.Settings(users_url=closed, catalog_url=closed, orders_url=closed, timeout=1))
    marker = "mallory-was-here"
    valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace_id = valid[3:35]
    hostile: list[tuple[dict[str, bytes], str | None]] = [  # the headers, and the trace they continue (None: a new one)
        ({"traceparent": marker.encode() * 600}, None),  # past the 512 characters the standard allows
        ({"traceparent": f"00-{marker}-00f067aa0ba902b7-01".encode()}, None),
        ({"traceparent": valid.upper().encode()}, None),
        ({"traceparent": valid.encode()[:-1] + b"\xff"}, None),  # a byte that is not ASCII
        ({"traceparent": valid.encode(), "tracestate": f"{marker}=".encode() + b"v" * 6000}, trace_id),
        ({"traceparent": valid.encode(), "tracestate": ",".join(f"{marker}{i}=x y" for i in range(300)).encode()}, trace_id),
        ({"traceparent": valid.encode(), "tracestate": f"{marker}=".encode() + b"\xff\xfe"}, trace_id),  # obs-text
    ]
    with caplog.at_level(logging.DEBUG), serve_in_thread(app) as url:
        parsed = urllib.parse.urlsplit(url)
        for headers, continued in hostile:
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
            try:
                connection.putrequest("GET", "/health", skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.endheaders()
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            request_id = response.getheader("x-request-id") or ""
            sent = {name: value[:60] for name, value in headers.items()}
            assert response.status == 200, f"{sent}: {response.status}"
            if continued is None:
                assert len(request_id) == 32 and request_id != trace_id, f"{sent}: a new trace; X-Request-ID {request_id!r}"
            else:
                assert request_id == continued, f"{sent}: the caller's trace {continued}; X-Request-ID {request_id!r}"
    echoed = [record.getMessage()[:120] for record in caplog.records if marker in record.getMessage()]
    assert not echoed, f"log lines that repeat what a stranger sent: {echoed}"


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
            order = f'{{"items": [{{"sku": "GADGET", "quantity": {number}}}]}}'
            response = await orders.post("/orders", content=order, headers=customer() | {"Content-Type": "application/json"})
            assert response.status_code == 422, (number, response.status_code, response.text[:200])


# ---------------------------------------------------------------------------------------
# The events: poison messages and copies, through a real broker to users in process
# ---------------------------------------------------------------------------------------


def event(event_id: str, total_cents: int | str = 100, username: str = "ada") -> bytes:
    return (f'{{"event_id": "{event_id}", "type": "OrderPlaced", "order_id": "o-{event_id}", "username": "{username}", '
            f'"total_cents": {total_cents}, "occurred_at": "2026-01-01T00:00:00Z"}}').encode()


@pytest.mark.asyncio
async def test_15_capstone_poison_and_copies_of_events_change_the_read_model_once(tmp_path):
    users_module = load_module(SOLUTION, "microshop/users")
    cheap = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
    async with NatsServer() as broker:
        users_app = users_module.create_app(users_module.Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/u.db", signing_key=KEY_PEM, nats_url=broker.url,
            ack_wait=1.0, max_deliver=3, backoff=0.05), password_hash=cheap)
        nc = await nats.connect(broker.url, allow_reconnect=False)
        try:
            async with LifespanManager(users_app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=users_app), base_url="http://users") as users:
                assert (await users.post("/users", json={"username": "ada", "password": "ada-password"})).status_code == 201
                js = nc.jetstream()
                poison = [b"", b"\xff\xfe", b"[]", b"null", b'{"type": "OrderPlaced"}', b"{" * 10_000,
                          *(event(f"n{i}", number) for i, number in enumerate(NUMBERS)),
                          event("long-name", username="x" * 10_000), event("x" * 100_000)]
                for i, body in enumerate(poison):
                    await js.publish("orders.placed", body, headers={"Nats-Msg-Id": f"poison-{i}"})
                # One event, 20 copies at once, each with its own Nats-Msg-Id (the duplicate window
                # cannot catch them): users must count it once. And ten good events among them.
                await asyncio.gather(*(js.publish("orders.placed", event("same", 7), headers={"Nats-Msg-Id": f"copy-{i}"})
                                       for i in range(20)))
                for i in range(10):
                    await js.publish("orders.placed", event(f"good-{i}", 1), headers={"Nats-Msg-Id": f"good-{i}"})
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    info = await js.consumer_info("ORDERS", "users")
                    dead = (await js.stream_info("DEADLETTER")).state.messages
                    if info.num_pending == 0 and info.num_ack_pending == 0 and dead >= len(poison):
                        break
                    await asyncio.sleep(0.05)
                me = (await users.get("/users/me", headers=mint("ada", "orders:read"))).json()
                assert (me["orders_placed"], me["total_spent_cents"]) == (11, 17), me
                assert dead == len(poison), f"{dead} dead letters for {len(poison)} poison messages"
                assert (await users.get("/health")).status_code == 200
        finally:
            await nc.close()
