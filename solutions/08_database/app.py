"""Lesson 08 reference: a library service on SQLAlchemy 2 async, with aiosqlite by default.

Layers: routes (HTTP) -> Library (services.py) -> AsyncSession -> models.py.
The same code runs on PostgreSQL by setting DATABASE_URL=postgresql+asyncpg://...
"""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from .models import Base
from .problems import install_problem_details, problem_response, problem_responses
from .schemas import MAX_INT, AuthorDetail, AuthorIn, BookIn, BookOut, Page
from .services import Conflict, Library, NotFound


class Settings(BaseSettings):
    """Configuration from the environment: DATABASE_URL, DATABASE_LOCK_TIMEOUT, SQL_ECHO."""

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./library.db"
    # Seconds a request waits for a locked database (and for a free connection of the pool)
    # before it gives up with a 503: a busy database slows requests down, boundedly.
    database_lock_timeout: float = Field(default=5.0, gt=0, le=60)
    sql_echo: bool = False


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores FOREIGN KEY clauses unless each connection asks for them.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: commit if the route succeeded, roll back if it raised, always close."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:  # closes the session (and returns its connection) on any exit
        try:
            yield session
        except Exception:
            await session.rollback()
            raise
        else:
            await session.commit()


# scope="function": the code after `yield` (the commit) runs when the route returns, *before*
# the response is sent. A failed commit then becomes an error response, not a lost write
# behind a 201 that was already on its way.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def get_library(session: SessionDep) -> Library:
    return Library(session)


LibraryDep = Annotated[Library, Depends(get_library)]

# Path and query integers with the bounds of an INTEGER column (see schemas.MAX_INT).
AuthorId = Annotated[int, Path(ge=1, le=MAX_INT, description="The author's id")]
AuthorFilter = Annotated[int | None, Query(ge=1, le=MAX_INT, description="Only this author's books")]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]
Limit = Annotated[int, Query(ge=1, le=100)]


# Every status a route can answer is in the OpenAPI schema, each error as a problem
# (application/problem+json). 400: a body FastAPI cannot read at all.
UNREADABLE = problem_responses(400)
NOT_FOUND = problem_responses(404)
CONFLICT = problem_responses(409)
BUSY = problem_responses(503)  # any route that touches the database can find it busy

# SQLite's primary result codes for "someone else holds the lock" (the low byte of an extended
# code such as SQLITE_BUSY_SNAPSHOT). Any other OperationalError (no such table, a disk I/O
# error, a syntax error) is not the load's fault: it stays a 500, a bug to fix.
BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def database_busy(exc: BaseException) -> bool:
    """The database refused because it is busy: the lock or a pooled connection was not free in time."""
    if isinstance(exc, PoolTimeout):  # every connection of the pool stayed checked out for pool_timeout
        return True
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)  # aiosqlite raises sqlite3's errors
    return isinstance(code, int) and code & 0xFF in BUSY_CODES


async def not_found(request: Request, exc: Exception) -> Response:
    # The service layer knows nothing about HTTP; here its exceptions become problems.
    return problem_response(request, status.HTTP_404_NOT_FOUND, str(exc))


async def conflict(request: Request, exc: Exception) -> Response:
    return problem_response(request, status.HTTP_409_CONFLICT, str(exc))


async def busy(request: Request, exc: Exception) -> Response:
    if not database_busy(exc):
        raise exc  # a real bug: on to the 500 handler, which logs its traceback
    # Nothing was written (the session rolled back): the client may send the same request again.
    # A lock is held for milliseconds to seconds; a second is a polite first pause.
    return problem_response(request, status.HTTP_503_SERVICE_UNAVAILABLE, "The database is busy; try again shortly.",
                            headers={"Retry-After": "1"})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine (and its connection pool) lives exactly as long as the application.
        # pool_timeout: how long a request waits for a connection when all are in use (30 s by
        # default); SQLite's timeout: how long a statement waits for another connection's lock.
        engine = create_async_engine(
            settings.database_url, echo=settings.sql_echo, pool_timeout=settings.database_lock_timeout,
            connect_args={"timeout": settings.database_lock_timeout} if settings.database_url.startswith("sqlite") else {},
        )
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
        # create_all is fine for a course and for tests; a deployed service runs Alembic
        # migrations before it starts instead (see the lesson).
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        app.state.engine = engine
        # expire_on_commit=False: objects keep their loaded values after commit, so reading
        # them later does not trigger a refresh query (which async code cannot do implicitly).
        app.state.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
        try:
            yield
        finally:
            await engine.dispose()

    # Every error is a problem (problems.py, given): FastAPI's 422 without the refused input,
    # the 404 of an unknown route, the 405 of a wrong method, a bug's 500.
    # Every route may answer 503 when the database is busy.
    app = FastAPI(title="Library", version="0.8.0", lifespan=lifespan, responses=problem_responses(422) | BUSY)
    install_problem_details(app)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(OperationalError, busy)
    app.add_exception_handler(PoolTimeout, busy)

    @app.get("/health/db")
    async def database_health(library: LibraryDep) -> dict[str, str]:
        try:
            await library.ping()
        except (DBAPIError, OSError) as exc:  # the database is down or unreachable, not a bug here
            if database_busy(exc):
                raise  # busy, not down: the 503 with Retry-After
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "The database is unavailable.") from exc
        return {"database": "ok"}

    @app.post("/authors", status_code=status.HTTP_201_CREATED, responses=UNREADABLE | CONFLICT)
    async def create_author(data: AuthorIn, library: LibraryDep) -> AuthorDetail:
        return AuthorDetail.model_validate(await library.create_author(data))

    @app.get("/authors/{author_id}", responses=NOT_FOUND)
    async def read_author(author_id: AuthorId, library: LibraryDep) -> AuthorDetail:
        return AuthorDetail.model_validate(await library.get_author(author_id))

    @app.post("/authors/{author_id}/books", status_code=status.HTTP_201_CREATED, responses=UNREADABLE | NOT_FOUND | CONFLICT)
    async def add_book(author_id: AuthorId, data: BookIn, library: LibraryDep) -> BookOut:
        return BookOut.model_validate(await library.add_book(author_id, data))

    @app.get("/books")
    async def list_books(
        library: LibraryDep, offset: Offset = 0, limit: Limit = 20, author_id: AuthorFilter = None
    ) -> Page[BookOut]:
        # An author_id that names nobody is a filter that matches nothing: 200 and an empty page.
        books, total = await library.list_books(offset, limit, author_id)
        return Page[BookOut](
            items=[BookOut.model_validate(book) for book in books], total=total, offset=offset, limit=limit
        )

    return app


app = create_app()
