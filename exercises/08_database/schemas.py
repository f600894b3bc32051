"""API schemas: what clients send and what they get back (Pydantic).

These are not the database models: a schema says what the API accepts and shows.
"""

from pydantic import BaseModel  # noqa: F401 - you will need it

# The largest value of an INTEGER column in PostgreSQL (SQLite's go to 2**63 - 1): the upper
# bound of every id and offset the API accepts.
MAX_INT = 2**31 - 1

# TODO: BookIn   - title (1-200 characters), isbn (13 ASCII digits 0-9), year (1450-2100)
# TODO: AuthorIn - name (1-100 characters), books: a list of BookIn, empty by default
# TODO: BookOut  - id, title, isbn, year, author_id; readable from an ORM object (from_attributes)
# TODO: AuthorOut - id, name; AuthorDetail - AuthorOut plus books: list[BookOut]
# TODO: Page     - a generic page: items: list[T], total, offset, limit
