"""Differential tests for exercise 14: for the same requests, your app answers as the reference does.

The requests come from the reference's OpenAPI document and the `[differential]` table of
exercise.toml (which says what is compared and which task each route belongs to). A failure
shows the shortest sequence of requests found, both answers, and where they differ.
"""

import pytest

from grader import differential


# How the apps are built (the course's tests/test_differential.py builds the reference's the same way):
# each module's `app`, its lifespan started.
SESSION_OPTIONS: dict = {}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
