"""The notes service that exercise 09 asks you to test. Read it; do not edit it.

A small, finished API:

- notes stored in SQLite (the file comes from `Settings.database_path`);
- an API key (`X-API-Key` header) required on every `/notes` route;
- page-based listing (`?page=1&size=10`, pages start at 1, ordered by id);
- an audit trail written in batches to a JSON-lines file, flushed when the app stops;
- a notification sent in the background after a note is created (`get_notifier`);
- a WebSocket feed of new notes at `/ws/notes?api_key=...`;
- every error a problem (RFC 9457, `application/problem+json`), through the given `problems.py`.

The copies in `variants/` differ from this file in exactly one place each: a bug that
your tests should catch. README.md describes the full interface.
"""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Protocol

import aiosqlite
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    WebSocket,
    WebSocketDisconnect,
    WebSocketException,
    status,
)
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import install_problem_details, problem_responses

logger = logging.getLogger("notes")


class Settings(BaseSettings):
    """Configuration. Every field can also be set with a NOTES_* environment variable."""

    model_config = SettingsConfigDict(env_prefix="NOTES_")

    database_path: Path = Path("notes.db")
    audit_path: Path = Path("audit.jsonl")
    api_key: str = "dev-key-change-me"
    audit_batch_size: int = Field(default=50, ge=1)


# --- API schemas ---------------------------------------------------------------------


class NoteIn(BaseModel):
    title: str = Field(min_length=1, max_length=100)
    body: str = Field(default="", max_length=10_000)
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(default_factory=list, max_length=10)


class Note(NoteIn):
    id: int
    created_at: datetime


class NotePage(BaseModel):
    items: list[Note]
    total: int
    page: int
    size: int


# --- Resources the lifespan opens and closes -------------------------------------------

