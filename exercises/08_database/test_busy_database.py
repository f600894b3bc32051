"""Graded tests for exercise 08: a busy database. Run: pytest exercises/08_database

Another connection holds SQLite's write lock (what a migration, a backup or a burst of writers
does); the service waits at most DATABASE_LOCK_TIMEOUT seconds for it, then answers a 503
problem with Retry-After, and nothing of the refused write is stored.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from grader.expect import expect_problem, expect_status, json_of

# Same as test_database.py: an unclosed session's connection, collected later, warns about it;
# test_every_request_gives_its_connection_back reports the leak itself.
pytestmark = [pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
              pytest.mark.filterwarnings("ignore:.*was deleted before being closed:ResourceWarning")]

LOCK_TIMEOUT = 0.25  # DATABASE_LOCK_TIMEOUT for the app under test, in seconds
# SQLite's own wait is 5 seconds; an answer within this bound shows the setting was used, with
# room to spare for a loaded machine.
ANSWERED_WITHIN = 4.5

AUTHOR = {
    "name": "Octavia E. Butler",
    "books": [
        {"title": "Kindred", "isbn": "9780807083697", "year": 1979},
        {"title": "Parable of the Sower", "isbn": "9781538732182", "year": 1993},
    ],
}
EARLIER = {"name": "Samuel R. Delany"}
BOOK = {"title": "Dhalgren", "isbn": "9780375706684", "year": 1975}


def call(client: TestClient, method: str, url: str, **kwargs: Any) -> tuple[Any, float]:
    """One request and the seconds it took; an exception escaping the app is a failure that says so."""
    started = time.monotonic()
    try:
        response = client.request(method, url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the TestClient re-raises what the app raised
        pytest.fail(f"\nsent:     {method} {url} while another connection holds the database's write lock"
                    f"\ngot:      the app raised {type(exc).__name__}: {str(exc)[:400]}"
                    "\nwhy:      a busy database (SQLite's 'database is locked', SQLAlchemy's pool TimeoutError) is "
                    "not a bug: answer a 503 problem with Retry-After (README, P18)", pytrace=False)
    return response, time.monotonic() - started


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Another connection holds the write lock (readers may still read) until the block ends."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=60)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


@pytest.fixture
def busy_app(load, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Path]]:
    """A new app on a database file of its own, with DATABASE_LOCK_TIMEOUT set; and that file."""
    path = tmp_path / "busy.db"
    monkeypatch.chdir(tmp_path)  # where a URL that ignores the setting would put its file
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{path}")
    monkeypatch.setenv("DATABASE_LOCK_TIMEOUT", str(LOCK_TIMEOUT))
    module = load("app", fresh=False)
    yield module.create_app(module.Settings()), path
    # Connections that sessions never closed (test_every_request_gives_its_connection_back reports
    # that): collected now, quietly, so that their warnings do not break another test later.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


@pytest.fixture
def busy_client(busy_app) -> Iterator[tuple[TestClient, Path]]:
    app, path = busy_app
    with TestClient(app) as client:  # the lifespan creates the tables
        yield client, path


def expect_busy(response: Any, elapsed: float, what: str) -> None:
    expect_problem(response, 503, f"{what} while another connection holds the write lock: the database is busy, "
                   "which is no bug of the service (not a 500)")
    retry_after = response.headers.get("retry-after", "")
    if not retry_after.isascii() or not retry_after.isdigit():
        pytest.fail(f"\nsent:     {what} while the database is locked\nexpected: a Retry-After header in whole "
                    f"seconds, telling the client when to try again\ngot:      {retry_after or 'no Retry-After'}",
                    pytrace=False)
    if elapsed > ANSWERED_WITHIN:
        pytest.fail(f"\nsent:     {what} while the database is locked, with DATABASE_LOCK_TIMEOUT={LOCK_TIMEOUT}"
                    f"\nexpected: the 503 after about {LOCK_TIMEOUT} s of waiting for the lock"
                    f"\ngot:      it took {elapsed:.1f} s: the wait is not bounded by the setting (SQLite's "
                    "connect timeout, SQLAlchemy's pool_timeout)", pytrace=False)


@pytest.mark.task("sessions")
@pytest.mark.promise("P18")
def test_a_locked_database_is_503_with_retry_after_and_loses_nothing(busy_client):
    client, path = busy_client
    earlier, _ = call(client, "POST", "/authors", json=EARLIER)
    expect_status(earlier, 201, "creating an author before the database is locked")
    earlier_id = json_of(earlier)["id"]

    with write_lock(path):
        response, elapsed = call(client, "POST", "/authors", json=AUTHOR)
        expect_busy(response, elapsed, "POST /authors")
        response, elapsed = call(client, "POST", f"/authors/{earlier_id}/books", json=BOOK)
        expect_busy(response, elapsed, f"POST /authors/{earlier_id}/books")

    # The lock is gone: the same writes now succeed, so the refused ones left nothing behind.
    created, _ = call(client, "POST", "/authors", json=AUTHOR)
    expect_status(created, 201, "the same POST /authors once the lock is released (the refused one stored nothing)")
    author_id = json_of(created)["id"]
    added, _ = call(client, "POST", f"/authors/{earlier_id}/books", json=BOOK)
    expect_status(added, 201, "the same POST /authors/{id}/books once the lock is released")
    response, _ = call(client, "GET", f"/authors/{author_id}")
    expect_status(response, 200, "the author written once the lock was released")
    body = json_of(response)
    isbns = sorted(book.get("isbn") for book in body.get("books", [])) if isinstance(body, dict) else body
    if isbns != sorted(book["isbn"] for book in AUTHOR["books"]):
        pytest.fail(f"\nsent:     GET /authors/{author_id}\nexpected: the author with exactly their two books"
                    f"\ngot:      the books {isbns}", pytrace=False)
    response, _ = call(client, "GET", "/books", params={"author_id": earlier_id})
    page = json_of(response)
    expect_status(response, 200, "the earlier author's books")
    titles = [book.get("title") for book in page.get("items", [])] if isinstance(page, dict) else page
    if titles != [BOOK["title"]]:
        pytest.fail(f"\nsent:     GET /books?author_id={earlier_id}\nexpected: exactly the one book added after the "
                    f"lock was released\ngot:      {titles}", pytrace=False)


CROWD = 60  # more writers at once than a connection pool holds (SQLAlchemy's default: 5 + 10 overflow)


@pytest.mark.task("sessions")
@pytest.mark.promise("P18")
@pytest.mark.asyncio
async def test_a_crowd_of_writers_on_a_locked_database_gets_503s_never_a_500(busy_app):
    app, path = busy_app
    authors = [{"name": f"Writer {n}", "books": [{"title": f"Book {n}", "isbn": f"978{n:010d}", "year": 2000}]}
               for n in range(CROWD)]

    async def post(client: httpx.AsyncClient, author: dict[str, Any]) -> tuple[int, str, str]:
        try:
            response = await client.post("/authors", json=author)
        except Exception as exc:  # noqa: BLE001 - ASGITransport re-raises what the app raised
            return 0, f"the app raised {type(exc).__name__}: {str(exc)[:200]}", ""
        media_type = response.headers.get("content-type", "").split(";")[0]
        return response.status_code, media_type, response.headers.get("retry-after", "")

    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            with write_lock(path):
                # Every writer waits for the lock, or for a connection of the pool while the
                # others hold them all: both waits must end in a 503, however long the queue.
                answers = await asyncio.gather(*(post(client, author) for author in authors))
            wrong = sorted({f"{status} {media_type} Retry-After: {retry_after or '(none)'}"
                            for status, media_type, retry_after in answers
                            if (status, media_type) != (503, "application/problem+json") or not retry_after.isdigit()})
            if wrong:
                pytest.fail(f"\nsent:     {CROWD} POST /authors at once while another connection holds the write lock"
                            "\nexpected: every one a 503 problem with Retry-After (waiting for the lock, or for a "
                            "free connection of the pool, is bounded by DATABASE_LOCK_TIMEOUT: SQLAlchemy's pool "
                            f"TimeoutError is a busy database too)\ngot:      {'; '.join(wrong)[:900]}", pytrace=False)
            # Unlocked, the same writes all succeed: the refused ones stored nothing.
            again = [await post(client, author) for author in authors]
            statuses = sorted({status for status, _, _ in again})
            if statuses != [201]:
                pytest.fail(f"\nsent:     the same {CROWD} POST /authors, one after another, once the lock is released"
                            f"\nexpected: 201 for each\ngot:      the statuses {statuses}", pytrace=False)


ROUTES = [("get", "/health/db"), ("post", "/authors"), ("get", "/authors/{author_id}"),
          ("post", "/authors/{author_id}/books"), ("get", "/books")]


@pytest.mark.task("contract")
@pytest.mark.promise("P14", "P18")
def test_every_route_documents_its_503(busy_client):
    client, _ = busy_client
    response, _ = call(client, "GET", "/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI schema")
    paths = json_of(response).get("paths", {})
    missing = [f"{method.upper()} {path}" for method, path in ROUTES
               if "schema" not in paths.get(path, {}).get(method, {}).get("responses", {}).get("503", {})
               .get("content", {}).get("application/problem+json", {})]
    if missing:
        pytest.fail("\nsent:     GET /openapi.json\nexpected: every route that touches the database documents a 503 "
                    "problem (application/problem+json with the Problem model): a busy database can answer any of "
                    "them. FastAPI(responses=problem_responses(422, 503)) declares it for every route"
                    f"\ngot:      no 503 problem on {', '.join(missing)}", pytrace=False)


@pytest.mark.task("sessions")
@pytest.mark.promise("P18")
def test_another_database_error_is_still_a_500(busy_app):
    app, path = busy_app
    with TestClient(app, raise_server_exceptions=False) as client:
        expect_status(client.get("/books"), 200, "GET /books before anything goes wrong")
        with sqlite3.connect(path) as other:
            other.execute("DROP TABLE books")  # the schema lost a table: no load explains that
        response = client.get("/books")
    expect_problem(response, 500, "GET /books after another connection dropped the books table: 'no such table' "
                   "is an OperationalError, like 'database is locked', but no busy database; it is a bug, and "
                   "a 503 would tell clients to retry what can never work")


@pytest.mark.task("setup")
@pytest.mark.promise("P18")
def test_the_lock_timeout_is_a_setting(load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'settings.db'}")
    module = load("app", fresh=False)
    monkeypatch.delenv("DATABASE_LOCK_TIMEOUT", raising=False)
    got = getattr(module.Settings(), "database_lock_timeout", "(Settings has no database_lock_timeout field)")
    if got != 5.0:
        pytest.fail(f"\nexpected: without DATABASE_LOCK_TIMEOUT, Settings().database_lock_timeout is 5.0\ngot:      {got!r}",
                    pytrace=False)
    for value, accepted in (("0.5", True), ("60", True), ("0", False), ("-1", False), ("60.5", False)):
        monkeypatch.setenv("DATABASE_LOCK_TIMEOUT", value)
        try:
            got = module.Settings().database_lock_timeout
        except ValueError:  # pydantic's ValidationError
            got = "refused"
        if got != (float(value) if accepted else "refused"):
            pytest.fail(f"\nset:      DATABASE_LOCK_TIMEOUT={value}\nexpected: "
                        + (f"Settings().database_lock_timeout == {float(value)}" if accepted else
                           "Settings() refuses it (a number above 0 and at most 60: Field(gt=0, le=60))")
                        + f"\ngot:      {got!r}", pytrace=False)
