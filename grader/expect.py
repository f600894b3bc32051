"""Assertions whose failures teach.

A failed check says what was sent, what was expected, what came back and, when given,
where the lesson explains it. Graded tests use these instead of bare ``assert`` on
responses so that a learner never has to read a traceback to know what went wrong.

    from grader.expect import expect_status, expect_json, explain

    response = client.post("/items", json={"name": "pen"})
    expect_status(response, 201, "creating an item answers 201 Created")
    assert response.headers.get("location") == "/items/1", explain(response, "a Location header /items/1")
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

LIMIT = 600  # characters of a body shown in a message


def _short(text: str, limit: int = LIMIT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " … (cut)"


def _body(content: bytes | str | None, headers: Mapping[str, str] | None = None) -> str:
    if not content:
        return "(no body)"
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError:
            return f"({len(content)} bytes of binary data)"
    return _short(content)


def describe(response: Any) -> str:
    """The request that was sent and the response that came back, bounded in size."""
    lines = []
    request = getattr(response, "request", None)
    if request is not None:
        lines.append(f"sent:     {request.method} {request.url.raw_path.decode('ascii', 'replace')}")
        try:
            content = request.content
        except Exception:  # a streamed body that was never read into memory
            content = b"(a streamed body)"
        if content:
            lines.append(f"          body {_body(content)}")
    lines.append(f"got:      {response.status_code} {_body(response.content)}")
    if response.status_code in (404, 405) and response.content in (b'{"detail":"Not Found"}', b'{"detail":"Method Not Allowed"}'):
        lines.append("          (FastAPI's own answer when no route matches this path and method: is the route defined?)")
    return "\n".join(lines)


def explain(response: Any, expected: str, lesson: str = "") -> str:
    """A message for ``assert …, explain(response, "what should have happened")``."""
    message = f"\n{describe(response)}\nexpected: {expected}"
    if lesson:
        message += f"\nread:     {lesson}"
    return message


def expect_status(response: Any, status: int, why: str = "", lesson: str = "") -> None:
    if response.status_code != status:
        expected = f"status {status}" + (f" ({why})" if why else "")
        pytest.fail(explain(response, expected, lesson), pytrace=False)


def json_of(response: Any, lesson: str = "") -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        pytest.fail(explain(response, "a JSON body", lesson), pytrace=False)


def _subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    return expected == actual


def expect_json(response: Any, expected: Any, why: str = "", lesson: str = "", *, exact: bool = False) -> Any:
    """The body is JSON and contains ``expected`` (every key and value of it; all of it when ``exact``)."""
    body = json_of(response, lesson)
    ok = body == expected if exact else _subset(expected, body)
    if not ok:
        what = "exactly" if exact else "a JSON body containing"
        text = f"{what} {_short(json.dumps(expected, default=str))}" + (f" ({why})" if why else "")
        pytest.fail(explain(response, text, lesson), pytrace=False)
    return body


def expect_header(response: Any, name: str, value: str | None = None, why: str = "", lesson: str = "") -> str:
    actual = response.headers.get(name)
    if actual is None or (value is not None and actual != value):
        wanted = f"a {name} header" + (f" equal to {value!r}" if value is not None else "")
        got_headers = ", ".join(f"{k}: {_short(v, 80)}" for k, v in response.headers.items())
        pytest.fail(
            explain(response, wanted + (f" ({why})" if why else ""), lesson) + f"\nheaders:  {got_headers or '(none)'}",
            pytrace=False,
        )
    return actual


PROBLEM_LESSON = "lesson 3, Errors as problem details (RFC 9457)"


def expect_problem(response: Any, status: int, why: str = "", lesson: str = PROBLEM_LESSON, *, instance: str | None = None,
                   type: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (the course's error contract).

    Checks the status code, the media type ``application/problem+json`` and the members every
    problem has: ``type`` and ``title`` (strings), ``status`` (equal to the response's),
    ``detail`` (a string) and ``instance`` (the path of the request, or ``instance`` when given).
    ``type`` when given must match too (else any string; ``about:blank`` needs the status phrase
    as its title). Returns the body for further checks.
    """
    expect_status(response, status, why, lesson)
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/problem+json":
        pytest.fail(explain(response, f"Content-Type application/problem+json (an error is a problem, not {media_type or 'untyped'})"
                            + (f" ({why})" if why else ""), lesson), pytrace=False)
    body = json_of(response, lesson)
    wrong: list[str] = []
    if not isinstance(body, Mapping):
        wrong.append("the body is a JSON object")
    else:
        for member in ("type", "title", "detail", "instance"):
            if not isinstance(body.get(member), str):
                wrong.append(f"a string member {member!r}")
        if body.get("status") != status or isinstance(body.get("status"), bool):
            wrong.append(f'"status": {status} (the response\'s own status code)')
        if type is not None and body.get("type") != type:
            wrong.append(f'"type": {json.dumps(type)}')
        if body.get("type") == "about:blank":
            from http import HTTPStatus

            if body.get("title") != HTTPStatus(status).phrase:
                wrong.append(f'"title": {json.dumps(HTTPStatus(status).phrase)} (the status phrase, as "about:blank" requires)')
        wanted_instance = instance
        if wanted_instance is None:
            request = getattr(response, "request", None)
            url = getattr(request, "url", None)
            wanted_instance = getattr(url, "path", None)
        if wanted_instance is not None and isinstance(body.get("instance"), str) and body["instance"] != wanted_instance:
            wrong.append(f'"instance": {json.dumps(wanted_instance)} (the path of the request)')
    if wrong:
        pytest.fail(explain(response, "a problem with " + "; ".join(wrong) + (f" ({why})" if why else ""), lesson), pytrace=False)
    return dict(body)


class StartupFailed:
    """Stands in for an app, or its client, that could not be built or started: each test that
    uses it fails and says why.

    A fixture that builds one app for many tests returns this instead of raising, so that a
    broken app fails every such test with ``message`` rather than erroring them all.
    """

    def __init__(self, message: str) -> None:
        self.message = message

    def __getattr__(self, name: str) -> Any:
        pytest.fail(self.message, pytrace=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pytest.fail(self.message, pytrace=False)
