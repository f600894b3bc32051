"""Fuzz an app's OpenAPI contract with schemathesis, in process, and say plainly what broke.

An app's OpenAPI schema is a promise to every client: these requests are valid, these status
codes can come back, and each response body has this shape. ``fuzz`` asks schemathesis to
derive requests from the schema (valid ones, and invalid ones that the app must refuse
cleanly), sends each to the app in this process, and checks every answer against the same
schema:

- ``not_a_server_error``: no input, valid or not, makes the server fail (5xx);
- ``status_code_conformance``: only status codes the schema documents come back;
- ``content_type_conformance``: the body has a documented media type;
- ``response_schema_conformance``: the body matches the documented response model.

Hypothesis drives the search, derandomized (the same requests on every run), with a bounded
number of examples per operation and no example database, then shrinks each failure to a
small request. Every kind of failure seen (a check and a status code, or an exception the app
raised) is kept with the smallest request that showed it, so one run lists all of them.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import requests
from asgi_lifespan import LifespanManager
from hypothesis import strategies as st
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.python.asgi import get_client, shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CHECK_NAMES = frozenset(check.__name__ for check in CHECKS)
# A request still unanswered after this long is reported as hanging. Only a hang: on a loaded
# machine an in-process request can take a second or more.
REQUEST_TIMEOUT = 60.0
BODY_SHOWN = 300  # characters of a response body quoted in a finding
DETAIL_LINES = 12  # lines of a check's explanation (a schema violation quotes the schema)


@dataclass(frozen=True)
class Target:
    """One application to fuzz.

    ``auth``: headers a signed-in client sends to every operation (an API key, a user name).
    ``credentials``: headers for the operations whose ``security`` names a scheme, by scheme
    name (``{"OAuth2PasswordBearer": {"Authorization": "Bearer ..."}}``), so each operation
    gets the credential its schema asks for.
    ``pinned``: for some operations, parameters that valid requests keep fixed, by operation
    label (``"GET /wait"``); invalid requests still vary them.
    ``secrets``: values (tokens) shown as ``<token>`` in findings.
    """

    name: str
    app: Any
    auth: Mapping[str, str] = field(default_factory=dict)
    credentials: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pinned: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    def headers_for(self, operation: Any) -> dict[str, str]:
        """What a signed-in client sends to this operation: ``auth``, plus its scheme's credential."""
        headers = dict(self.auth)
        for requirement in operation.definition.raw.get("security", []):
            for scheme in requirement:
                headers.update(self.credentials.get(scheme, {}))
        return headers


@dataclass(frozen=True)
class Finding:
    """One broken promise, shown with the smallest request that broke it."""

    target: str
    operation: str
    check: str
    status: int | None
    detail: str
    request: str
    response: str

    def render(self) -> str:
        where = f"{self.target}: " if self.target else ""
        status = f" (status {self.status})" if self.status is not None else ""
        lines = self.detail.strip().splitlines()
        if len(lines) > DETAIL_LINES:
            lines = [*lines[:DETAIL_LINES], "…"]
        detail = "\n".join("      " + line for line in lines)
        return (
            f"- {where}{self.operation}: {self.check}{status}\n"
            f"      request:  {self.request}\n"
            f"      response: {self.response}\n"
            f"{detail}"
        )


class ContractBroken(AssertionError):
    """Raised inside the Hypothesis test, so that it shrinks the request; the findings are kept aside."""


@dataclass
class _Recorder:
    """The smallest failing request seen for each kind of failure of one operation."""

    target: Target
    operation: str
    findings: dict[tuple[str, int | None], tuple[tuple[int, str], Finding]] = field(default_factory=dict)
    calls: int = 0

    def keep(self, check: str, status: int | None, detail: Callable[[], str], request: str, response: str) -> None:
        """Keep this failure if it is the first of its kind or shown by a smaller request."""
        for secret in self.target.secrets:
            request = request.replace(secret, "<token>")
        size = (len(request), request)  # shorter first; of equal length, 9223... before 9387...
        key = (check, status)
        if key not in self.findings or size < self.findings[key][0]:
            finding = Finding(self.target.name, self.operation, check, status, detail(), request, response)
            self.findings[key] = (size, finding)


