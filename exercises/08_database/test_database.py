"""Graded tests for exercise 08. Run: pytest exercises/08_database"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from sqlalchemy import event

from grader.expect import expect_json, expect_problem, expect_status, explain, json_of

DEFAULT_URL = "sqlite+aiosqlite:///./library.db"

# A session that is never closed leaves its connection checked out. When the garbage collector
# finds such a connection, SQLAlchemy terminates it on a throwaway event loop that it never closes,
# and Python reports "unclosed event loop" / "unclosed socket" ResourceWarnings at whatever moment
# the collector happens to run, in whichever test is running then. The leak itself is reported,
# clearly, by test_every_request_gives_its_connection_back; these echoes would only blame other tests.
pytestmark = [pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
              # the same leak, as aiosqlite reports a connection an undisposed engine left open
              pytest.mark.filterwarnings("ignore:.*was deleted before being closed:ResourceWarning")]

URSULA = {
    "name": "Ursula K. Le Guin",
    "books": [
        {"title": "The Dispossessed", "isbn": "9780060512750", "year": 1974},
        {"title": "A Wizard of Earthsea", "isbn": "9780547773742", "year": 1968},
    ],
}
# Authors of their own for the tests that share one database (names and ISBNs are unique there).
JEMISIN = {
    "name": "N. K. Jemisin",
    "books": [
        {"title": "The Fifth Season", "isbn": "9780316229296", "year": 2015},
        {"title": "The Obelisk Gate", "isbn": "9780316229265", "year": 2016},
    ],
}
CHAMBERS = {
    "name": "Becky Chambers",
    "books": [
        {"title": "The Long Way to a Small, Angry Planet", "isbn": "9780062444134", "year": 2014},
        {"title": "A Closed and Common Orbit", "isbn": "9780062569400", "year": 2016},
    ],
}
BANKS = {
    "name": "Iain M. Banks",
    "books": [
        {"title": "Consider Phlebas", "isbn": "9780316005388", "year": 1987},
        {"title": "The Player of Games", "isbn": "9780316005401", "year": 1988},
    ],
}


# --- Fixtures --------------------------------------------------------------------------------
#
# app.py is imported once for this file, with DATABASE_URL set (its module-level `app` is checked
# by the startup test); every other app comes from create_app(Settings()), each on its own SQLite
# file in its own temporary folder, the working directory while it runs (so a URL like
# ./library.db, which ignores the setting, never lands in your working tree).
# - Tests that need a known, clean database (totals, pool counts) get an app of their own
#   (the `client` fixture).
# - Tests that only read, are refused, or write rows of their own and read only those share ONE
#   app (`shared`); after each of them, connections its unclosed sessions left are collected.
# - The two paging tests read the same seven books (`shelved`): the first of them adds them.
# Shared apps start inside the first test that uses them, so an app that cannot start fails tests.


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new empty folder, in memory where the system offers one (Linux's /dev/shm).

    SQLite makes every commit durable with an fsync, which on some disks costs more than the
    rest of a test; a RAM-backed folder behaves the same for everything the tests check.
    """
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    if base and not _swept:
        _sweep(shm)
    with tempfile.TemporaryDirectory(prefix="graded-08-", dir=base, ignore_cleanup_errors=True) as folder:
        yield Path(folder)


_swept: list[bool] = []


def _sweep(shm: Path) -> None:
    """Remove what runs that were killed mid-test left in memory (an hour old: no run takes that long)."""
    _swept.append(True)
    for old in shm.glob("graded-08-*"):
        with contextlib.suppress(OSError):
            if old.stat().st_uid == os.getuid() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def tables(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.fixture(scope="module", autouse=True)
def module_folder() -> Iterator[Path]:
    with scratch_folder() as folder, pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the working directory of every test in this file, unless it has its own
        yield folder


@pytest.fixture(scope="module")
def imported(load, module_folder: Path) -> tuple[Any, Path, set[str]]:
    """app.py, imported once with DATABASE_URL set (as README.md promises); its file; its tables then."""
    path = module_folder / "imported.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url_of(path))
        module = load("app", fresh=False)
    return module, path, tables(path)


@pytest.fixture(scope="module")
def module(imported):
    return imported[0]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The test's own empty folder, as the working directory."""
    with scratch_folder() as folder, pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder


@pytest.fixture
def database_file(workdir: Path) -> Iterator[Path]:
    """The test's own SQLite file, handed to the app through DATABASE_URL."""
    path = workdir / "graded.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url_of(path))
        yield path


def new_app(module):
    """A new app from the factory, on the database DATABASE_URL names now."""
    return module.create_app(module.Settings())


def checked_out(app: Any) -> int:
    pool = getattr(getattr(app.state, "engine", None), "pool", None)
    return pool.checkedout() if hasattr(pool, "checkedout") else 0


def collect_leaks() -> None:
    # Sessions that were never closed: test_every_request_gives_its_connection_back says so
    # clearly. Collect them now, quietly, so their warnings do not break unrelated tests later.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


@pytest.fixture
def client(module, database_file) -> Iterator[TestClient]:
    """A client of the test's own app, on a fresh database."""
    app = new_app(module)
    with TestClient(app) as client:  # `with`: the lifespan runs (tables, engine)
        yield client
        leaked = checked_out(app)  # before the shutdown, which replaces the pool
    if leaked:
        collect_leaks()


class SharedApp:
    """One app on one database file, in its own folder, for several tests; started on first use.

    Tests send their requests through it as through a TestClient. It starts inside the first
    test that sends one, not in a fixture, so that an app that cannot start fails that test with
    a message instead of erroring every test that shares it.
    """

    def __init__(self, module, folder: Path) -> None:
        folder.mkdir()
        self.module, self.folder, self.database_file = module, folder, folder / "graded.db"
        self.app: Any = None
        self._client: TestClient | None = None
        self._error = ""
        self.books: list[dict[str, Any]] | None = None  # what stocked() put on it
        self.stock_error = ""

    def start(self) -> TestClient:
        if self._client is None and not self._error:
            try:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setenv("DATABASE_URL", url_of(self.database_file))
                    patch.chdir(self.folder)
                    self.app = new_app(self.module)
                    client = TestClient(self.app)
                    client.__enter__()  # the lifespan runs (tables, engine); left in close()
                self._client = client
            except Exception as exc:  # noqa: BLE001 - reported as this test's failure
                self._error = ("\nexpected: the app starts: with TestClient(create_app(Settings())) runs its lifespan"
                               f"\ngot:      {type(exc).__name__}: {str(exc)[:600]}")
        if self._client is None:
            pytest.fail(self._error, pytrace=False)
        return self._client

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        client = self.start()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(self.folder)  # where a relative database URL would put its file
            return client.request(method, url, **kwargs)

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)

    def collect_leaks(self) -> None:
        if self.app is not None and checked_out(self.app):
            collect_leaks()  # this test's unclosed sessions, not the next test's problem


