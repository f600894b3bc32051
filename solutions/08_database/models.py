"""Database models: how the data is stored. The API never sees these classes directly."""

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    # unique=True is a constraint in the database: it holds even when two requests race.
    name: Mapped[str] = mapped_column(String(100), unique=True)

    # lazy="raise": touching author.books without loading it first is a clear error at once,
    # instead of an implicit query (which async code cannot run: MissingGreenlet).
    books: Mapped[list["Book"]] = relationship(
        back_populates="author",
        order_by=lambda: (Book.title, Book.id),
        cascade="all, delete-orphan",
        lazy="raise",
    )


class Book(Base):
    __tablename__ = "books"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    isbn: Mapped[str] = mapped_column(String(13), unique=True)
    year: Mapped[int]
    # index=True: "the books of author N" is the query this table answers most (the author page,
    # the filtered list, selectinload). Neither SQLite nor PostgreSQL indexes a foreign key by itself.
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id", ondelete="CASCADE"), index=True)

    author: Mapped[Author] = relationship(back_populates="books", lazy="raise")