def _describe_response(response: Any) -> str:
    body = response.text if hasattr(response, "text") else ""
    body = " ".join(body.split())
    if len(body) > BODY_SHOWN:
        body = body[:BODY_SHOWN] + "…"
    return f"{response.status_code} {body}".rstrip()


def _where_raised(error: BaseException) -> str:
    """The deepest frame of the traceback that is not in a library: where the app failed."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if "site-packages" not in frame.filename and "/lib/python" not in frame.filename]
    frame = (own or frames)[-1] if (own or frames) else None
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}" if frame else "?"


def _examine(case: Any, client: Any, recorder: _Recorder) -> None:
    """Send one request and check the answer; record and raise what is broken."""
    recorder.calls += 1
    request = case.as_curl_command()
    try:
        response = case.call(session=client, timeout=REQUEST_TIMEOUT)
    except requests.exceptions.Timeout:
        recorder.keep("no answer", None, lambda: f"no response within {REQUEST_TIMEOUT:g} s", request, "(none)")
        raise ContractBroken("timeout") from None
    except Exception as error:  # noqa: BLE001 - the app raised: a client gets a 500 and nothing useful
        recorder.keep(
            f"not_a_server_error (raised {type(error).__name__})", 500,
            lambda: f"the app raised {type(error).__name__}: {error}\nat {_where_raised(error)}",
            request, "500 (exception)",
        )
        raise ContractBroken(type(error).__name__) from None
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            # A kind of failure may belong to several checks; name the one of ours that ran.
            check = next((name for name in failure.checks if name in CHECK_NAMES), failure.title)
            recorder.keep(
                check, response.status_code,
                lambda failure=failure: f"{failure.title}\n{failure.message}".strip(),
                request, _describe_response(response),
            )
        raise ContractBroken(group.message) from None


def _ended_by_findings(error: BaseException, *, over_budget: bool) -> bool:
    """True when Hypothesis ended with our own findings, one or several.

    At the end Hypothesis replays the smallest failure of each kind; past the budget the
    replay is refused, which Hypothesis reports as flaky. Anything else is a real error.
    """
    if isinstance(error, ContractBroken):
        return True
    if isinstance(error, hypothesis.errors.Flaky) and over_budget:
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(_ended_by_findings(inner, over_budget=over_budget) for inner in error.exceptions)
    return False


# Requests one search may draw, in multiples of its max_examples. Generation takes one or two
# multiples; the rest is for shrinking, which otherwise takes several hundred requests per
# failure (to turn 9387469792572604416 into 9223372036854775808). It also ends a search whose
# draws schemathesis keeps rejecting (an invalid value for a parameter that takes any string)
# after a few dozen attempts instead of Hypothesis' 458. Past the budget the search stops and
# keeps the smallest request each failure has shown so far.
DRAW_BUDGET = 6


def _search(strategy: Any, settings: hypothesis.settings, client: Any, recorder: _Recorder) -> None:
    """One Hypothesis search: draw requests from ``strategy``, send each, shrink what fails."""
    budget = DRAW_BUDGET * settings.max_examples
    drawn = 0

    @st.composite
    def budgeted(draw: st.DrawFn) -> Any:
        nonlocal drawn
        drawn += 1
        if drawn > budget:
            hypothesis.reject()  # nothing is drawn or sent; Hypothesis soon stops asking
        return draw(strategy)

    @settings
    @hypothesis.given(case=budgeted())
    def contract_holds(case: Any) -> None:
        _examine(case, client, recorder)

    try:
        contract_holds()
    except BaseException as error:
        if not _ended_by_findings(error, over_budget=drawn > budget):
            raise


def fuzz_operation(operation: Any, target: Target, client: Any,
                   settings: hypothesis.settings) -> tuple[list[Finding], int]:
    """Fuzz one operation; its findings (one per kind of failure) and the number of calls made.

    Three searches: valid requests of a signed-in client, the same without credentials (when
    the operation takes any), and invalid requests of a signed-in client, which must be
    refused with a documented 4xx.
    """
    recorder = _Recorder(target, operation.label)
    auth = target.headers_for(operation) or None
    pinned = dict(target.pinned.get(operation.label, {}))
    pinned_headers = pinned.pop("headers", {})  # kept beside the credentials, never instead of them
    signed_in = {**(auth or {}), **pinned_headers} or None
    _search(operation.as_strategy(GenerationMode.POSITIVE, headers=signed_in, **pinned), settings, client, recorder)
    if auth:
        # Without credentials the answer is a refusal, which hardly depends on the rest of the
        # request: a third of the budget finds an undocumented 401 as surely.
        anonymous = hypothesis.settings(settings, max_examples=max(1, settings.max_examples // 3))
        _search(operation.as_strategy(GenerationMode.POSITIVE, headers=pinned_headers or None, **pinned),
                anonymous, client, recorder)
    # Some operations leave nothing to get wrong that a schema can express (every parameter
    # takes any string): schemathesis then rejects every invalid request it draws. Hypothesis
    # would call that a failed health check, then find nothing to run; both only mean that
    # there is no invalid request to send.
    lenient = hypothesis.settings(settings, suppress_health_check=[hypothesis.HealthCheck.filter_too_much])
    try:
        _search(operation.as_strategy(GenerationMode.NEGATIVE, headers=auth), lenient, client, recorder)
    except hypothesis.errors.Unsatisfiable:
        pass
    return [finding for _, finding in recorder.findings.values()], recorder.calls


class Upstream(httpx.AsyncBaseTransport):
    """A service that another one calls, running in this process: the httpx transport to it.

    The caller gets the transport when it is built; the service behind it starts later, with
    the caller's own lifespan (see ``with_upstreams``), and its lifespan state reaches every
    request, as under a real server.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._transport: httpx.ASGITransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            raise httpx.ConnectError(f"{request.url.host} is not running", request=request)
        return await self._transport.handle_async_request(request)


