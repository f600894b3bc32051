"""The service layer: the application's operations, written against an AsyncSession.

Routes call these methods and turn their answers (and exceptions) into HTTP. This module
knows nothing about HTTP; it flushes so the database checks its constraints, and leaves
commit and rollback to the owner of the session (the request's session dependency).
"""

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


class NotFound(Exception):
    """The thing asked for does not exist (the API answers 404)."""


class Conflict(Exception):
    """The change would break a uniqueness rule (the API answers 409)."""


class Library:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def ping(self) -> bool:
        """Run SELECT 1 (raw SQL goes through sqlalchemy.text)."""
        raise NotImplementedError("TODO")

    async def create_author(self, data: Any) -> Any:
        """Add the author with their books in one flush; a unique clash raises Conflict."""
        raise NotImplementedError("TODO")

    async def get_author(self, author_id: int) -> Any:
        """The author with their books loaded (selectinload), or NotFound."""
        raise NotImplementedError("TODO")

    async def add_book(self, author_id: int, data: Any) -> Any:
        """NotFound for a missing author; Conflict for a taken ISBN."""
        raise NotImplementedError("TODO")

    async def list_books(self, offset: int, limit: int, author_id: int | None = None) -> tuple[list[Any], int]:
        """One page of books in a stable order (title, then id), and the total count."""
        raise NotImplementedError("TODO")
