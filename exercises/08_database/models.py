"""Database models: how the data is stored (SQLAlchemy 2 declarative mapping).

Keep these apart from the API schemas in schemas.py: the tables and the JSON may evolve
separately. README.md lists the tables and columns the tests rely on.
"""

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


# TODO: class Author(Base), table "authors":
#   id    - integer primary key
#   name  - text of at most 100 characters, unique (a constraint in the database)
#   books - one-to-many relationship to Book (back_populates="author"), ordered by title, then id
#
# TODO: class Book(Base), table "books":
#   id        - integer primary key
#   title     - text of at most 200 characters
#   isbn      - text of 13 characters, unique
#   year      - integer
#   author_id - foreign key to authors.id, with an index (the books of one author are looked up often)
#   author    - the relationship back to Author
#
# Use the typed style: `id: Mapped[int] = mapped_column(primary_key=True)`.