@pytest.fixture(scope="module")
def shared_app(module, module_folder: Path) -> Iterator[SharedApp]:
    shared = SharedApp(module, module_folder / "shared")
    yield shared
    shared.close()


@pytest.fixture
def shared(shared_app: SharedApp) -> Iterator[SharedApp]:
    """The shared app, to send requests to: write only rows of your own, read only those."""
    yield shared_app
    shared_app.collect_leaks()


@pytest.fixture(scope="module")
def shelf_app(module, module_folder: Path) -> Iterator[SharedApp]:
    shelf = SharedApp(module, module_folder / "shelf")
    yield shelf
    shelf.close()


@pytest.fixture
def shelved(shelf_app: SharedApp) -> Iterator[SharedApp]:
    """An app whose database holds exactly the shelf (see stocked()), to read only."""
    yield shelf_app
    shelf_app.collect_leaks()


def call(client: TestClient | SharedApp, method: str, url: str, **kwargs: Any) -> Any:
    """Send one request; an exception escaping the app becomes a failure that says what it means."""
    try:
        return client.request(method, url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the TestClient re-raises what the app raised
        raised = exc
    body = f"\n          body {json.dumps(kwargs['json'])}" if "json" in kwargs else ""
    name, text = type(raised).__name__, str(raised)
    hint = ""
    if name == "MissingGreenlet" or "lazy" in text or "greenlet" in text:
        hint = ("\nwhy:      an attribute needed I/O that async code cannot do implicitly: a relationship loaded "
                "lazily (load it in the query: .options(selectinload(Author.books))) or an object expired by a "
                "commit (async_sessionmaker(engine, expire_on_commit=False)).")
    elif name == "IntegrityError":
        hint = "\nwhy:      the database refused a duplicate. Catch IntegrityError at the flush and answer 409."
    elif "Out of range float" in text:
        hint = ("\nwhy:      FastAPI's default 422 echoes the refused input, and 1e309 (infinity) or NaN cannot be "
                "written as JSON. Register a RequestValidationError handler that answers the errors without their input.")
    elif name == "ArgumentError" and "text(" in text:
        hint = "\nwhy:      raw SQL strings must be wrapped: session.execute(text('SELECT 1'))."
    pytest.fail(f"\nsent:     {method} {url}{body}\ngot:      the app raised {name}: {text[:600]}{hint}", pytrace=False)


def check(ok: bool, message: str) -> None:
    """A failed check shows its message, not this file's source."""
    if not ok:
        pytest.fail(message, pytrace=False)


def create_author(client: TestClient | SharedApp, payload: dict[str, Any]) -> dict[str, Any]:
    response = call(client, "POST", "/authors", json=payload)
    expect_status(response, 201, "creating an author answers 201 Created")
    return json_of(response)


def add_book(client: TestClient | SharedApp, author_id: int, title: str, isbn: str, year: int = 2000) -> dict[str, Any]:
    response = call(client, "POST", f"/authors/{author_id}/books", json={"title": title, "isbn": isbn, "year": year})
    expect_status(response, 201, "adding a book answers 201 Created")
    return json_of(response)


def isbn(number: int) -> str:
    return f"978{number:010d}"


# --- setup --------------------------------------------------------------------------------------


@pytest.mark.task("setup")
@pytest.mark.promise("P1")
def test_settings_read_the_database_url_from_the_environment(module, module_folder, monkeypatch):
    database_file = module_folder / "settings.db"
    monkeypatch.setenv("DATABASE_URL", url_of(database_file))
    got = getattr(module.Settings(), "database_url", "(Settings has no database_url field)")
    check(got == f"sqlite+aiosqlite:///{database_file}", (
        f"\nset:      DATABASE_URL=sqlite+aiosqlite:///{database_file}\nexpected: Settings().database_url "
        f"to be that value (pydantic-settings reads the environment)\ngot:      {got!r}"))
    monkeypatch.delenv("DATABASE_URL")
    default = getattr(module.Settings(), "database_url", None)
    check(default == DEFAULT_URL, f"\nexpected: without DATABASE_URL, the default {DEFAULT_URL!r}\ngot:      {default!r}")


@pytest.mark.task("setup")
@pytest.mark.promise("P1", "P2", "P3")
def test_the_tables_are_created_at_startup_in_the_configured_database(imported, workdir):
    # The module-level `app`, built when app.py was imported with DATABASE_URL naming this file.
    module, database_file, found_after_import = imported
    check(not found_after_import, (
        "\nexpected: importing app.py touches no database (the engine and tables belong in the lifespan)"
        f"\ngot:      tables already in {database_file.name} right after import: {sorted(found_after_import)}"))
    with TestClient(module.app):
        found = tables(database_file)
        engine = getattr(module.app.state, "engine", None)
        check({"authors", "books"} <= found, (
            f"\nexpected: once the app has started, the tables authors and books exist in the database "
            f"DATABASE_URL names ({database_file.name})\ngot:      tables {sorted(found) or 'none'}"
            + ("; a library.db appeared in the working directory instead: is the URL taken from Settings?"
               if Path("library.db").exists() else "")))
    pool = getattr(engine, "pool", None)
    left_open = pool.checkedin() + pool.checkedout() if hasattr(pool, "checkedin") else 0
    if left_open:  # close them now, or the garbage collector reports them later, in another test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asyncio.run(engine.dispose())
    check(not left_open, (
        "\nexpected: after the lifespan's shutdown, the engine is disposed of (await engine.dispose()): "
        "no connection of app.state.engine's pool stays open\n"
        f"got:      {left_open} connection(s) "
        "still open after the app stopped" if pool is not None else "no app.state.engine"))
    with sqlite3.connect(database_file) as connection:
        declared = {(table, row[1]): row[2].upper().replace(" ", "") for table in ("authors", "books")
                    for row in connection.execute(f"PRAGMA table_info({table})")}
        columns = {table: {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
                   for table in ("authors", "books")}
        references = {(row[2], row[3], row[4]) for row in connection.execute("PRAGMA foreign_key_list(books)")}
    wanted = {"authors": {"id", "name"}, "books": {"id", "title", "isbn", "year", "author_id"}}
    check(all(wanted[table] <= columns[table] for table in wanted), (
        f"\nexpected: the columns {{table: columns}} {wanted}\ngot:      {columns}"))
    lengths = {("authors", "name"): "VARCHAR(100)", ("books", "title"): "VARCHAR(200)", ("books", "isbn"): "VARCHAR(13)"}
    wrong = {f"{table}.{column}": declared.get((table, column)) for (table, column), want in lengths.items()
             if declared.get((table, column)) != want}
    check(not wrong, (
        f"\nexpected: the columns declared with the lengths README.md gives (String(n)): "
        f"{ {f'{t}.{c}': w for (t, c), w in lengths.items()} }\ngot:      {wrong}\n"
        "          SQLite ignores a declared length, but PostgreSQL (where the same code may run) enforces it: "
        "a shorter column refuses what the API accepts, a longer one stores what it refuses"))
    check(("authors", "author_id", "id") in references, (
        "\nexpected: books.author_id is a foreign key to authors.id "
        "(mapped_column(ForeignKey(\"authors.id\")))"
        f"\ngot:      foreign keys of books: {sorted(references) or 'none'}"))
    # create_app must use the Settings it is given, not read the environment again on its own.
    given, elsewhere = workdir / "given.db", workdir / "elsewhere.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url_of(given))
        settings = module.Settings()
        patch.setenv("DATABASE_URL", url_of(elsewhere))
        with TestClient(module.create_app(settings)):
            found, stray = tables(given), tables(elsewhere)
    check({"authors", "books"} <= found, (
        f"\nset:      DATABASE_URL naming {given.name}, then settings = Settings(), then DATABASE_URL naming "
        f"{elsewhere.name}\nstarted:  create_app(settings)\nexpected: the tables in {given.name}, the database "
        f"of the settings create_app received\ngot:      tables in {given.name}: {sorted(found) or 'none'}; "
        f"in {elsewhere.name}: {sorted(stray) or 'none'} (does create_app build a Settings() of its own?)"))


@pytest.mark.task("setup")
@pytest.mark.promise("P2", "P4")
def test_the_database_health_route_runs_a_query(shared):
    shared.start()
    engine = getattr(shared.app.state, "engine", None)
    check(engine is not None, "\nexpected: the lifespan keeps the engine on app.state.engine\ngot:      no app.state.engine")
    # Every statement the app's engine sends to the database during the request, as the driver sees it.
    statements: list[str] = []
    sync_engine = getattr(engine, "sync_engine", engine)

    def record(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(sync_engine, "before_cursor_execute", record)
    try:
        response = call(shared, "GET", "/health/db")
    finally:
        event.remove(sync_engine, "before_cursor_execute", record)
    expect_json(response, {"database": "ok"}, "GET /health/db runs SELECT 1 through the session", exact=True)
    check(bool(statements), explain(
        response, "the answer comes after a query really ran: no statement reached the database through "
        "app.state.engine. A readiness check that does not ask the database says ok when it is down: "
        'run session.execute(text("SELECT 1")).'))


@pytest.mark.task("setup")
@pytest.mark.promise("P4")
def test_the_database_health_route_answers_503_when_the_database_is_unreachable(client, database_file):
    expect_json(call(client, "GET", "/health/db"), {"database": "ok"}, "the database is there", exact=True)
    # The database goes away: its file becomes a folder, which SQLite cannot open, and the
    # connections the pool keeps are closed, so the next query must open a new one.
    engine = getattr(client.app.state, "engine", None)
    check(engine is not None, "\nexpected: the lifespan keeps the engine on app.state.engine\ngot:      no app.state.engine")
    client.portal.call(engine.dispose)
    database_file.unlink()
    database_file.mkdir()
    response = call(client, "GET", "/health/db")
    expect_problem(response, 503, "the database file cannot be opened: a readiness check that fails says 503, "
                   "so that a load balancer stops sending traffic here; its body is a problem whose detail says so")


# --- sessions -----------------------------------------------------------------------------------


@pytest.mark.task("sessions")
@pytest.mark.promise("P5", "P6", "P11")
def test_what_one_request_writes_the_next_one_reads(shared):
    author = create_author(shared, JEMISIN)
    response = call(shared, "GET", f"/authors/{author['id']}")
    expect_status(response, 200, "the author created by the previous request was committed")
    expect_json(response, {"id": author["id"], "name": JEMISIN["name"]})


@pytest.mark.task("sessions")
@pytest.mark.promise("P5", "P9", "P11")
def test_a_request_that_fails_leaves_no_trace(client):
    create_author(client, URSULA)
    clash = {"name": "Ann Leckie", "books": [
        {"title": "Ancillary Justice", "isbn": isbn(1), "year": 2013},
        {"title": "Taken ISBN", "isbn": URSULA["books"][0]["isbn"], "year": 2014},
    ]}
    response = call(client, "POST", "/authors", json=clash)
    expect_status(response, 409, "the second book's ISBN is taken, so the whole request fails")
    retry = call(client, "POST", "/authors", json={"name": "Ann Leckie"})
    check(retry.status_code == 201, explain(
        retry, "201: the failed request must have been rolled back completely, author included "
        "(one transaction per request; no commit before the end)"))
    listing = call(client, "GET", "/books")
    books = json_of(listing)
    total = books.get("total") if isinstance(books, dict) else None
    check(total == 2, explain(listing, "a total of 2 books: nothing from the failed request was saved"))


def authors_in(path: Path) -> list[str] | None:
    """The author names committed to the database file, read over a connection of our own."""
    try:
        with sqlite3.connect(path, timeout=1) as connection:
            return [row[0] for row in connection.execute("SELECT name FROM authors")]
    except sqlite3.Error:
        return None


async def post_raw(app: Any, payload: dict[str, Any], on_start: Callable[[], None] | None = None) -> tuple[int | None, str | None]:
    """POST /authors to the app in raw ASGI: (the status, or None; the exception the app raised, or None).

    `on_start` runs at the moment the response starts going out.
    """
    body = json.dumps(payload).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/authors", "raw_path": b"/authors", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("test", 80),
    }
    request_sent = False
    status: int | None = None

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            if on_start is not None:
                on_start()

    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return status, f"{type(exc).__name__}: {str(exc)[:200]}"
    return status, None


@pytest.mark.task("sessions")
@pytest.mark.promise("P11")
@pytest.mark.asyncio
async def test_the_commit_happens_before_the_response_is_sent(module, database_file):
    # Spoken to in raw ASGI, so that the test sees the moment the response starts going out.
    payload = {"name": "Ann Leckie"}
    committed: list[str] | None = None

    def look() -> None:
        nonlocal committed
        committed = authors_in(database_file)  # what another connection sees right now

    overlapping = [{"name": f"At Once {n}"} for n in range(3)]
    app = new_app(module)  # its own: the engine belongs to this test's event loop
    async with LifespanManager(app):
        status, error = await post_raw(app, payload, look)
        # Three requests in flight together; each needs a session of its own.
        together = await asyncio.gather(*(post_raw(app, other) for other in overlapping))
    sent = f"\nsent:     POST /authors {json.dumps(payload)}"
    check(error is None, f"{sent}\nexpected: 201\ngot:      the app raised {error}")
    check(status == 201, f"{sent}\nexpected: status 201 (creating an author answers 201 Created)\ngot:      {status}"
          + (" (no route matched: is POST /authors defined?)" if status == 404 else ""))
    check(committed == ["Ann Leckie"], (
        f"{sent}\nexpected: when the 201 starts going out, the author is already committed"
        f"\ngot:      the database showed {committed} at that moment: the commit runs after the response."
        "\n          If that commit failed, the client would hold a 201 for a write that never happened."
        '\n          Declare the session dependency with Depends(get_session, scope="function").'))
    got = [f"{other_status} ({other_error})" if other_error else str(other_status) for other_status, other_error in together]
    check(got == ["201"] * len(overlapping), (
        f"\nsent:     {len(overlapping)} POST /authors at the same time: "
        + ", ".join(json.dumps(other) for other in overlapping)
        + f"\nexpected: 201 for each: every request works in a session of its own\ngot:      {', '.join(got)}"
        "\n          One session shared by requests that overlap breaks: "
        "open a new one per request in the dependency (async with sessionmaker() as session: ... yield session)."))


@pytest.mark.task("sessions")
@pytest.mark.promise("P11", "P12")
def test_every_request_gives_its_connection_back(client):
    author = create_author(client, URSULA)
    requests = [
        ("GET", f"/authors/{author['id']}", None), ("GET", "/authors/999", None),
        ("POST", "/authors", {"name": URSULA["name"]}), ("POST", "/authors/999/books", {"title": "x", "isbn": isbn(5), "year": 2000}),
        ("POST", "/authors", {"name": ""}), ("GET", "/books", None), ("GET", "/health/db", None),
    ]
    engine = getattr(client.app.state, "engine", None)  # the app this test started
    check(engine is not None, "\nexpected: the lifespan keeps the engine on app.state.engine\ngot:      no app.state.engine")
    for method, url, body in requests:
        call(client, method, url, **({"json": body} if body is not None else {}))
        busy = engine.pool.checkedout()
        check(busy == 0, (
            f"\nsent:     {method} {url}" + (f"\n          body {body}" if body else "")
            + "\nexpected: after the response, every database connection is back in the pool"
            f"\ngot:      {busy} connection(s) still checked out: the session was not closed on this path. "
            "Use `async with sessionmaker() as session:` around the yield, so it closes on errors too."))


# --- relationships ------------------------------------------------------------------------------


@pytest.mark.task("relationships")
@pytest.mark.promise("P6", "P7")
def test_an_author_comes_with_their_books_in_title_order(shared):
    author = create_author(shared, URSULA)
    add_book(shared, author["id"], "The Lathe of Heaven", isbn(7), 1971)
    response = call(shared, "GET", f"/authors/{author['id']}")
    body = expect_json(response, {"id": author["id"], "name": URSULA["name"]})
    titles = [book.get("title") for book in body.get("books", [])] if isinstance(body.get("books"), list) else None
    check(titles == ["A Wizard of Earthsea", "The Dispossessed", "The Lathe of Heaven"], explain(
        response, "books: the author's three books, sorted by title"))
    first = body["books"][0]
    want = {"isbn": "9780547773742", "year": 1968, "author_id": author["id"]}
    check({key: first.get(key) for key in want} == want and isinstance(first.get("id"), int), explain(
        response, f"each book with id, title, isbn, year and author_id; the first one {want}"))


@pytest.mark.task("relationships")
@pytest.mark.promise("P5")
def test_the_created_author_is_answered_with_their_books(shared):
    body = create_author(shared, CHAMBERS)
    books = body.get("books")
    ok = isinstance(books, list) and sorted(b.get("isbn") for b in books if isinstance(b, dict)) == sorted(
        b["isbn"] for b in CHAMBERS["books"]) and all(isinstance(b.get("id"), int) for b in books)
    check(ok, f"\nsent:     POST /authors with two books\nexpected: the answer lists both books, each with its id\ngot:      {body}")
    empty = create_author(shared, {"name": "Nobody Yet"})
    check(empty.get("books") == [], f"\nsent:     POST /authors without books\nexpected: books: []\ngot:      {empty}")


# --- constraints --------------------------------------------------------------------------------


@pytest.mark.task("constraints")
@pytest.mark.promise("P9")
def test_a_duplicate_author_name_is_409(shared):
    create_author(shared, {"name": "Octavia E. Butler"})
    response = call(shared, "POST", "/authors", json={"name": "Octavia E. Butler"})
    body = expect_problem(response, 409, "the name is unique: the database refuses the second row, the API says 409 Conflict")
    check("Octavia" not in json.dumps(body), explain(
        response, "a problem whose detail says what clashed without repeating the refused name: a detail never "
        "carries what the client sent (it may be personal data, and it ends up in logs)"))


@pytest.mark.task("constraints")
@pytest.mark.promise("P9")
def test_a_duplicate_isbn_is_409_and_changes_nothing(shared):
    first = create_author(shared, BANKS)
    other = create_author(shared, {"name": "Somebody Else"})
    taken = BANKS["books"][0]["isbn"]
    response = call(shared, "POST", f"/authors/{other['id']}/books", json={"title": "Copy", "isbn": taken, "year": 2001})
    body = expect_problem(response, 409, "the ISBN is unique across all books")
    check(taken not in json.dumps(body), explain(response, "a problem whose detail does not repeat the refused ISBN"))
    expect_json(call(shared, "GET", f"/authors/{other['id']}"), {"books": []}, "the refused book was not saved")
    response = call(shared, "GET", f"/authors/{first['id']}")
    check(len(json_of(response).get("books", [])) == 2, explain(response, "the original owner still has 2 books"))
    twins = {"name": "Twin Books", "books": [{"title": "One", "isbn": isbn(42), "year": 2000},
                                              {"title": "Two", "isbn": isbn(42), "year": 2001}]}
    expect_problem(call(shared, "POST", "/authors", json=twins), 409,
                   "two books of one request share an ISBN: the unique rule holds inside a request too")


@pytest.mark.task("constraints")
@pytest.mark.promise("P6", "P7")
def test_a_missing_author_is_404(shared):
    # The shared database holds a handful of authors, never 41.
    response = call(shared, "GET", "/authors/41")
    expect_problem(response, 404, "there is no author 41: a problem (application/problem+json) saying so")
    response = call(shared, "POST", "/authors/41/books", json={"title": "Orphan", "isbn": isbn(9), "year": 2000})
    expect_problem(response, 404, "a book cannot be added to an author who does not exist")


INVALID = [
    ("/authors", {"name": ""}),
    ("/authors", {"name": "x" * 101}),
    ("/authors", {"name": "Valid", "books": [{"title": "No ISBN", "year": 2000}]}),
    ("/authors/{id}/books", {"title": "Short ISBN", "isbn": "12345", "year": 2000}),
    ("/authors/{id}/books", {"title": "Letters", "isbn": "978000000000X", "year": 2000}),
    ("/authors/{id}/books", {"title": "", "isbn": isbn(3), "year": 2000}),
    ("/authors/{id}/books", {"title": "x" * 201, "isbn": isbn(3), "year": 2000}),
    ("/authors/{id}/books", {"title": "Too long ISBN", "isbn": isbn(3) + "0", "year": 2000}),
    ("/authors/{id}/books", {"title": "ISBN-10", "isbn": "0060512750", "year": 2000}),
    ("/authors/{id}/books", {"title": "Before print", "isbn": isbn(3), "year": 1449}),
    ("/authors/{id}/books", {"title": "Far future", "isbn": isbn(3), "year": 2101}),
]


@pytest.mark.task("constraints")
@pytest.mark.promise("P10")
def test_invalid_input_is_422(shared):
    author = create_author(shared, {"name": "Existing"})  # so that /authors/{id}/books names a real author
    for url, payload in INVALID:
        expect_problem(call(shared, "POST", url.format(id=author["id"]), json=payload), 422,
                       "the API schema rejects it before the database sees it: name 1-100 characters, "
                       "title 1-200, isbn 13 digits, year 1450-2100")
    # The limits themselves are valid: each bound is inclusive.
    edge = {"name": "N" * 100, "books": [{"title": "T" * 200, "isbn": isbn(61), "year": 1450}]}
    response = call(shared, "POST", "/authors", json=edge)
    expect_status(response, 201, "a name of 100 characters, a title of 200 and the year 1450 are all allowed")
    response = call(shared, "POST", f"/authors/{author['id']}/books",
                    json={"title": "Last year", "isbn": isbn(62), "year": 2100})
    expect_status(response, 201, "the year 2100 is allowed (1450-2100, both included)")
    # One POST /authors carries at most 50 books: a body is bounded, like every input.
    shelf = [{"title": f"Volume {n}", "isbn": isbn(7000 + n), "year": 2000} for n in range(51)]
    response = call(shared, "POST", "/authors", json={"name": "Prolific", "books": shelf})
    expect_status(response, 422, "51 books in one POST /authors: at most 50")
    response = call(shared, "POST", "/authors", json={"name": "Prolific", "books": shelf[:50]})
    expect_status(response, 201, "50 books in one POST /authors are allowed (at most 50, both ends included)")


# The code point of the digit zero in scripts whose digits Unicode calls decimal (category Nd):
# `\d` matches every one of them, in pydantic's regex engine and in Python's `re` alike.
OTHER_ZEROS = {"full-width": 0xFF10, "Arabic-Indic": 0x0660, "Persian": 0x06F0, "Devanagari": 0x0966,
               "Bengali": 0x09E6, "Thai": 0x0E50, "mathematical bold": 0x1D7CE}


def spelled_in(text: str, zero: int) -> str:
    return "".join(chr(zero + int(c)) if c in "0123456789" else c for c in text)


@pytest.mark.task("constraints")
@pytest.mark.promise("P10", "P9")
def test_an_isbn_is_13_ascii_digits_in_no_other_script(shared):
    author = create_author(shared, {"name": "Digit Scripts"})
    taken = isbn(90)
    add_book(shared, author["id"], "The ASCII Original", taken)
    spellings = {script: spelled_in(taken, zero) for script, zero in OTHER_ZEROS.items()}
    spellings["the last digit Thai"] = taken[:-1] + spelled_in(taken[-1], OTHER_ZEROS["Thai"])
    spellings["an unused ISBN, full-width"] = spelled_in(isbn(91), OTHER_ZEROS["full-width"])
    for script, spelling in spellings.items():
        book = {"title": "Same ISBN, other digits", "isbn": spelling, "year": 2000}
        for url, payload in ((f"/authors/{author['id']}/books", book),
                             ("/authors", {"name": f"Digits {script}", "books": [book]})):
            expect_problem(call(shared, "POST", url, json=payload), 422,
                           f"an ISBN written in {script} digits ({spelling!r}): the API takes 13 ASCII digits 0-9. "
                           r"A pattern with \d accepts any Unicode digit, so one ISBN gets a second spelling "
                           "that its unique constraint cannot see: write [0-9]")
    listing = json_of(call(shared, "GET", "/books", params={"author_id": author["id"]}))
    check(listing.get("total") == 1, explain(
        call(shared, "GET", "/books", params={"author_id": author["id"]}),
        "only the ASCII book: every other spelling of its ISBN was refused and stored nothing"))


MAX_INT = 2**31 - 1  # README.md: ids and offsets stay within a PostgreSQL INTEGER
# Integers no column of this service can hold: past 32 bits, around 2**53 (where floats stop
# being exact), at and past SQLite's 64 bits, far past anything, and negative ones.
HUGE = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), -(2**63) - 1, -(10**30)]


