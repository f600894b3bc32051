"""Your tests for the notes service (exercise 09). This is the file you edit.

Read README.md for the service's promises and lessons/09_testing.md for the techniques.

Run your tests against the correct service:
    pytest exercises/09_testing/service_tests.py
Run them against one buggy variant (they should FAIL there):
    NOTES_VARIANTS=created_returns_200 pytest exercises/09_testing/service_tests.py
Grade them (correct service plus every variant):
    pytest exercises/09_testing

Rules: get the service only through the `service` fixture (never `import service`), and
keep every test passing on the correct service.
"""

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

API_KEY = "test-key-0123456789"
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
def settings(service: ModuleType, tmp_path: Path) -> Any:
    """Settings for one test: its own database and audit file in tmp_path, a known API key."""
    return service.Settings(
        database_path=tmp_path / "notes.db",
        audit_path=tmp_path / "audit.jsonl",
        api_key=API_KEY,
    )


@pytest.fixture
def app(service: ModuleType, settings: Any) -> Iterator[FastAPI]:
    app = service.create_app(settings)
    yield app
    app.dependency_overrides.clear()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as client:  # `with` runs the lifespan
        yield client


def test_health_says_ok(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# TODO: creating a note: 201, a Location header, the note in the body.
# TODO: validation: bad bodies answer 422 (think about the edges: an empty title, 101 characters).
# TODO: reading and deleting: 200 / 204, and a 404 problem (README) when the note does not exist.
# TODO: the API key: every /notes route answers 401 without it or with a wrong one.
# TODO: pagination: a factory fixture that creates notes, then pages 1, 2, 3 with a small size.
# TODO: the background notification: override service.get_notifier with a fake that records.
# TODO: the lifespan: the audit file is written when the app stops (check after the with-block).
# TODO: the WebSocket feed: a greeting, the created event, a wrong key is refused.
# TODO: one async test with httpx.AsyncClient over ASGITransport (and LifespanManager).