# SQLite stores integers in 64 bits; a larger id or offset cannot name a row that exists.
SQLITE_INTEGERS = range(-(2**63), 2**63)

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at TEXT NOT NULL
)
"""


def _to_note(row: aiosqlite.Row) -> Note:
    return Note(
        id=row["id"],
        title=row["title"],
        body=row["body"],
        tags=json.loads(row["tags"]),
        created_at=datetime.fromisoformat(row["created_at"]),
    )


class NoteStore:
    """Notes in one SQLite file, through one aiosqlite connection opened by the lifespan.

    Every request shares that connection, and a connection holds one transaction at a time:
    without the lock, one request's commit would also commit another's half-done write, and a
    read could see a write that is not committed yet. Each method holds the lock for its
    statements and their commit, so requests take turns on the connection.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator["NoteStore"]:
        async with aiosqlite.connect(path) as db:
            db.row_factory = aiosqlite.Row
            # WAL with synchronous=NORMAL: a commit no longer waits for the disk (an fsync per
            # commit costs ~25 ms); the database stays consistent even after a crash.
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute(SCHEMA)
            await db.commit()
            yield cls(db)

    async def add(self, note: NoteIn) -> Note:
        created_at = datetime.now(timezone.utc)
        async with self._lock:
            cursor = await self._db.execute(
                "INSERT INTO notes (title, body, tags, created_at) VALUES (?, ?, ?, ?)",
                (note.title, note.body, json.dumps(note.tags), created_at.isoformat()),
            )
            await self._db.commit()
        assert cursor.lastrowid is not None
        return Note(id=cursor.lastrowid, created_at=created_at, **note.model_dump())

    async def get(self, note_id: int) -> Note | None:
        if note_id not in SQLITE_INTEGERS:
            return None
        async with self._lock, self._db.execute("SELECT * FROM notes WHERE id = ?", (note_id,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _to_note(row)

    async def page(self, page: int, size: int) -> list[Note]:
        offset = (page - 1) * size  # pages start at 1
        if offset not in SQLITE_INTEGERS:
            return []  # a page past the end is empty, however far past
        async with self._lock, self._db.execute(
            "SELECT * FROM notes ORDER BY id LIMIT ? OFFSET ?", (size, offset)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_to_note(row) for row in rows]

    async def count(self) -> int:
        async with self._lock, self._db.execute("SELECT COUNT(*) FROM notes") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def delete(self, note_id: int) -> bool:
        if note_id not in SQLITE_INTEGERS:
            return False
        async with self._lock:
            cursor = await self._db.execute("DELETE FROM notes WHERE id = ?", (note_id,))
            await self._db.commit()
        return cursor.rowcount > 0


class AuditLog:
    """Audit records, appended to a JSON-lines file in batches rather than one write per request.

    Records wait in memory until `batch_size` of them have gathered; whatever is still
    waiting when the app stops is written by the lifespan's teardown.
    """

    def __init__(self, path: Path, batch_size: int) -> None:
        self.path = path
        self.batch_size = batch_size
        self._pending: list[dict[str, Any]] = []

    def record(self, action: str, note_id: int) -> None:
        self._pending.append({"action": action, "note_id": note_id, "at": datetime.now(timezone.utc).isoformat()})
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # One short append per batch; small enough not to need a worker thread.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self._pending)
        self._pending.clear()


class Feed:
    """Fans new-note events out to every connected WebSocket, one bounded queue per connection."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in self._queues:
            # A client too slow to keep up misses events instead of slowing the API down.
            with suppress(asyncio.QueueFull):
                queue.put_nowait(event)


# --- Notifications: a dependency that tests replace ---------------------------------------


class Notifier(Protocol):
    async def notify(self, message: str) -> None: ...


class LogNotifier:
    """The default notifier writes to the log; a deployment would send e-mail or chat messages."""

    async def notify(self, message: str) -> None:
        logger.info("notification: %r", message)  # repr: a title's newline cannot forge a log line


def get_notifier() -> Notifier:
    """The notifier used after a note is created. Override it in tests."""
    return LogNotifier()


# --- Dependencies ----------------------------------------------------------------------------


def _key_matches(given: str | None, expected: str) -> bool:
    # compare_digest takes the same time whether the first or the last character differs.
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def require_api_key(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> None:
    if not _key_matches(x_api_key, request.app.state.settings.api_key):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Missing or invalid X-API-Key header",
            headers={"WWW-Authenticate": "ApiKey"},
        )


# The ASGI extension that lets an app answer a WebSocket handshake with an HTTP response of its
# own; uvicorn and Starlette's TestClient offer it, a server that does not leaves it out of the scope.
DENIAL_RESPONSE = "websocket.http.response"


def require_feed_key(websocket: WebSocket, api_key: str | None = None) -> None:
    # Browsers cannot set headers on a WebSocket, so the key travels in the query string.
    if not _key_matches(api_key, websocket.app.state.settings.api_key):
        # Refused before accept(): no socket, no frame. Where the server can send the app's own
        # answer, a 403 problem like every other error (its instance is the path, never the key).
        if DENIAL_RESPONSE in websocket.scope.get("extensions", {}):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Missing or invalid api_key query parameter")
        # Elsewhere, a 1008 close: the server refuses the handshake with its own bodiless 403.
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason="invalid api key")


def get_store(request: Request) -> NoteStore:
    return request.state.store


def get_audit(request: Request) -> AuditLog:
    return request.state.audit


def get_feed(request: Request) -> Feed:
    return request.state.feed


Store = Annotated[NoteStore, Depends(get_store)]
Audit = Annotated[AuditLog, Depends(get_audit)]
NotesFeed = Annotated[Feed, Depends(get_feed)]
NotifierDep = Annotated[Notifier, Depends(get_notifier)]


# --- Routes ----------------------------------------------------------------------------------

# Every error is a problem (problems.py): declared here, so the OpenAPI schema says so.
NOT_FOUND = problem_responses(status.HTTP_404_NOT_FOUND)

router = APIRouter(
    prefix="/notes",
    tags=["notes"],
    dependencies=[Depends(require_api_key)],
    responses=problem_responses(status.HTTP_401_UNAUTHORIZED),
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=problem_responses(status.HTTP_400_BAD_REQUEST),  # a body that is not even UTF-8 text
)
async def create_note(
    note_in: NoteIn,
    response: Response,
    background_tasks: BackgroundTasks,
    store: Store,
    audit: Audit,
    feed: NotesFeed,
    notifier: NotifierDep,
) -> Note:
    note = await store.add(note_in)
    audit.record("created", note.id)
    feed.publish({"type": "created", "note": note.model_dump(mode="json")})
    # Runs after the response is sent: the client does not wait for the notification.
    background_tasks.add_task(notifier.notify, f"New note: {note.title}")
    response.headers["Location"] = f"/notes/{note.id}"
    return note


@router.get("")
async def list_notes(
    store: Store,
    page: Annotated[int, Query(ge=1)] = 1,
    size: Annotated[int, Query(ge=1, le=50)] = 10,
) -> NotePage:
    return NotePage(items=await store.page(page, size), total=await store.count(), page=page, size=size)


@router.get("/{note_id}", responses=NOT_FOUND)
async def read_note(note_id: int, store: Store) -> Note:
    note = await store.get(note_id)
    if note is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"Note {note_id} not found")
    return note


@router.delete("/{note_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_note(note_id: int, store: Store, audit: Audit) -> None:
    if not await store.delete(note_id):
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"Note {note_id} not found")
    audit.record("deleted", note_id)


async def _forward(websocket: WebSocket, queue: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        await websocket.send_json(await queue.get())


async def notes_feed(websocket: WebSocket) -> None:
    await websocket.accept()  # the route's dependency has checked the key before this
    feed: Feed = websocket.state.feed
    store: NoteStore = websocket.state.store
    queue = feed.subscribe()
    forwarder: asyncio.Task[None] | None = None
    try:
        await websocket.send_json({"type": "hello", "notes": await store.count()})
        forwarder = asyncio.create_task(_forward(websocket, queue))
        while True:  # reading is how a server notices that the client went away
            text = await websocket.receive_text()
            with suppress(ValueError):
                if json.loads(text) == {"type": "ping"}:
                    await websocket.send_json({"type": "pong"})
    except WebSocketDisconnect:
        pass
    finally:
        feed.unsubscribe(queue)
        if forwarder is not None:
            forwarder.cancel()


async def health() -> dict[str, str]:
    return {"status": "ok"}


# --- The application factory ------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build a notes service. Each call gives a new app with its own settings and resources."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        audit = AuditLog(settings.audit_path, settings.audit_batch_size)
        async with NoteStore.open(settings.database_path) as store:
            try:
                # Yielded state is copied into every request's `request.state`.
                yield {"store": store, "audit": audit, "feed": Feed()}
            finally:
                audit.flush()  # teardown: nothing recorded may be lost when the app stops

    app = FastAPI(title="Notes", version="1.0.0", lifespan=lifespan, responses=problem_responses(422))
    app.state.settings = settings
    # Every error a problem: the 401, the 404s, FastAPI's 422 (without the refused input: 1e309
    # would make the default one a 500), an unknown path's 404, a wrong method's 405 (with Allow).
    install_problem_details(app)
    app.add_api_route("/health", health, methods=["GET"], tags=["ops"])
    app.include_router(router)
    app.add_api_websocket_route("/ws/notes", notes_feed, dependencies=[Depends(require_feed_key)])
    return app