@pytest.mark.task("constraints")
@pytest.mark.promise("P10", "P12")
def test_integers_out_of_range_are_422_everywhere(shared):
    author = create_author(shared, {"name": "Range Checker"})
    book = {"title": "Huge", "isbn": isbn(70), "year": 2000}
    # Every integer the API takes, with the request that carries it.
    places = {
        "GET /authors/{n}": lambda n: ("GET", f"/authors/{n}", {}),
        "POST /authors/{n}/books": lambda n: ("POST", f"/authors/{n}/books", {"json": book}),
        "GET /books?author_id=n": lambda n: ("GET", "/books", {"params": {"author_id": n}}),
        "GET /books?offset=n": lambda n: ("GET", "/books", {"params": {"offset": n}}),
        "GET /books?limit=n": lambda n: ("GET", "/books", {"params": {"limit": n}}),
        "POST /authors/{id}/books with year n": lambda n: (
            "POST", f"/authors/{author['id']}/books", {"json": book | {"year": n}}),
        "POST /authors with a book of year n": lambda n: (
            "POST", "/authors", {"json": {"name": f"Year {n}", "books": [book | {"year": n}]}}),
    }
    for place, build in places.items():
        for number in HUGE:
            method, url, kwargs = build(number)
            response = call(shared, method, url, **kwargs)
            check(response.status_code == 422, explain(
                response,
                f"422 for {place} with n = {number}: no column can hold it (ids and offsets go up to "
                f"2**31 - 1 = {MAX_INT}). Bound every integer where FastAPI reads it: "
                "Path(ge=1, le=...), Query(ge=0, le=...), Field(ge=..., le=...). Unbounded, it reaches "
                "the database driver, which fails with OverflowError (a 500)."))
    for place, number in (("GET /authors/{n}", 0), ("GET /authors/{n}", -1), ("GET /books?author_id=n", 0)):
        method, url, kwargs = places[place](number)
        response = call(shared, method, url, **kwargs)
        check(response.status_code == 422, explain(response, f"422 for {place} with n = {number}: ids start at 1"))
    # The largest allowed values are allowed: they name nothing, and say so.
    response = call(shared, "GET", f"/authors/{MAX_INT}")
    expect_problem(response, 404, f"author {MAX_INT} (2**31 - 1) is a valid id that names nobody")
    response = call(shared, "POST", f"/authors/{MAX_INT}/books", json=book)
    expect_problem(response, 404, f"author {MAX_INT} (2**31 - 1) is a valid id that names nobody")
    response = call(shared, "GET", "/books", params={"offset": MAX_INT})
    expect_json(response, {"items": [], "offset": MAX_INT}, f"offset {MAX_INT} (2**31 - 1) is allowed: a page past the end is empty")


