"""The course's error contract (docs/AUTHORING.md, "The error contract and the request ID"):
every service of every solution from exercise 03 on answers its errors as RFC 9457 problems.

For each service: an unknown route (404), a wrong method on a route that exists (405, with an
`Allow` header naming the path's methods and not the one sent) and an invalid input to a route
that takes one (422, with `errors` of `loc`, `msg` and `type` and never the refused `input`).
Each answer is `application/problem+json` with `type`, `title`, `status` (the response's),
`detail` and `instance` (the path sent, without its query string).

Apps are called in process (Starlette's TestClient). A service whose startup needs a broker or
another service (11, 15) is called without its lifespan: routing and validation, which is all
these three requests reach, need none. Every `problems.py` in exercises/ and solutions/ is the
given file of exercise 04, byte for byte.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from grader.loader import load_module

from .conftest import ROOT

ORIGINAL = ROOT / "exercises" / "04_dependencies" / "problems.py"
PROBLEM_JSON = "application/problem+json"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Service:
    exercise: str
    module: str  # the file, as load_module names it ("app", "microshop/users")
    build: str | Callable[[Any, Path], Any] = "app"  # an attribute ("create_app()" calls it), or build(module, tmp_path)
    folder: str = "solutions"  # where the service is: a solution, or (09) the service the exercise gives
    lifespan: bool = True  # False: its startup needs a broker or another service; these requests need neither
    headers: Callable[[Any], dict[str, str]] | None = None  # credentials, so that a guard lets the 422 through

    @property
    def id(self) -> str:
        return f"{self.exercise}-{self.module.replace('/', '.')}"


SUITES: dict[str, Any] = {}  # kept for the whole run: 08's suite removes its databases' folder when it goes


def differential_build(exercise: str) -> Callable[[Any, Path], Any]:
    """The app as the exercise's own differential suite builds it (its SESSION_OPTIONS["app"])."""

    def build(module: Any, tmp_path: Path) -> Any:
        if exercise not in SUITES:
            path = ROOT / "exercises" / exercise / "test_differential.py"
            spec = importlib.util.spec_from_file_location(f"_error_contract_{exercise}", path)
            assert spec is not None and spec.loader is not None
            SUITES[exercise] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(SUITES[exercise])
        how = getattr(SUITES[exercise], "SESSION_OPTIONS", {}).get("app", "app")
        if callable(how):
            return how(module)
        app = getattr(module, how.removesuffix("()"))
        return app() if how.endswith("()") else app

    return build


def graded_suite(exercise: str, name: str) -> Any:
    """An exercise's graded test module, imported once per run (its builders and credentials)."""
    key = f"{exercise}/{name}"
    if key not in SUITES:
        spec = importlib.util.spec_from_file_location(f"_error_contract_{exercise}_{name}", ROOT / "exercises" / exercise / name)
        assert spec is not None and spec.loader is not None
        SUITES[key] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(SUITES[key])
    return SUITES[key]


def capstone(service: str) -> Callable[[Any, Path], Any]:
    """A capstone service as its graded suite builds it (test_capstone.build_app: its own SQLite
    file, the signing key, the service credentials)."""

    def build(module: Any, tmp_path: Path) -> Any:
        suite = graded_suite("15_capstone", "test_capstone.py")
        if service == "orders":  # it verifies tokens with the users service's public keys: the suite's stand-in serves them
            return module.create_app(module.Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'orders.db'}",
                                                     client_secret=suite.ORDERS_SECRET, users_url="http://users",
                                                     outbox_interval=0, nats_url=suite.nats_url()),
                                     users_transport=suite.JwksHost())
        return suite.build_app(lambda name: load_module(ROOT / "solutions" / "15_capstone", name), tmp_path, service)

    return build


def capstone_admin(module: Any) -> dict[str, str]:
    """An admin's Authorization header, as the capstone's graded suite mints it."""
    return graded_suite("15_capstone", "test_capstone.py").admin_headers()


