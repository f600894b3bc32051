"""A stranger's attacks on the reference solutions of exercises 01 to 08: defences that hold.

Each test is an attack someone who never read the code tried, kept because the reference
withstands it and a later edit could break it: integers past any machine word and numbers JSON
cannot write back, lone UTF-16 surrogates (Python's `json` reads `"\\ud800"` into a `str` that
cannot be encoded again), JSON nested a hundred thousand deep, signed tokens whose claims are
infinite or of the wrong type, `Host` headers that are not host names, fifty identical writes at
once, WebSocket frames that are not text, and a storm of clients that vanish without a close.
Nothing may answer a 5xx, echo what it refused, or leave state behind.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from websockets.asyncio.client import connect

from grader.expect import describe, expect_problem, expect_status
from grader.live import serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTIONS = ROOT / "solutions"
JSON = {"content-type": "application/json"}
# 100,000 nested arrays: Python's json module gives up (RecursionError), so must the service, politely.
DEEP = "[" * 100_000 + "]" * 100_000


def solution(folder: str, module: str = "app") -> Any:
    return load_module(Path(SOLUTIONS / folder), module)


def in_process(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)


# --- 01: numbers past a machine word ------------------------------------------------------


def test_01_integers_past_a_machine_word_add_exactly_and_past_the_parse_limit_are_422():
    app = solution("01_async_routes").app
    # 4,300 digits is the most Python's int() reads from text by default (and so json.loads: a
    # client would fail to read a longer sum); the service itself reads up to that limit.
    big = "9" * 4000
    with TestClient(app) as client:
        response = client.get("/add", params={"a": big, "b": big})
        expect_status(response, 200, "two 4,000-digit integers: their sum is exact, however long")
        assert response.json() == {"result": int(big) * 2}, describe(response)
        for a in ["9" * 4301, "1e3", "true", "1.5", "nan"]:
            response = client.get("/add", params={"a": a, "b": "1"})
            expect_status(response, 422, f"a={a[:12]}... is no integer the service can read")
        for seconds in ["nan", "NaN", "inf", "-inf", "Infinity", "1e309"]:
            response = client.get("/wait", params={"seconds": seconds})
            expect_status(response, 422, f"seconds={seconds}: not between 0 and 2 (NaN compares false with both bounds)")
        response = client.get(f"/items/{2**64}")
        expect_status(response, 404, "an id past 64 bits names no item: 404, not a 500")


# --- 02: lone surrogates and deep nesting --------------------------------------------------


def test_02_lone_surrogates_and_deep_nesting_are_refused_without_echo():
    module = solution("02_validation")
    good = {"username": "ada_l", "email": "ada@example.com", "password": "abc12345", "password_confirm": "abc12345"}
    attacks = {
        "a lone surrogate in the password": {**good, "password": "abc12345\\ud800", "password_confirm": "abc12345\\ud800"},
        "a lone surrogate in the confirmation only": {**good, "password_confirm": "abc12345\\udfff"},
        "a lone surrogate in the e-mail": {**good, "email": "a\\ud800@example.com"},
        "a lone surrogate in the username": {**good, "username": "ada\\udfff"},
    }
    with TestClient(module.app) as client:
        for attack, body in attacks.items():
            # Written by hand: the escape must reach the server as the six characters \ud800.
            raw = json.dumps(body).replace("\\\\u", "\\u").encode()
            response = client.post("/users", content=raw, headers=JSON)
            expect_status(response, 422, attack)
            assert "input" not in response.text and "abc12345" not in response.text, describe(response)
        response = client.post("/users", content=DEEP.encode(), headers=JSON)
        assert 400 <= response.status_code < 500, describe(response)
        assert module.USERS == {}, "a refused registration stored a user"


# --- 03: Host headers that are not host names ---------------------------------------------


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, v in headers.items()}, body


def test_03_hostile_host_headers_and_absolute_targets_keep_the_problem_and_its_instance():
    app = solution("03_rest_resources").app
    # The request's URL is rebuilt from the Host header: none of these may turn the error
    # handler into a crash or move a query string into `instance`.
    cases = [("[", "/api/v1/items/7"), ("a/b?c=", "/api/v1/items/7"), ("a#frag", "/nope"), ("[::1", "/api/v1/items/0"),
             ("x:y:z", "/nope"), ("127.0.0.1:99999", "/api/v1/items/7")]
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        for host, path in cases:
            status, headers, body = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status in (404, 422), (host, path, status, body[:200])
            assert headers.get("content-type") == "application/problem+json", (host, path, headers, body[:200])
            assert json.loads(body)["instance"] == path, (host, path, body[:200])
        target = "http://elsewhere.example/nope?password=hunter2"
        status, headers, body = raw_request(port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status == 404 and headers.get("content-type") == "application/problem+json", (status, body[:200])
        assert json.loads(body)["instance"] == "/nope" and b"hunter2" not in body, body[:200]


# --- 04: fifty identical writes at once -----------------------------------------------------


@pytest.mark.asyncio
async def test_04_concurrent_creates_and_imports_of_one_title_store_it_once():
    module = solution("04_dependencies")
    app = module.app
    admin = {"x-api-key": "dev-key", "x-user": "ada"}
    async with in_process(app) as client:
        responses = await asyncio.gather(*(client.post("/admin/books", json={"title": "Same", "author": "x"}, headers=admin)
                                           for _ in range(50)))
        responses += await asyncio.gather(*(client.post("/admin/books/import", json=[{"title": "sAME", "author": "y"}],
                                                        headers=admin) for _ in range(10)))
    created = [response for response in responses if response.status_code == 201]
    assert len(created) == 1, [describe(response) for response in responses if response.status_code != 409][:3]
    for response in responses:
        if response.status_code != 201:
            expect_problem(response, 409, "a concurrent copy of a title that exists", type=module.DUPLICATE_TITLE)
    titles = [book.title.casefold() for book in app.state.db.books.values()]
    assert titles.count("same") == 1, titles
    assert app.state.db.open_connections == 0, app.state.db.log[-6:]


# --- 05: signed tokens with hostile claims ---------------------------------------------------

SECRET = "a-test-secret-of-more-than-32-bytes!"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: str, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    """A token signed with the service's own key, whatever its JSON says: only the claims attack."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_05_signed_tokens_with_infinite_or_mistyped_claims_are_401():
    module = solution("05_auth")
    app = module.create_app(module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    module.add_user(app, "ada", "pw12345678", scopes=["items:read"])
    now = int(time.time())

    def claims(**changes: Any) -> str:
        base = {"iss": "auth-service", "aud": "items-service", "sub": "ada", "scope": "items:read", "iat": now, "exp": now + 60}
        return json.dumps({**base, **changes})

    tokens = {
        "iat 1e400 (infinity)": claims(iat=0).replace('"iat": 0', '"iat": 1e400'),
        "iat NaN": claims(iat=0).replace('"iat": 0', '"iat": NaN'),
        "exp Infinity": claims(exp=0).replace('"exp": 0', '"exp": Infinity'),
        "exp 2**64": claims(exp=2**64),
        "iat true": claims(iat=True),
        "iat a fraction in the future": claims(iat=now + 0.5),
        "sub a number": claims(sub=1),
        "sub a list": claims(sub=["ada"]),
        "scope a list": claims(scope=["items:read"]),
        "sub repeated, the last one unknown": claims()[:-1] + ', "sub": "ghost"}',
        "a payload that is a list": "[1]",
    }
    headers = {"alg as a list": '{"alg":["HS256"]}', "an unknown critical extension": '{"alg":"HS256","crit":["x"],"x":1}'}
    with TestClient(app) as client:
        response = client.get("/items", headers={"authorization": f"Bearer {signed(claims())}"})
        expect_status(response, 200, "a well-formed token signed with the key (the attacks below change one thing)")
        attacks = [(name, signed(payload)) for name, payload in tokens.items()]
        attacks += [(name, signed(claims(), header)) for name, header in headers.items()]
        for name, token in attacks:
            response = client.get("/items", headers={"authorization": f"Bearer {token}"})
            expect_problem(response, 401, f"a token signed with the right key but with {name}")
            assert response.headers.get("www-authenticate", "").startswith("Bearer"), describe(response)


# --- 06: fifty identical signups at once ------------------------------------------------------


@pytest.mark.asyncio
async def test_06_concurrent_signups_of_one_address_register_and_welcome_once(tmp_path: Path):
    module = solution("06_background_tasks")
    app = module.create_app(tmp_path / "outbox")
    async with LifespanManager(app) as manager, in_process(manager.app) as client:
        responses = await asyncio.gather(*(client.post("/signup", json={"email": "ada@example.com", "name": "Ada"})
                                           for _ in range(50)))
        assert sorted(response.status_code for response in responses) == [201] + [409] * 49, \
            [describe(response) for response in responses if response.status_code not in (201, 409)][:3]
        events = (await client.get("/events")).json()
    assert events == ["POST /signup", "welcome sent to ada@example.com"], events
    assert [path.name for path in (tmp_path / "outbox").iterdir()] == ["1.json"]


# --- 07: frames that are not text, and clients that vanish --------------------------------------


@pytest.mark.asyncio
async def test_07_hostile_frames_get_error_frames_and_the_connection_keeps_working():
    module = solution("07_websockets")
    frames: list[str | bytes] = [b"\xff\xfe", b"", "", "null", "[]", '{"type":"join","room":"\\ud800"}',
                                 '{"type":"say","room":"x","text":"' + "a" * 1001 + '"}', DEEP, "x" * (1 << 20)]
    with serve_in_thread(module.app) as base:
        url = base.replace("http://", "ws://") + "/ws/chat?token=token-alice"
        async with connect(url, proxy=None, max_size=None) as ws:
            assert json.loads(await ws.recv()) == {"type": "welcome", "user": "alice"}
            for frame in frames:
                await ws.send(frame)
                answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert answer["type"] == "error" and answer["detail"] and answer["errors"], (repr(frame)[:40], answer)
            await ws.send(json.dumps({"type": "join", "room": "lobby"}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer == {"type": "joined", "room": "lobby", "members": ["alice"]}, answer


@pytest.mark.asyncio
async def test_07_a_storm_of_clients_that_vanish_without_a_close_leaves_no_trace():
    module = solution("07_websockets")

    async def vanish(url: str, room: str) -> None:
        ws = await connect(url, proxy=None)
        await ws.recv()
        await ws.send(json.dumps({"type": "join", "room": room}))
        await ws.recv()
        ws.transport.abort()  # no close frame, no FIN handshake: the TCP connection is reset

    with serve_in_thread(module.app) as base:
        url = base.replace("http://", "ws://") + "/ws/chat?token=token-carol"
        await asyncio.gather(*(vanish(url, f"room-{i % 7}") for i in range(100)))
        manager = module.manager
        deadline = time.monotonic() + 20
        while manager._users or manager._rooms or manager._joined:
            assert time.monotonic() < deadline, (len(manager._users), len(manager._rooms), len(manager._joined))
            await asyncio.sleep(0.05)
        async with connect(url.replace("carol", "bob"), proxy=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "join", "room": "room-1"}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer["members"] == ["bob"], answer


# --- 08: unique rules under concurrency ---------------------------------------------------------


@pytest.mark.asyncio
async def test_08_concurrent_duplicates_are_409_never_500_and_leave_no_connection(tmp_path: Path):
    module = solution("08_database")
    app = module.create_app(module.Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'race.db'}"))
    async with LifespanManager(app) as manager, in_process(manager.app) as client:
        names = await asyncio.gather(*(client.post("/authors", json={"name": "Same"}) for _ in range(30)))
        authors = [(await client.post("/authors", json={"name": f"A{i}"})).json()["id"] for i in range(5)]
        book = {"title": "t", "isbn": "9780060512750", "year": 2000}
        isbns = await asyncio.gather(*(client.post(f"/authors/{authors[i % 5]}/books", json=book) for i in range(30)))
        nested = await asyncio.gather(*(client.post("/authors", json={"name": f"B{i}", "books": [{**book, "isbn": "9780000000001"}]})
                                        for i in range(20)))
        for label, responses in (("author name", names), ("ISBN", isbns), ("ISBN inside new authors", nested)):
            assert sum(response.status_code == 201 for response in responses) == 1, label
            for response in responses:
                if response.status_code != 201:
                    expect_problem(response, 409, f"a concurrent duplicate {label}: the database's unique rule, not a 500")
        page = (await client.get("/books", params={"limit": 100})).json()
        assert page["total"] == 2, page
        assert app.state.engine.pool.checkedout() == 0, "a connection stayed checked out after the race"
