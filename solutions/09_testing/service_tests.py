"""Tests for the notes service (exercise 09 reference).

Every test gets the service through the `service` fixture (exercises/09_testing/conftest.py),
so the same file runs against the correct service and against each buggy variant. A test
here earns its place by failing when one specific promise of the README is broken.
"""

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

API_KEY = "test-key-0123456789"
AUTH = {"X-API-Key": API_KEY}


# --- Fixtures: one fresh app, database and audit file per test ------------------------------


@pytest.fixture
def settings(service: ModuleType, tmp_path: Path) -> Any:
    # tmp_path is a new folder per test: a temporary database no other test can see.
    return service.Settings(
        database_path=tmp_path / "notes.db",
        audit_path=tmp_path / "audit.jsonl",
        api_key=API_KEY,
    )


@pytest.fixture
def app(service: ModuleType, settings: Any) -> Iterator[FastAPI]:
    app = service.create_app(settings)
    yield app
    app.dependency_overrides.clear()  # never let an override outlive its test


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    # `with` runs the lifespan: the database is opened before the first request and the
    # teardown runs when the block ends.
    with TestClient(app, headers=AUTH) as client:
        yield client


@pytest.fixture
def make_note(client: TestClient) -> Callable[..., dict[str, Any]]:
    """A factory: create a note through the API and return its body."""

    def make(title: str = "a note", **fields: Any) -> dict[str, Any]:
        response = client.post("/notes", json={"title": title, **fields})
        assert response.status_code == 201, response.text
        return response.json()

    return make