SERVICES = [
    Service("03_rest_resources", "app", "create_app()"),
    Service("04_dependencies", "app"),
    Service("05_auth", "app", differential_build("05_auth")),
    Service("06_background_tasks", "app", differential_build("06_background_tasks")),
    Service("07_websockets", "app"),
    Service("08_database", "app", differential_build("08_database")),
    Service("09_testing", "service", "create_app()", folder="exercises",
            headers=lambda module: {"X-API-Key": module.Settings().api_key}),
    Service("10_service_communication", "gateway", "create_app()"),
    Service("10_service_communication", "inventory", "create_app()"),
    Service("10_service_communication", "orders", "create_app()", lifespan=False),
    Service("11_messaging", "orders", "create_app()", lifespan=False),
    Service("11_messaging", "shipping", "create_app()", lifespan=False),
    Service("12_observability", "app", differential_build("12_observability")),
    Service("13_hardening", "app", "create_app()"),
    Service("14_deployment", "app", differential_build("14_deployment")),
    Service("15_capstone", "microshop/users", capstone("users")),
    Service("15_capstone", "microshop/catalog", capstone("catalog"), headers=capstone_admin),
    Service("15_capstone", "microshop/orders", capstone("orders"), headers=capstone_admin),
    Service("15_capstone", "microshop/gateway", capstone("gateway")),
]


@pytest.fixture(params=SERVICES, ids=lambda service: service.id)
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[TestClient]:
    service: Service = request.param
    monkeypatch.chdir(tmp_path)  # a service that writes files (an outbox, a SQLite database) writes them here
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'contract.db'}")
    module = load_module(ROOT / service.folder / service.exercise, service.module)
    if callable(service.build):
        app = service.build(module, tmp_path)
    else:
        app = getattr(module, service.build.removesuffix("()"))
        app = app() if service.build.endswith("()") else app
    client = TestClient(app, raise_server_exceptions=False)
    client.credentials = service.headers(module) if service.headers else {}  # type: ignore[attr-defined]
    if service.lifespan:
        with client:
            yield client
    else:
        yield client


def expect_problem(response: Any, status: int, what: str) -> dict[str, Any]:
    sent = f"{response.request.method} {response.request.url.raw_path.decode()}"
    where = f"{what}: sent {sent}, got {response.status_code} {response.headers.get('content-type')} {response.text[:300]}"
    assert response.status_code == status, f"status {status} expected ({where})"
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, f"Content-Type {PROBLEM_JSON} ({where})"
    body = response.json()
    assert isinstance(body, dict), f"a JSON object ({where})"
    for member in ("type", "title", "detail", "instance"):
        assert isinstance(body.get(member), str), f"a string member {member!r} ({where})"
    assert body.get("status") == status and not isinstance(body.get("status"), bool), f'"status": {status} ({where})'
    if body["type"] == "about:blank":
        assert body["title"] == HTTPStatus(status).phrase, f"the status phrase as the title of about:blank ({where})"
    assert body["instance"] == response.request.url.path, f"the path sent, without a query, as instance ({where})"
    return body


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    document = client.app.openapi()  # type: ignore[attr-defined]
    return [(path, method.upper(), operation) for path, methods in document.get("paths", {}).items()
            for method, operation in methods.items() if method.upper() in METHODS]


def concrete(path: str) -> str:
    """A path with every parameter filled in with a plausible value."""
    parts = []
    for part in path.split("/"):
        parts.append("1" if part.startswith("{") and part.endswith("}") else part)
    return "/".join(parts)


def test_an_unknown_route_is_a_404_problem(client: TestClient):
    expect_problem(client.get("/no-such-route/at-all", params={"q": "personal@example.com"}), 404,
                   "a path no route matches")


