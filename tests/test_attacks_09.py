"""Attacks on the notes service of exercise 09 (`exercises/09_testing/service.py`): the defences hold.

Ids and page numbers past SQLite's 64-bit integers, bodies whose values JSON cannot write back,
concurrent creates and deletes on the one shared connection, and API keys that differ late: each
answer is the promised 4xx (a missing note is a 404 however large its id, a page past the end is
empty), never a 5xx, and concurrent requests each get their own, committed result. A refused
WebSocket handshake is a 403 problem on a real uvicorn, and a 1008 close where the server cannot
carry the app's answer.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from grader.live import serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SERVICE = ROOT / "exercises" / "09_testing"
KEY = "k" * 32
JSON = {"content-type": "application/json", "x-api-key": KEY}


@pytest.fixture(scope="module")
def service():
    return load_module(Path(SERVICE), "service")


@pytest.fixture
def app(service, tmp_path):
    return service.create_app(service.Settings(database_path=tmp_path / "notes.db", audit_path=tmp_path / "audit.jsonl",
                                               api_key=KEY))


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False, headers={"x-api-key": KEY}) as client:
        yield client


@pytest.mark.parametrize("note_id", [str(2**63), str(-(2**63) - 1), str(10**30), "9" * 400])
def test_ids_past_sqlite_integers_are_404(client, note_id):
    assert client.get(f"/notes/{note_id}").status_code == 404
    assert client.delete(f"/notes/{note_id}").status_code == 404


@pytest.mark.parametrize("page", [str(2**63), str(10**30)])
def test_pages_past_sqlite_integers_are_empty(client, page):
    response = client.get("/notes", params={"page": page, "size": 50})
    assert response.status_code == 200, response.text
    assert response.json()["items"] == []


@pytest.mark.parametrize("raw", ["1e309", "NaN", "-Infinity", str(10**400)])
def test_values_json_cannot_write_back_are_a_422(client, raw):
    response = client.post("/notes", content=f'{{"title": {raw}}}', headers=JSON)
    assert response.status_code == 422, response.text
    assert client.get("/notes").json()["total"] == 0


def test_a_key_that_differs_only_at_the_end_is_refused(client):
    assert client.get("/notes", headers={"x-api-key": KEY[:-1] + "x"}).status_code == 401


@pytest.mark.asyncio
async def test_concurrent_creates_and_deletes_share_the_connection_safely(app):
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers={"x-api-key": KEY}) as client:
            created = await asyncio.gather(*(client.post("/notes", json={"title": f"n{n}"}) for n in range(20)))
            ids = [response.json()["id"] for response in created]
            deleted = await asyncio.gather(*(client.delete(f"/notes/{note_id}") for note_id in ids[::2]))
            listing = (await client.get("/notes", params={"size": 50})).json()
    assert [response.status_code for response in created] == [201] * 20 and len(set(ids)) == 20
    assert [response.status_code for response in deleted] == [204] * 10
    assert sorted(note["id"] for note in listing["items"]) == sorted(ids[1::2]) and listing["total"] == 10


@pytest.mark.parametrize("field", ["title", "body", "tags"])
@pytest.mark.parametrize("lone", ["\\ud800", "\\udfff", "ok\\udc00"])
def test_a_lone_surrogate_in_any_string_is_a_422_and_nothing_is_stored(client, field, lone):
    # Written by hand: the escape must reach the server as six characters, which Python's json
    # reads into a str that can never be encoded again (stored, every later answer would be a 500).
    value = f'["{lone}"]' if field == "tags" else f'"{lone}"'
    body = f'{{"title": "t", "{field}": {value}}}'
    response = client.post("/notes", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    assert "input" not in response.json()["errors"][0]
    listing = client.get("/notes")
    assert listing.status_code == 200 and listing.json()["total"] == 0, listing.text


@pytest.mark.parametrize(("tag", "expected"), [("", 422), ("x", 201), ("x" * 50, 201), ("x" * 51, 422)])
def test_each_tag_is_1_to_50_characters(client, tag, expected):
    assert client.post("/notes", json={"title": "t", "tags": [tag]}).status_code == expected


def test_a_title_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="notes")
    forged = "a\nERROR admin logged in\r\x1b[2Kb"
    assert client.post("/notes", json={"title": forged}).status_code == 201
    [record] = [record for record in caplog.records if record.name == "notes"]
    message = record.getMessage()
    assert "New note" in message and not any(c in message for c in "\n\r\x1b"), repr(message)


# A WebSocket handshake, as a browser sends it: uvicorn treats the GET as an upgrade request.
UPGRADE = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
           "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_a_refused_feed_is_a_403_problem_on_a_real_server(app):
    # uvicorn offers the websocket.http.response extension: the refusal is the app's problem,
    # not uvicorn's bodiless 403, and it never echoes the key that was refused.
    with serve_in_thread(app) as url:
        for query in ["", "?api_key=", f"?api_key={KEY[:-1]}x", f"?api_key={KEY}%00"]:
            response = httpx.get(f"{url}/ws/notes{query}", headers=UPGRADE, timeout=10)
            assert response.status_code == 403, (query, response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json", query
            problem = response.json()
            assert problem["status"] == 403 and problem["instance"] == "/ws/notes", (query, problem)
            assert KEY[:-1] not in response.text, query
        accepted = httpx.get(f"{url}/ws/notes?api_key={KEY}", headers=UPGRADE, timeout=10)
        assert accepted.status_code == 101, accepted.status_code


@pytest.mark.asyncio
async def test_a_server_without_the_extension_gets_a_1008_close(app):
    # No "websocket.http.response" in the scope: the app cannot answer the handshake, so it closes.
    async with LifespanManager(app) as manager:
        sent: list[dict] = []
        inbox = [{"type": "websocket.connect"}]

        async def receive():
            return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1006}

        async def send(message):
            sent.append(message)

        scope = {"type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws/notes", "raw_path": b"/ws/notes",
                 "query_string": b"api_key=wrong", "headers": [], "scheme": "ws", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1), "root_path": "", "subprotocols": []}
        await manager.app(scope, receive, send)
    assert [message["type"] for message in sent] == ["websocket.close"], sent
    assert sent[0]["code"] == 1008