# --- pagination ---------------------------------------------------------------------------------

TITLES = ["Kindred", "Dawn", "Parable of the Sower", "Dawn", "Bloodchild", "Fledgling", "Dawn"]


def shelf_of(client: TestClient | SharedApp) -> list[dict[str, Any]]:
    """Seven books by two authors, added out of title order, with one title three times."""
    butler = create_author(client, {"name": "Octavia E. Butler"})
    other = create_author(client, {"name": "Another Author"})
    return [add_book(client, (butler if n % 3 else other)["id"], title, isbn(100 + n), 1980 + n)
            for n, title in enumerate(TITLES)]


def stocked(shelf: SharedApp) -> list[dict[str, Any]]:
    """The shelf's books, put on it by the first test that asks (both tests only read them)."""
    if shelf.books is None and not shelf.stock_error:
        try:
            shelf.books = shelf_of(shelf)
        except BaseException as failure:  # a failed check, or an error in this test's own reading
            failed = isinstance(failure, pytest.fail.Exception)
            shelf.stock_error = str(failure) if failed else f"\ngot:      {type(failure).__name__}: {failure}"
            raise
    if shelf.books is None:
        pytest.fail(f"\nwhile adding the seven books of the shelf:{shelf.stock_error}", pytrace=False)
    return shelf.books