def test_a_wrong_method_is_a_405_problem_with_allow(client: TestClient):
    by_path: dict[str, set[str]] = {}
    for route in client.app.router.routes:  # type: ignore[attr-defined]
        methods = getattr(route, "methods", None)
        if methods and isinstance(getattr(route, "path", None), str):
            by_path.setdefault(route.path, set()).update(set(methods) & set(METHODS))
    # A route of the service's own API (documented) before the framework's (/docs), a path without
    # parameters (nothing to fill in) before the others; one that some method does not reach.
    documented = {path for path, _, _ in operations(client)}
    candidates = [path for path in sorted(by_path, key=lambda path: (path not in documented, "{" in path, path))
                  if set(METHODS) - by_path[path]]
    assert candidates, f"an HTTP route that some method does not reach (routes: {sorted(by_path)})"
    path = candidates[0]
    wrong = next(method for method in ("PATCH", "PUT", "DELETE", "POST", "GET") if method not in by_path[path])
    response = client.request(wrong, concrete(path))
    expect_problem(response, 405, f"{wrong} on {path}, which accepts {sorted(by_path[path])}")
    allowed = {method.strip() for method in response.headers.get("allow", "").split(",") if method.strip()}
    assert by_path[path] <= allowed and wrong not in allowed, (
        f"an Allow header naming every method of {path} ({sorted(by_path[path])}) and not {wrong}; "
        f"got {response.headers.get('allow')!r}")


def invalid_requests(client: TestClient) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Requests that break a route's declared input: an integer parameter sent a word, a JSON
    body of the wrong kind. Routes without parameters to break are skipped."""
    for path, method, operation in operations(client):
        for parameter in operation.get("parameters", []):
            schema = parameter.get("schema", {})
            kinds = {schema.get("type")} | {option.get("type") for option in schema.get("anyOf", [])}
            if kinds & {"integer", "number"} and parameter.get("in") in ("path", "query"):
                name = parameter["name"]
                if parameter["in"] == "path":
                    url = concrete(path.replace("{" + name + "}", "not-a-number"))
                    yield method, url, {}
                else:
                    yield method, concrete(path), {"params": {name: "not-a-number"}}
        body = operation.get("requestBody", {}).get("content", {})
        if "application/json" in body:
            yield method, concrete(path), {"content": b'"not the body this route takes"',
                                           "headers": {"content-type": "application/json"}}
        if "application/x-www-form-urlencoded" in body:  # a login form: every field missing
            yield method, concrete(path), {"data": {}}


def test_an_invalid_input_is_a_422_problem_with_errors(client: TestClient):
    tried = []
    credentials = client.credentials  # type: ignore[attr-defined]
    for method, url, options in invalid_requests(client):
        response = client.request(method, url, **{**options, "headers": {**options.get("headers", {}), **credentials}})
        tried.append(f"{method} {url} {options.get('params', '')} -> {response.status_code}")
        if response.status_code != 422:
            continue  # a guard (401, 403) may answer before validation: try another route
        body = expect_problem(response, 422, "an invalid input")
        errors = body.get("errors")
        assert isinstance(errors, list) and errors, f'"errors": a non-empty list ({response.text[:300]})'
        for error in errors:
            assert isinstance(error, dict) and set(error) == {"loc", "msg", "type"}, (
                f'each error has exactly "loc", "msg" and "type" (never "input" or "ctx"): {json.dumps(error)[:300]}')
            assert isinstance(error["loc"], list) and isinstance(error["msg"], str) and isinstance(error["type"], str)
        return
    if not tried:
        return  # no route takes an input (a gateway that only forwards): there is nothing to make invalid
    pytest.fail("no route answered 422 to an invalid input; tried:\n  " + "\n  ".join(tried))


def given_copies() -> list[Path]:
    return sorted(path for folder in ("exercises", "solutions") for path in (ROOT / folder).rglob("problems.py")
                  if "mutants" not in path.parts and path != ORIGINAL)


@pytest.mark.parametrize("copy", given_copies(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_problems_py_is_the_given_file(copy: Path):
    assert copy.read_bytes() == ORIGINAL.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from exercises/04_dependencies/problems.py: copy the original byte for byte "
        "(never edit a copy; a change to the contract goes in the original and every copy)")
