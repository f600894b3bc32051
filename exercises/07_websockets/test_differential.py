"""Differential tests for exercise 07: the same WebSocket sessions, your app and the reference.

The sessions are scripted in exercise.toml (`[differential.websocket]`): connect with or
without a token, join, say, leave, send personal messages, send bad frames, disconnect and
reconnect. After every step, what each connection observed (accepted or not, every frame, the
close code) is compared with what the same connection observed with the reference solution. A
failure shows the steps played, both observations, and where they first differ.
"""

import pytest

from grader import differential_ws


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential_ws.session(load, reference, exercise, module="app")


@pytest.mark.parametrize("task", differential_ws.tasks(__file__))
def test_plays_like_the_reference(session, task):
    session.check(task)