def expected_order(books: list[dict[str, Any]]) -> list[int]:
    return [book["id"] for book in sorted(books, key=lambda book: (book["title"], book["id"]))]


@pytest.mark.task("pagination")
@pytest.mark.promise("P8")
def test_pages_follow_a_stable_title_then_id_order(shelved):
    books, client = stocked(shelved), shelved
    seen: list[int] = []
    for offset in (0, 3, 6):
        response = call(client, "GET", "/books", params={"offset": offset, "limit": 3})
        body = expect_json(response, {"total": 7, "offset": offset, "limit": 3})
        items = body.get("items")
        check(isinstance(items, list) and all(isinstance(item, dict) for item in items), explain(
            response, '{"items": [...], "total": 7, "offset": ..., "limit": 3}'))
        seen += [item.get("id") for item in items]
    want = expected_order(books)
    check(seen == want, (
        f"\nsent:     GET /books?offset=0&limit=3, then offset=3 and offset=6\n"
        f"expected: book ids {want} across the pages: ordered by title, equal titles by id, each book once\n"
        f"got:      {seen}"))


@pytest.mark.task("pagination")
@pytest.mark.promise("P8")
def test_the_default_page_and_the_author_filter(shelved):
    books, client = stocked(shelved), shelved
    response = call(client, "GET", "/books")
    body = expect_json(response, {"total": 7, "offset": 0, "limit": 20}, "offset defaults to 0, limit to 20")
    check(len(body.get("items", [])) == 7, explain(response, "all 7 books on the first page"))
    author_id = books[1]["author_id"]
    mine = [book for book in books if book["author_id"] == author_id]
    response = call(client, "GET", "/books", params={"author_id": author_id})
    body = expect_json(response, {"total": len(mine)}, f"only the {len(mine)} books of author {author_id}")
    got = [item.get("id") for item in body.get("items", [])]
    check(got == expected_order(mine), explain(response, f"the ids {expected_order(mine)}, in title order"))


