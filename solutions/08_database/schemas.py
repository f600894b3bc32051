"""API schemas: what clients send and receive. They change with the API, not with the tables."""

from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

# The largest value of an INTEGER column in PostgreSQL, where this service may run too (SQLite's
# go to 2**63 - 1). An id or an offset past it cannot name a row, and sent to the database
# it fails inside the driver (OverflowError, a 500): refuse it at the edge with a 422.
MAX_INT = 2**31 - 1


class BookIn(BaseModel):
    title: Annotated[str, Field(min_length=1, max_length=200)]
    # [0-9], not \d: \d is any Unicode digit (９, ٩, ९), and the same ISBN spelled in another script
    # would be a second string that the unique constraint lets through.
    isbn: Annotated[str, Field(pattern=r"^[0-9]{13}$", description="ISBN-13: 13 ASCII digits 0-9")]
    year: Annotated[int, Field(ge=1450, le=2100)]


class AuthorIn(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    books: Annotated[list[BookIn], Field(max_length=50)] = []


class BookOut(BaseModel):
    # from_attributes: read the fields from an ORM object's attributes, not from a dict.
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    isbn: str
    year: int
    author_id: int


class AuthorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str


class AuthorDetail(AuthorOut):
    books: list[BookOut]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    offset: int
    limit: int
