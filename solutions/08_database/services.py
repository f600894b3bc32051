"""The service layer: the application's operations, written against a session.

Routes translate HTTP into calls to this class and its answers (or errors) back into HTTP;
this class knows nothing about HTTP. It flushes, so that the database checks constraints
now, and leaves commit and rollback to whoever owns the session (the request).
"""

from collections.abc import Sequence

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from .models import Author, Book
from .schemas import AuthorIn, BookIn


class NotFound(Exception):
    """The thing asked for does not exist."""


class Conflict(Exception):
    """The change would break a uniqueness rule."""


class Library:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def ping(self) -> bool:
        return (await self.session.execute(text("SELECT 1"))).scalar_one() == 1

    async def create_author(self, data: AuthorIn) -> Author:
        # One unit of work: the author and the books arrive together or not at all.
        author = Author(name=data.name, books=[Book(**book.model_dump()) for book in data.books])
        self.session.add(author)
        await self._flush("An author with this name, or a book with one of these ISBNs, exists already.")
        return author

    async def get_author(self, author_id: int) -> Author:
        # selectinload: the books come in a second SELECT ... WHERE author_id IN (...), now,
        # while we are in async code. A lazy load later would need I/O we cannot await.
        statement = select(Author).where(Author.id == author_id).options(selectinload(Author.books))
        author = (await self.session.scalars(statement)).one_or_none()
        if author is None:
            raise NotFound(f"No author has the id {author_id}.")
        return author

    async def add_book(self, author_id: int, data: BookIn) -> Book:
        if await self.session.get(Author, author_id) is None:
            raise NotFound(f"No author has the id {author_id}.")
        book = Book(author_id=author_id, **data.model_dump())
        self.session.add(book)
        await self._flush("A book with this ISBN exists already.")
        return book

    async def list_books(self, offset: int, limit: int, author_id: int | None = None) -> tuple[Sequence[Book], int]:
        query = select(Book)
        if author_id is not None:
            query = query.where(Book.author_id == author_id)
        total = await self.session.scalar(select(func.count()).select_from(query.subquery()))
        # A total order: title alone is not unique, and rows with equal titles could swap places
        # between two page requests. The primary key breaks every tie.
        page = await self.session.scalars(query.order_by(Book.title, Book.id).offset(offset).limit(limit))
        return page.all(), total or 0

    async def _flush(self, conflict: str) -> None:
        # The database is the only reliable judge of uniqueness: a SELECT-then-INSERT check
        # races with a concurrent request. Ask it, and translate its answer.
        try:
            await self.session.flush()
        except IntegrityError as exc:
            raise Conflict(conflict) from exc