@pytest.mark.task("pagination")
@pytest.mark.promise("P8")
def test_an_author_filter_that_names_nobody_is_an_empty_page(shelved):
    books, client = stocked(shelved), shelved
    nobody = max(book["author_id"] for book in books) + 1000
    for author_id in (nobody, MAX_INT):
        response = call(client, "GET", "/books", params={"author_id": author_id, "limit": 5})
        expect_status(response, 200, f"no author has the id {author_id}: a filter that matches nothing is not an error")
        expect_json(response, {"items": [], "total": 0, "offset": 0, "limit": 5},
                    "an empty page: no items, a total of 0", exact=True)


@pytest.mark.task("pagination")
@pytest.mark.promise("P8", "P10")
def test_page_parameters_are_bounded(shared):
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "many"}):
        expect_status(call(shared, "GET", "/books", params=params), 422, "offset >= 0 and 1 <= limit <= 100")
    for params in ({"limit": 1}, {"limit": 100}):
        response = call(shared, "GET", "/books", params=params)
        expect_json(response, {"offset": 0, **params}, "the bounds themselves are allowed: 1 <= limit <= 100")


# --- index --------------------------------------------------------------------------------------


@pytest.mark.task("index")
@pytest.mark.promise("P15")
def test_finding_the_books_of_an_author_uses_an_index(shared):
    shared.start()  # the tables exist once the app has started
    found = tables(shared.database_file)
    check("books" in found, (
        "\nexpected: once the app has started, a table books in the database DATABASE_URL names"
        f"\ngot:      tables {sorted(found) or 'none'}"))
    query = "SELECT id, title FROM books WHERE author_id = 1"
    with sqlite3.connect(shared.database_file) as connection:
        plan = [row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}")]
    check(any("USING INDEX" in step or "USING COVERING INDEX" in step for step in plan), (
        f"\nasked:    EXPLAIN QUERY PLAN {query}\nexpected: SEARCH books USING INDEX ... (author_id=?)\n"
        f"got:      {plan} — a SCAN reads every row of the table. Give books.author_id an index "
        "(mapped_column(..., index=True)): foreign keys are not indexed by themselves."))


