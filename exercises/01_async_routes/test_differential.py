"""Differential tests for exercise 01: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each route belongs to). A failure
shows the shortest sequence of requests found, both answers, and where they differ.
"""

import pytest

from grader import differential


def stored_items(module) -> dict:
    """ITEMS, the catalogue the README promises: what each app holds after a request that is not a read."""
    return dict(module.ITEMS)


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, state=stored_items)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
