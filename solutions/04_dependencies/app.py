"""Lesson 04 reference: a book catalogue wired together with dependencies."""

import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Annotated

from fastapi import APIRouter, Body, Cookie, Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from .problems import ProblemError, install_problem_details, problem_response, problem_responses  # given (lesson 03)

# =========================================================================================
# Given: a fake database with transactions. Nothing below this line needs to change until
# the "Your work" banner; the tests read `app.state.db.log` to see what happened.
# =========================================================================================


class Book(BaseModel):
    id: int
    title: str
    author: str
    added_by: str


class BookIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    author: str = Field(min_length=1, max_length=100)


class User(BaseModel):
    name: str
    role: str


class BookPage(BaseModel):
    items: list[Book]
    search: str | None
    offset: int
    limit: int


class AuthorPage(BaseModel):
    items: list[str]
    search: str | None
    offset: int
    limit: int


class CommitFailed(RuntimeError):
    """The database refused to commit (disk full, lost connection, a deferred constraint)."""


SEED = [
    ("Dune", "Frank Herbert"),
    ("Emma", "Jane Austen"),
    ("Persuasion", "Jane Austen"),
    ("Neuromancer", "William Gibson"),
    ("The Hobbit", "J. R. R. Tolkien"),
    ("Beloved", "Toni Morrison"),
]


@dataclass
class FakeDatabase:
    """An in-memory stand-in for a database server, with a log of every connection event."""

    books: dict[int, Book] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=lambda: {
        "ada": User(name="ada", role="admin"),
        "linus": User(name="linus", role="reader"),
    })
    log: list[str] = field(default_factory=list)  # "open 1", "commit 1", "rollback 1", "close 1"
    fail_next_commit: bool = False  # tests set this to simulate a commit that fails
    _connection_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _book_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _open: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for title, author in SEED:
            book_id = self.next_book_id()
            self.books[book_id] = Book(id=book_id, title=title, author=author, added_by="seed")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def next_book_id(self) -> int:
        return next(self._book_ids)

    def connect(self) -> "Connection":
        connection = Connection(self, next(self._connection_ids))
        self._open.add(connection.id)
        self.log.append(f"open {connection.id}")
        return connection


class Connection:
    """One connection = one transaction. Writes are staged until commit()."""

    def __init__(self, db: FakeDatabase, connection_id: int) -> None:
        self.db, self.id = db, connection_id
        self.closed = False
        self._staged: dict[int, Book] = {}

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"connection {self.id} is closed")

    def books(self) -> list[Book]:
        """Committed books plus the ones this transaction added, ordered by id."""
        self._check_open()
        return sorted([*self.db.books.values(), *self._staged.values()], key=lambda b: b.id)

    def user(self, name: str) -> User | None:
        self._check_open()
        return self.db.users.get(name)

    def add_book(self, data: BookIn, added_by: str) -> Book:
        self._check_open()
        book = Book(id=self.db.next_book_id(), added_by=added_by, **data.model_dump())
        self._staged[book.id] = book
        return book

    def commit(self) -> None:
        self._check_open()
        if self.db.fail_next_commit:
            self.db.fail_next_commit = False
            raise CommitFailed("the database refused the commit")
        self.db.books.update(self._staged)
        self._staged.clear()
        self.db.log.append(f"commit {self.id}")

    def rollback(self) -> None:
        self._check_open()
        self._staged.clear()
        self.db.log.append(f"rollback {self.id}")

    def close(self) -> None:
        if not self.closed:
            self._staged.clear()  # closing without commit discards the transaction
            self.closed = True
            self.db._open.discard(self.id)
            self.db.log.append(f"close {self.id}")


def get_db(request: Request) -> FakeDatabase:
    return request.app.state.db


DatabaseDep = Annotated[FakeDatabase, Depends(get_db)]


@dataclass(frozen=True)
class Settings:
    api_key: str = "dev-key"


def get_settings() -> Settings:
    # A dependency, not a module constant, so that tests can swap it with dependency_overrides.
    return Settings()


SettingsDep = Annotated[Settings, Depends(get_settings)]


# =========================================================================================
# Your work (reference solution)
# =========================================================================================

# The most books one import may carry. The import runs on the event loop, so its work must
# be short whatever the client sends: a bounded list, checked in linear time.
MAX_IMPORT = 5000


# A title that is taken: a problem type of its own (the README names it), so that a client can
# tell it from any other 409.
DUPLICATE_TITLE = "https://course.example/problems/duplicate-title"

# Every status a route can answer is in the OpenAPI schema, as a problem: 401 for a missing or
# unknown user or key, 400 for a body that is not JSON, 409 for a taken title, 503 for a commit
# the database refused.
UNKNOWN_USER = problem_responses(401)
ADMIN_ERRORS = problem_responses(400, 401, 409, 503)

# --- the connection: opened once per request, committed or rolled back, always closed -----


async def get_connection(db: DatabaseDep) -> AsyncIterator[Connection]:
    connection = db.connect()
    try:
        yield connection
        connection.commit()  # only reached when the route (and its response model) succeeded
    except Exception:
        connection.rollback()
        raise  # never swallow: the exception still decides the response
    finally:
        connection.close()