# --- contract -----------------------------------------------------------------------------------

DOCUMENTED = {
    ("get", "/health/db"): {"200", "503"},
    ("post", "/authors"): {"201", "400", "409", "422"},
    ("get", "/authors/{author_id}"): {"200", "404", "422"},
    ("post", "/authors/{author_id}/books"): {"201", "400", "404", "409", "422"},
    ("get", "/books"): {"200", "422"},
}


@pytest.mark.task("contract")
@pytest.mark.promise("P14")
def test_the_openapi_schema_lists_every_status_each_route_answers(shared):
    response = call(shared, "GET", "/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI schema")
    paths = json_of(response).get("paths", {})
    for (method, path), wanted in DOCUMENTED.items():
        operation = paths.get(path, {}).get(method)
        check(operation is not None, explain(response, f"the route {method.upper()} {path} in the schema's paths"))
        documented = operation.get("responses", {})
        missing = sorted(wanted - set(documented))
        check(not missing, (
            f"\nsent:     GET /openapi.json"
            f"\nexpected: {method.upper()} {path} documents every status it answers: {sorted(wanted)}"
            f"\ngot:      {sorted(documented)}; missing {missing}. Declare them on the route: "
            "responses=problem_responses(404, 409) (problems.py, given)"))
        for code in wanted - {"200", "201"}:
            content = documented[code].get("content", {}).get("application/problem+json", {})
            check("schema" in content, (
                f"\nsent:     GET /openapi.json"
                f"\nexpected: {method.upper()} {path}'s {code} answer documents its body as application/problem+json "
                "with a schema (responses=problem_responses(...) on the route; FastAPI(responses=problem_responses(422)) "
                "for every route's 422)"
                f"\ngot:      {documented[code]}"))
        parameters = {parameter.get("name"): parameter.get("schema", {}) for parameter in operation.get("parameters", [])}
        for name in ("author_id", "offset"):
            if name in parameters:
                bounds = parameters[name]
                if "anyOf" in bounds:  # an optional parameter: int | None
                    bounds = next((part for part in bounds["anyOf"] if part.get("type") == "integer"), {})
                check(bounds.get("maximum") == MAX_INT, (
                    f"\nsent:     GET /openapi.json"
                    f"\nexpected: {method.upper()} {path}'s parameter {name} has the maximum {MAX_INT} (le=2**31 - 1)"
                    f"\ngot:      {parameters[name]}"))


@pytest.mark.task("contract")
@pytest.mark.promise("P13")
def test_an_invalid_body_is_422_whatever_it_holds(shared):
    author = create_author(shared, {"name": "Not A Number"})
    for number in ("1e309", "-1e309", "NaN", "Infinity"):
        for url, body in (
            ("/authors", f'{{"name": {number}}}'),
            ("/authors", f'{{"name": "N", "books": [{{"title": "T", "isbn": "{isbn(80)}", "year": {number}}}]}}'),
            (f"/authors/{author['id']}/books", f'{{"title": "T", "isbn": "{isbn(81)}", "year": {number}}}'),
        ):
            response = call(shared, "POST", url, content=body, headers={"Content-Type": "application/json"})
            body = expect_problem(response, 422, "the 422 of an invalid body, whatever the body holds. 1e309 reads as infinity (and NaN as NaN), which JSON cannot write back: FastAPI's default 422 echoes each refused input and so becomes a 500. Call install_problem_details(app) (problems.py, given): its 422 lists the errors without their input")
            errors = body.get("errors")
            check(isinstance(errors, list) and bool(errors) and all(isinstance(e, dict) and "input" not in e for e in errors),
                  explain(response, 'a problem with "errors": [{"type": ..., "loc": [...], "msg": ...}, ...]: where and why, never the refused "input"'))


