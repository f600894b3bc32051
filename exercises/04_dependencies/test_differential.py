"""Differential tests for exercise 04: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each input belongs to). A failure
shows the shortest sequence of requests found, both answers, and where they differ.
"""

import pytest

from grader import differential


def stored(module) -> dict:
    """What the README promises of the database behind `app.state.db`: the books saved (in id
    order; an id itself is free) and that every connection a request opened was closed."""
    db = module.app.state.db
    return {
        "books saved": [{"title": b.title, "author": b.author, "added_by": b.added_by}
                        for _, b in sorted(db.books.items())],
        "connections left open": db.open_connections,
    }


# How the apps are built and read (the course's tests/test_differential.py uses the same options).
SESSION_OPTIONS = {"state": stored}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