class RecordingNotifier:
    """Stands in for the real notifier and remembers what it was asked to send."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def notify(self, message: str) -> None:
        self.messages.append(message)


@pytest.fixture
def notifier(service: ModuleType, app: FastAPI) -> RecordingNotifier:
    recorder = RecordingNotifier()
    app.dependency_overrides[service.get_notifier] = lambda: recorder
    return recorder  # the `app` fixture clears the override after the test


def audit_actions(settings: Any) -> list[tuple[str, int]]:
    path = Path(settings.audit_path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(record["action"], record["note_id"]) for record in records]


# --- Health and creating notes ----------------------------------------------------------------


def test_health_needs_no_key(app: FastAPI) -> None:
    with TestClient(app) as anonymous:
        response = anonymous.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_create_answers_201_with_location_and_the_note(client: TestClient) -> None:
    response = client.post("/notes", json={"title": "Groceries", "body": "milk", "tags": ["home"]})
    assert response.status_code == 201
    note = response.json()
    assert note["title"] == "Groceries"
    assert note["body"] == "milk"
    assert note["tags"] == ["home"]
    assert isinstance(note["id"], int)
    assert response.headers["location"] == f"/notes/{note['id']}"


def test_create_fills_defaults(make_note: Callable[..., dict[str, Any]]) -> None:
    note = make_note("only a title")
    assert note["body"] == ""
    assert note["tags"] == []
    assert note["created_at"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="no-title"),
        pytest.param({"title": ""}, id="empty-title"),
        pytest.param({"title": "x" * 101}, id="title-too-long"),
        pytest.param({"title": "ok", "tags": "not-a-list"}, id="tags-not-a-list"),
    ],
)
def test_invalid_notes_are_rejected_with_422(client: TestClient, payload: dict[str, Any]) -> None:
    response = client.post("/notes", json=payload)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert client.get("/notes").json()["total"] == 0  # and nothing was stored


def test_titles_at_the_limits_are_accepted(client: TestClient) -> None:
    for title in ["x", "x" * 100]:
        assert client.post("/notes", json={"title": title}).status_code == 201


# --- Reading and deleting ---------------------------------------------------------------------


def test_read_returns_the_stored_note(client: TestClient, make_note: Callable[..., dict[str, Any]]) -> None:
    created = make_note("Read me", tags=["a", "b"])
    response = client.get(f"/notes/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


def test_missing_note_is_a_404_problem(client: TestClient) -> None:
    response = client.get("/notes/999")
    assert response.status_code == 404
    # An error is a problem (RFC 9457): its media type, then the members the README promises.
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {"type": "about:blank", "title": "Not Found", "status": 404,
                               "detail": "Note 999 not found", "instance": "/notes/999"}


def test_note_id_must_be_an_integer(client: TestClient) -> None:
    assert client.get("/notes/abc").status_code == 422


def test_delete_answers_204_and_the_note_is_gone(client: TestClient, make_note: Callable[..., dict[str, Any]]) -> None:
    note = make_note()
    response = client.delete(f"/notes/{note['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/notes/{note['id']}").status_code == 404
    assert client.delete(f"/notes/{note['id']}").status_code == 404


# --- The API key: every /notes route and the feed ----------------------------------------------

PROTECTED = [
    ("POST", "/notes"),
    ("GET", "/notes"),
    ("GET", "/notes/1"),
    ("DELETE", "/notes/1"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_notes_route_requires_the_key(
    client: TestClient, make_note: Callable[..., dict[str, Any]], method: str, path: str
) -> None:
    make_note()  # so that /notes/1 exists: a 401 must not depend on the note being missing
    body = {"title": "t"} if method == "POST" else None
    for key in ["", "wrong-key"]:  # an empty value overrides the client's default header
        response = client.request(method, path, headers={"X-API-Key": key}, json=body)
        assert response.status_code == 401, f"{method} {path} with key {key!r}"
        assert response.headers.get("www-authenticate") == "ApiKey"
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 401


def test_a_rejected_delete_leaves_the_note(client: TestClient, make_note: Callable[..., dict[str, Any]]) -> None:
    note = make_note()
    client.delete(f"/notes/{note['id']}", headers={"X-API-Key": "wrong-key"})
    assert client.get(f"/notes/{note['id']}").status_code == 200


@pytest.mark.parametrize("query", ["", "?api_key=wrong-key"], ids=["no-key", "wrong-key"])
def test_feed_refuses_a_bad_key(client: TestClient, query: str) -> None:
    # Refused before it is accepted: no socket, no message. TestClient (like uvicorn) lets the app
    # answer the handshake itself, so the refusal is its 403 problem, raised by websocket_connect.
    with pytest.raises(WebSocketDenialResponse) as refused:
        with client.websocket_connect(f"/ws/notes{query}") as ws:
            ws.receive_json()
    assert refused.value.status_code == 403
    assert refused.value.headers["content-type"] == "application/problem+json"
    assert refused.value.json()["status"] == 403


# --- Pagination -------------------------------------------------------------------------------


def test_pages_split_the_notes_in_id_order(client: TestClient, make_note: Callable[..., dict[str, Any]]) -> None:
    for number in range(1, 6):
        make_note(f"n{number}")
    expected = {
        (1, 2): ["n1", "n2"],
        (2, 2): ["n3", "n4"],
        (3, 2): ["n5"],
        (4, 2): [],
        (1, 10): ["n1", "n2", "n3", "n4", "n5"],
    }
    for (page, size), titles in expected.items():
        response = client.get("/notes", params={"page": page, "size": size})
        assert response.status_code == 200
        body = response.json()
        assert [note["title"] for note in body["items"]] == titles, f"page={page} size={size}"
        assert (body["total"], body["page"], body["size"]) == (5, page, size)


def test_page_parameters_have_defaults_and_bounds(client: TestClient) -> None:
    assert client.get("/notes").json() == {"items": [], "total": 0, "page": 1, "size": 10}
    for params in [{"page": 0}, {"size": 0}, {"size": 51}, {"page": "first"}]:
        assert client.get("/notes", params=params).status_code == 422, params


# --- The background notification (a dependency override) --------------------------------------


def test_creating_a_note_sends_one_notification(client: TestClient, notifier: RecordingNotifier) -> None:
    client.post("/notes", json={"title": "Call Ada"})
    # TestClient returns once the background tasks have run, so the message is already there.
    assert notifier.messages == ["New note: Call Ada"]


def test_a_rejected_note_sends_nothing(client: TestClient, notifier: RecordingNotifier) -> None:
    client.post("/notes", json={"title": ""})
    client.post("/notes", json={"title": "sneaky"}, headers={"X-API-Key": "wrong-key"})
    assert notifier.messages == []


# --- The lifespan: a database that outlives the app, an audit flushed at teardown ----------------


def test_notes_survive_a_restart(service: ModuleType, settings: Any) -> None:
    with TestClient(service.create_app(settings), headers=AUTH) as first:
        note = first.post("/notes", json={"title": "kept"}).json()
    with TestClient(service.create_app(settings), headers=AUTH) as second:
        assert second.get(f"/notes/{note['id']}").json()["title"] == "kept"


def test_the_audit_is_written_when_the_app_stops(app: FastAPI, settings: Any) -> None:
    with TestClient(app, headers=AUTH) as client:
        note = client.post("/notes", json={"title": "audited"}).json()
        client.delete(f"/notes/{note['id']}")
        # batch_size is 50: nothing has been written yet, the records wait in memory
        assert audit_actions(settings) == []
    # leaving the block ran the lifespan's teardown, which must flush them
    assert audit_actions(settings) == [("created", note["id"]), ("deleted", note["id"])]


def test_a_full_batch_is_written_at_once(service: ModuleType, settings: Any) -> None:
    settings = settings.model_copy(update={"audit_batch_size": 2})
    with TestClient(service.create_app(settings), headers=AUTH) as client:
        first = client.post("/notes", json={"title": "one"}).json()
        second = client.post("/notes", json={"title": "two"}).json()
        assert audit_actions(settings) == [("created", first["id"]), ("created", second["id"])]


# --- Async tests: httpx.AsyncClient over ASGITransport, lifespan by LifespanManager --------------


@pytest.mark.asyncio
async def test_concurrent_creates_get_distinct_ids(app: FastAPI) -> None:
    # ASGITransport sends no lifespan events; LifespanManager runs startup and shutdown.
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
            responses = await asyncio.gather(*(client.post("/notes", json={"title": f"c{i}"}) for i in range(10)))
            assert [r.status_code for r in responses] == [201] * 10
            assert len({r.json()["id"] for r in responses}) == 10
            listing = await client.get("/notes", params={"size": 50})
            assert listing.json()["total"] == 10


# --- The WebSocket feed -------------------------------------------------------------------------


def test_feed_greets_then_pushes_new_notes(client: TestClient, make_note: Callable[..., dict[str, Any]]) -> None:
    make_note()
    with client.websocket_connect(f"/ws/notes?api_key={API_KEY}") as ws:
        assert ws.receive_json() == {"type": "hello", "notes": 1}
        note = client.post("/notes", json={"title": "live"}).json()
        assert ws.receive_json() == {"type": "created", "note": note}
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}