@pytest.mark.task("contract")
@pytest.mark.promise("P17")
def test_every_error_is_a_problem_even_the_frameworks(shared):
    # The errors no route of yours raises: Starlette's 404 for a path no route has, its 405 for a
    # method the path does not take. A client reads them like every other error.
    response = call(shared, "GET", "/shelves/1")
    expect_problem(response, 404, "no route has this path: the framework's 404 is a problem too "
                   "(install_problem_details(app) from problems.py, given, makes it one)")
    response = call(shared, "DELETE", "/books")
    expect_problem(response, 405, "GET /books exists, DELETE /books does not: a 405 problem")
    allow = {method.strip() for method in response.headers.get("allow", "").split(",") if method.strip()}
    check("GET" in allow and "DELETE" not in allow, explain(
        response, "an Allow header naming the methods the path takes (GET), as every 405 must"))
    response = call(shared, "PUT", "/authors/1")
    expect_problem(response, 405, "GET /authors/{author_id} exists, PUT does not: a 405 problem")


# --- migrations ---------------------------------------------------------------------------------
#
# The Alembic environment (alembic.ini, migrations/) is given: env.py takes the URL from your
# Settings and compares against your Base.metadata. Alembic runs in this process through its
# Python API (alembic.command), with your settings and metadata handed over in Config.attributes.


@pytest.fixture(scope="module")
def migrations_home(target_dir: Path, exercise) -> Path:
    """The folder holding alembic.ini: the graded copy's, or the exercise's where the copy has none."""
    return target_dir if (target_dir / "alembic.ini").is_file() else exercise.folder


def alembic_config(module, home: Path) -> Any:
    from alembic.config import Config

    config = Config(str(home / "alembic.ini"))
    models = importlib.import_module(".models", module.__package__)  # the models app.py itself uses
    config.attributes.update(quiet=True, settings=module.Settings(), metadata=models.Base.metadata)
    return config


def alembic(config: Any, command: str, *args: str) -> None:
    """Run one Alembic command; an error becomes a failure that says which command and why."""
    from alembic import command as commands
    from alembic.util.exc import AutogenerateDiffsDetected

    try:
        getattr(commands, command)(config, *args)
    except AutogenerateDiffsDetected as exc:
        pytest.fail(
            f"\nran:      alembic upgrade head, then alembic check\nexpected: models.py declares the tables the "
            f"migrations create (check finds nothing to generate)\ngot:      {str(exc)[:900]}\n          the models "
            "and the migrated schema disagree: a column, a length, a NOT NULL, a unique rule, a foreign key or an "
            "index differs. Change models.py to match, or write a migration for the change (and review it).",
            pytrace=False)
    except Exception as exc:  # noqa: BLE001 - reported as this test's failure
        pytest.fail(f"\nran:      alembic {command} {' '.join(args)}\nexpected: it succeeds (env.py reads "
                    f"Settings().database_url and models.Base.metadata)\ngot:      {type(exc).__name__}: "
                    f"{str(exc)[:600]}", pytrace=False)


def schema(path: Path) -> dict[str, Any]:
    """What a SQLite file holds: each table's columns (name, declared type, NOT NULL), its indexes."""
    if not path.exists():
        return {}
    with sqlite3.connect(path) as connection:
        names = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {name: {"columns": [(row[1], row[2].upper().replace(" ", ""), bool(row[3]))
                                   for row in connection.execute(f"PRAGMA table_info({name})")],
                       "indexes": sorted(row[1] for row in connection.execute(f"PRAGMA index_list({name})")
                                         if not row[1].startswith("sqlite_autoindex"))}
                for name in names}


@pytest.mark.task("migrations")
@pytest.mark.promise("P16")
def test_alembic_upgrade_head_creates_the_schema_the_models_declare(module, database_file, migrations_home):
    config = alembic_config(module, migrations_home)  # Settings() reads DATABASE_URL: this test's own file
    alembic(config, "upgrade", "head")
    migrated = schema(database_file)
    check({"alembic_version", "authors", "books"} <= set(migrated), (
        f"\nran:      alembic upgrade head on an empty database ({database_file.name}, from Settings().database_url)"
        f"\nexpected: the tables alembic_version, authors and books in it\ngot:      {sorted(migrated) or 'no tables'}"
        + ("; a library.db appeared in the working directory instead: is the URL taken from Settings?"
           if Path("library.db").exists() else "")))
    alembic(config, "check")  # the models and the migrated schema agree
    alembic(config, "downgrade", "base")
    left = set(schema(database_file)) - {"alembic_version"}
    check(not left, (f"\nran:      alembic upgrade head, then alembic downgrade base\nexpected: no table of the "
                     f"service left (downgrade undoes upgrade)\ngot:      {sorted(left)}"))
    alembic(config, "upgrade", "head")
    again = schema(database_file)
    check(again == migrated, (f"\nran:      upgrade head, downgrade base, upgrade head\nexpected: the same schema as "
                              f"after the first upgrade\nfirst:    {migrated}\nthen:     {again}"))


@pytest.mark.task("migrations")
@pytest.mark.promise("P16")
def test_the_app_works_on_a_migrated_database_and_keeps_its_rows(module, database_file, migrations_home):
    config = alembic_config(module, migrations_home)
    alembic(config, "upgrade", "head")
    migrated = schema(database_file)
    for start in ("first", "second"):  # a deploy: migrate, start; later the service restarts
        with TestClient(new_app(module)) as client:
            if start == "first":
                author = create_author(client, URSULA)
                add_book(client, author["id"], "The Left Hand of Darkness", "9780441478125", 1969)
                response = call(client, "POST", f"/authors/{author['id']}/books",
                                json={"title": "Again", "isbn": "9780060512750", "year": 1974})
                expect_status(response, 409, "a repeated ISBN on the migrated database (its unique rule)")
            response = call(client, "GET", f"/authors/{author['id']}")
            expect_status(response, 200, f"reading the author after the {start} start on a migrated database")
            titles = [book.get("title") for book in json_of(response).get("books", [])]
            check(len(titles) == 3, (
                f"\nran:      alembic upgrade head; started the app, created an author with 3 books; restarted it"
                f"\nsent:     GET /authors/{author['id']} after the {start} start\nexpected: the author's 3 books"
                f"\ngot:      {titles}\n          rows written before a restart must still be there: the lifespan "
                "must not drop or recreate tables a migration made"))
    after = schema(database_file)
    check(after == migrated, (f"\nran:      alembic upgrade head, then the app\nexpected: the app leaves the migrated "
                              f"schema as it is\nbefore:   {migrated}\nafter:    {after}"))
    alembic(config, "check")
