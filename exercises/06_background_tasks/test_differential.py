"""Differential tests for exercise 06: for the same requests, your app answers as the reference does.

Both apps are built as README.md says the tests build them, create_app(<a fresh outbox folder
that does not exist yet>), and started (the lifespan runs). The requests come from the reference's
OpenAPI document and the `[differential]` table of exercise.toml. Each request is compared once it
has finished, its background tasks included: the answer, and after a signup the messages in both
outboxes. The events are compared through GET /events. A failure shows the shortest sequence of
requests found, both answers, and where they differ.
"""

import json
import shutil
import tempfile
import weakref
from pathlib import Path

import pytest

from grader import differential

OUTBOXES: dict[int, Path] = {}  # id(module) -> the outbox folder of the app built from it


def build(module):
    """create_app(outbox) with a fresh temporary folder, as README.md says the tests call it."""
    root = Path(tempfile.mkdtemp(prefix="grader-06-"))
    outbox = root / "mail" / "outbox"
    app = module.create_app(outbox)
    weakref.finalize(app, shutil.rmtree, root, True)  # the folder goes when the app does
    OUTBOXES[id(module)] = outbox
    return app


def outbox_messages(module) -> dict:
    """The messages README.md promises: `<id>.json` files of the outbox, with their `to` and
    `subject` (the text of `body` is the app's own: only that it is text is compared)."""
    outbox = OUTBOXES[id(module)]
    if not outbox.is_dir():
        return {"(the outbox folder)": "missing"}
    found = {}
    for path in sorted(outbox.glob("*.json")):
        try:
            message = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            found[path.name] = f"(not a JSON message: {type(exc).__name__})"
            continue
        if not isinstance(message, dict):
            found[path.name] = f"(not a JSON object: {message!r})"
            continue
        found[path.name] = {"to": message.get("to"), "subject": message.get("subject"),
                            "body is text": isinstance(message.get("body"), str) and bool(message.get("body"))}
    return found


# How both apps are built and compared (tests/test_differential.py checks the reference with them too).
SESSION_OPTIONS = {"app": build, "state": outbox_messages}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
