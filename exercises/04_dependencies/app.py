"""Exercise 04: a book catalogue wired together with dependencies.

Read README.md in this folder for the full task. Run `pytest exercises/04_dependencies`
(or `grader check 04`) to see what is still missing.
"""

import itertools
import secrets  # noqa: F401 (you will need it)
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Cookie, Depends, FastAPI, Header, HTTPException, Query, Request, status  # noqa: F401
from pydantic import BaseModel, Field

from .problems import ProblemError, install_problem_details, problem_response, problem_responses  # noqa: F401 (given)

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
# Your work
# =========================================================================================

# The most books one import may carry (a longer list is refused with 422).
MAX_IMPORT = 5000


# Every error is a problem (lesson 03): problems.py is given, the same file in every exercise
# from here on. install_problem_details(app) (below) already turns HTTPException, FastAPI's 422
# and unexpected exceptions into problems; raise ProblemError for a problem with a type.
DUPLICATE_TITLE = "https://course.example/problems/duplicate-title"

# --- the connection: opened once per request, committed or rolled back, always closed -----


async def get_connection(db: DatabaseDep) -> AsyncIterator[Connection]:
    """One connection for the whole request.

    TODO: commit when the request succeeded, roll back (and re-raise) when it failed, and
    close the connection in every case. This naive version does none of that.
    """
    yield db.connect()


# TODO: when should the code after `yield` run: before or after the response is sent?
#       (Depends(..., scope=...)). Use this one alias everywhere the connection is needed.
ConnectionDep = Annotated[Connection, Depends(get_connection)]

# --- shared query parameters -------------------------------------------------------------


def search_term() -> str | None:
    """TODO: the query parameter `q`, or else the cookie `last_search`, or else None."""
    return None


@dataclass(frozen=True)
class PageParams:
    search: str | None
    offset: int
    limit: int


def page_params() -> PageParams:
    """TODO: offset (>= 0, default 0) and limit (1..50, default 10) from the query, and the
    search from the search_term dependency."""
    return PageParams(search=None, offset=0, limit=10)


PageDep = Annotated[PageParams, Depends(page_params)]

# --- who is calling ----------------------------------------------------------------------


async def get_current_user(connection: ConnectionDep) -> User:
    """TODO: read the X-User header, look the user up with connection.user(name), 401 if unknown
    (with the challenge WWW-Authenticate: User)."""
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Not implemented yet")


CurrentUser = Annotated[User, Depends(get_current_user)]


async def require_api_key(settings: SettingsDep) -> None:
    """TODO: 401 unless the X-API-Key header equals settings.api_key (use secrets.compare_digest),
    with the challenge WWW-Authenticate: ApiKey."""


# --- routes ------------------------------------------------------------------------------

# TODO: GET /books and GET /authors (both with PageDep and ConnectionDep), GET /me.
# TODO: an admin router (prefix /admin) guarded by require_api_key, with POST /admin/books
#       and POST /admin/books/import (409 for a title that exists; nothing saved then).
#       The import takes at most MAX_IMPORT books and runs in linear time: read the taken
#       titles once into a set, never the whole catalogue again for each book.
# TODO: a taken title is ProblemError(409, ..., type=DUPLICATE_TITLE, title="Title taken").
# TODO: declare every status each route answers with responses=problem_responses(401, ...).
# TODO: an exception handler that answers a 503 problem for CommitFailed (problem_response).

app = FastAPI(title="Catalogue", version="4.0.0", responses=problem_responses(422))
app.state.db = FakeDatabase()
install_problem_details(app)