# scope="function": the code after `yield` (the commit) runs before the response is sent, so
# a failed commit becomes an error response instead of a 201 the client already received.
# Every route and sub-dependency uses this one alias, so they share one cached connection.
ConnectionDep = Annotated[Connection, Depends(get_connection, scope="function")]

# --- shared query parameters -------------------------------------------------------------


def search_term(
    q: Annotated[str | None, Query(max_length=50, description="Search text")] = None,
    last_search: Annotated[str | None, Cookie(description="Remembered search")] = None,
) -> str | None:
    """The search from the query string, else the one remembered in the cookie."""
    return q or last_search


@dataclass(frozen=True)
class PageParams:
    search: str | None
    offset: int
    limit: int


def page_params(
    search: Annotated[str | None, Depends(search_term)],
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> PageParams:
    return PageParams(search=search, offset=offset, limit=limit)


PageDep = Annotated[PageParams, Depends(page_params)]


def matches(text: str, search: str | None) -> bool:
    return search is None or search.casefold() in text.casefold()


# --- who is calling ----------------------------------------------------------------------


async def get_current_user(
    connection: ConnectionDep,
    x_user: Annotated[str | None, Header()] = None,
) -> User:
    user = connection.user(x_user) if x_user else None
    if user is None:
        # RFC 9110: a 401 names the credentials it wants, a challenge ("User": the X-User header).
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Unknown or missing X-User",
                            headers={"WWW-Authenticate": "User"})
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def require_api_key(settings: SettingsDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    # compare_digest takes the same time whether the first or the last character differs.
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), settings.api_key.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Missing or invalid API key",
                            headers={"WWW-Authenticate": "ApiKey"})


# --- routes ------------------------------------------------------------------------------

public = APIRouter(tags=["catalogue"])


@public.get("/books", summary="Search the catalogue")
async def list_books(page: PageDep, connection: ConnectionDep) -> BookPage:
    found = [b for b in connection.books() if matches(b.title, page.search) or matches(b.author, page.search)]
    return BookPage(items=found[page.offset : page.offset + page.limit], **asdict(page))


@public.get("/authors", summary="Search the authors")
async def list_authors(page: PageDep, connection: ConnectionDep) -> AuthorPage:
    names = sorted({b.author for b in connection.books() if matches(b.author, page.search)})
    return AuthorPage(items=names[page.offset : page.offset + page.limit], **asdict(page))


@public.get("/me", summary="Who am I", responses=UNKNOWN_USER)
async def read_me(user: CurrentUser) -> User:
    return user


# The API key guards this router only; its value is not needed by the routes, so it goes in
# `dependencies=` rather than in a parameter.
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_api_key)], responses=ADMIN_ERRORS)


def taken_titles(connection: Connection) -> set[str]:
    """Every title in the catalogue, as compared: ignoring case. One pass over the books."""
    return {book.title.casefold() for book in connection.books()}


def conflict() -> ProblemError:
    # The detail does not repeat the title: a problem says what happened, it does not echo input.
    return ProblemError(status.HTTP_409_CONFLICT, "A book with this title (ignoring case) exists.",
                        type=DUPLICATE_TITLE, title="Title taken")


@admin.post("/books", status_code=status.HTTP_201_CREATED, summary="Add a book")
async def add_book(data: BookIn, user: CurrentUser, connection: ConnectionDep) -> Book:
    if data.title.casefold() in taken_titles(connection):
        raise conflict()
    return connection.add_book(data, added_by=user.name)


@admin.post("/books/import", status_code=status.HTTP_201_CREATED, summary="Add many books, all or nothing")
async def import_books(
    batch: Annotated[list[BookIn], Body(max_length=MAX_IMPORT)], user: CurrentUser, connection: ConnectionDep
) -> dict[str, int]:
    # The titles taken, read once into a set: each check is then O(1). Reading the catalogue
    # again for every book would make an import of n books cost n * (catalogue size): seconds
    # of a blocked event loop for a few thousand books.
    taken = taken_titles(connection)
    for data in batch:
        title = data.title.casefold()
        if title in taken:
            # Earlier books of this batch were added: the dependency's rollback discards them.
            raise conflict()
        taken.add(title)  # a later repeat of this title in the same list is a duplicate too
        connection.add_book(data, added_by=user.name)
    return {"imported": len(batch)}


async def on_commit_failed(request: Request, exc: Exception) -> Response:
    return problem_response(request, status.HTTP_503_SERVICE_UNAVAILABLE, "The change could not be saved; try again.")


# problems.py makes every error a problem, FastAPI's 422 included (without the refused input:
# 1e309 reads as infinity, which JSON cannot write back). Its 422 is documented on every route.
app = FastAPI(title="Catalogue", version="4.0.0", responses=problem_responses(422))
app.state.db = FakeDatabase()
install_problem_details(app)
app.add_exception_handler(CommitFailed, on_commit_failed)
app.include_router(public)
app.include_router(admin)