def with_upstreams(app: Any, *upstreams: Upstream) -> Any:
    """``app``, whose lifespan first starts the services it calls (in order) and stops them after it."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        async with AsyncExitStack() as stack:
            for upstream in upstreams:
                manager = await stack.enter_async_context(LifespanManager(upstream.app))
                upstream._transport = httpx.ASGITransport(app=manager.app)
                stack.callback(setattr, upstream, "_transport", None)
            await app(scope, receive, send)

    return wrapped


# Numbers at the edges of what a 64-bit column, a C long or a double can hold. A route that
# passes a number on to SQLite, or multiplies it, fails there first. Schemathesis mixes them
# into one in five integer and number parameters (path, query, header, cookie) of the valid
# requests where the schema allows them, and of the invalid ones where it does not.
EDGES = [2**63, -(2**63) - 1, 2**64, 2**31, -1, 0, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324]

# An explicit configuration, so that no schemathesis.toml found on the way changes the run.
# Sanitization off: it hides any field whose name merely contains a marker ("author" holds
# "auth"), which makes a request unreadable; the tokens a target sends are hidden by ``keep``.
CONFIG = schemathesis.Config.from_dict({
    "output": {"sanitization": {"enabled": False}},
    "dictionaries": {"edges": {"values": EDGES}},
    "generation": {"dictionaries": {
        "integer": {"dictionary": "edges", "probability": 0.2},
        "number": {"dictionary": "edges", "probability": 0.2},
    }},
})


def load_schema(app: Any) -> Any:
    """The app's schema as schemathesis reads it from /openapi.json (the app's lifespan starts here)."""
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


def fuzz(target: Target, settings: hypothesis.settings,
         on_operation: Callable[[str, int], None] | None = None) -> list[Finding]:
    """Fuzz every operation of the target's schema; its lifespan runs until ``stop_apps()``."""
    schema = load_schema(target.app)
    # One client for the whole run. trust_env=False: requests would otherwise read the proxy
    # settings from the environment again for every request, for a call that never leaves
    # this process.
    client = get_client(target.app)
    client.trust_env = False
    findings: list[Finding] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        found, calls = fuzz_operation(operation, target, client, settings)
        findings.extend(found)
        if on_operation is not None:
            on_operation(operation.label, calls)
    client.close()
    return findings


def stop_apps() -> None:
    """Run the shutdown of every app whose lifespan schemathesis started."""
    shutdown_lifespans()


def report(findings: list[Finding]) -> str:
    lines = [f"{len(findings)} broken promise(s) of the OpenAPI contract:"]
    lines += [finding.render() for finding in findings]
    return "\n".join(lines)
