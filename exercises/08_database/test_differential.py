"""Differential tests for exercise 08: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). Each app,
yours and the reference's, is built as README.md promises, `create_app(Settings())` while
`DATABASE_URL` names a fresh SQLite file of its own, and after every request that writes, the
rows both databases hold are compared too (authors with their books; ids are left free). A
failure shows the shortest sequence of requests found, both answers, and where they differ.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grader import differential


class Databases:
    """Builds each app on a SQLite file of its own and reads back what it stored.

    The files go in ``folder``, or in a new folder in memory where the system offers one (Linux's
    /dev/shm: a commit's fsync costs more than a request), removed when this object goes.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder
        self.numbers = itertools.count(1)

    @property
    def folder(self) -> Path:
        if self._folder is None:
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._folder = Path(tempfile.mkdtemp(prefix="graded-08-diff-", dir=base))
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def app(self, module: Any) -> Any:
        path = self.folder / f"library-{next(self.numbers)}.db"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{path}")
            app = module.create_app(module.Settings())
        module.__graded_database__ = path  # read by rows(), which gets the module
        return app

    @staticmethod
    def rows(module: Any) -> dict:
        """Every author (by name) with their books, as the tables README.md names hold them."""
        path: Path = module.__graded_database__
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            names = dict(connection.execute("SELECT id, name FROM authors"))
            books = connection.execute("SELECT title, isbn, year, author_id FROM books").fetchall()
        stored: dict[str, list] = {name: [] for name in sorted(names.values())}
        for title, isbn, year, author_id in sorted(books, key=lambda row: row[1]):
            stored.setdefault(names.get(author_id, f"(no author with id {author_id})"), []).append(
                {"title": title, "isbn": isbn, "year": year})
        return stored


def options(databases: Databases) -> dict:
    return {"app": databases.app, "state": databases.rows}


# How a differential run builds 08's apps and reads their state (tests/test_differential.py uses it too).
SESSION_OPTIONS = options(Databases())


@pytest.fixture(scope="module")
def session(load, reference, exercise) -> Iterator[differential.Session]:
    databases = Databases()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(databases.folder)  # where a URL that ignores the settings (./library.db) would put its file
        yield differential.session(load, reference, exercise, module="app", **options(databases))


# Connections an app left open (never closed sessions, an engine never disposed of) are reported
# when the garbage collector finds them, in whichever test runs then: test_database.py reports
# the leaks themselves, clearly; here their echoes would only blame the wrong test.
@pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning")
@pytest.mark.filterwarnings("ignore:.*was deleted before being closed:ResourceWarning")
@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
