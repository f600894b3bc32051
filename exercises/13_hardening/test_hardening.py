"""Graded tests for exercise 13. Run: pytest exercises/13_hardening"""

import json
import math
import re
from contextlib import ExitStack

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from grader.environment import settings_environment
from grader.expect import StartupFailed, expect_header, expect_json, expect_problem, expect_status, explain, json_of
from grader.live import http_only, serve_in_thread

SHOP = "https://shop.example"
EVIL = "https://evil.example"
LEAK = "postgresql://admin:hunter2@db.internal/catalogue"


class FakeClock:
    """A monotonic clock the test moves by hand: rate limits and TTLs without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def read(self) -> float:
        """What the app gets as its clock: a function (class grading calls it in the tests' process)."""
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def clean_environment(tmp_path_factory):
    """No stray HARD_* variable and no stray .env (the working directory is an empty folder)."""
    with settings_environment("HARD_", tmp_path_factory.mktemp("hardening")):
        yield


@pytest.fixture(autouse=True)
def env(clean_environment, monkeypatch):
    """What a test changes in the environment is undone after it."""
    return monkeypatch


@pytest.fixture(scope="module")
def module(load):
    # Imported once per test run: the README promises that create_app() builds all state.
    return load("app", fresh=False)


@pytest.fixture
def clock():
    return FakeClock()


def build_app(module, clock, **overrides):
    """A fresh app from create_app(Settings(...), clock=clock)."""
    overrides.setdefault("cors_origins", [SHOP])
    # By name, as the README's signature create_app(settings=None, *, clock=...) allows.
    return module.create_app(settings=module.Settings(**overrides), clock=clock.read)


@pytest.fixture
def build(module, clock):
    """build(**settings) -> a fresh app from create_app(Settings(...), clock=clock)."""

    def _build(**overrides):
        return build_app(module, clock, **overrides)

    return _build


async def explode() -> None:
    raise RuntimeError(f"could not connect to {LEAK}")


# The settings of the app that the tests without a clock or a count of their own share. Its
# bucket is far larger than all of their requests together, so none of them meets a 429 (the
# rate limit tests build their own apps), and its fake clock never moves.
SHARED = {"max_body_bytes": 1000, "gzip_minimum_size": 500, "rate_limit_capacity": 1_000_000}


@pytest.fixture(scope="module")
def client(module, clean_environment):
    """One app for the tests that only read, or whose writes no other test depends on."""
    with ExitStack() as stack:
        try:
            app = build_app(module, FakeClock(), **SHARED)
            # A route that crashes, as a bug would: for the 500 checks.
            app.get("/test-only/explode")(explode)
            client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
        except Exception as exc:  # the learner's create_app() failed: every test that needs it fails
            client = StartupFailed(
                f"\nexpected: create_app(Settings(cors_origins=[{SHOP!r}], ...), clock=...) builds and starts an app\n"
                f"got:      {type(exc).__name__}: {exc}"
            )
        yield client


def preflight(client, origin, method="POST", path="/products"):
    return client.options(
        path,
        headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": "content-type"},
    )


# ------------------------------------------------------------------------------ CORS


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_a_preflight_from_an_allowed_origin_is_answered(client):
    response = preflight(client, SHOP)
    expect_status(response, 200, "a preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin")
    expect_header(response, "access-control-allow-origin", SHOP, "the exact origin, never '*', since credentials are allowed")
    expect_header(response, "access-control-allow-credentials", "true")
    methods = expect_header(response, "access-control-allow-methods")
    assert {"GET", "POST"} <= {m.strip() for m in methods.split(",")}, explain(
        response, f"GET and POST among the allowed methods; got {methods!r}"
    )


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_other_origins_get_no_cors_permission(client):
    response = preflight(client, EVIL)
    assert "access-control-allow-origin" not in response.headers, explain(
        response, f"no Access-Control-Allow-Origin for {EVIL}: it is not in settings.cors_origins, so the browser must block it"
    )
    simple = client.get("/products", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in simple.headers, explain(simple, f"no Access-Control-Allow-Origin for {EVIL}")
    allowed = client.get("/products", headers={"Origin": SHOP})
    expect_header(allowed, "access-control-allow-origin", SHOP, "a simple request from an allowed origin")


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_a_refused_preflight_answers_in_the_error_body(client):
    for origin, method, headers, why in (
        (EVIL, "POST", "content-type", f"{EVIL} is not in cors_origins"),
        (SHOP, "DELETE", "content-type", "DELETE is not an allowed method"),
        (SHOP, "POST", "x-unlisted-header", "x-unlisted-header is not an allowed header"),
    ):
        response = client.options(
            "/products",
            headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
        )
        expect_problem(
            response, 400,
            f"a refused preflight ({why}) is a problem like every error, not Starlette's plain text "
            "(subclass CORSMiddleware and answer a refused preflight with problem_response)",
        )
        if origin == EVIL:
            assert "access-control-allow-origin" not in response.headers, explain(response, f"no permission for {EVIL}")


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_origins_come_from_the_settings(module, clock, monkeypatch):
    monkeypatch.setenv("HARD_CORS_ORIGINS", '["https://admin.example"]')
    monkeypatch.setenv("HARD_CORS_ALLOW_CREDENTIALS", "false")
    settings = module.Settings()
    assert settings.cors_origins == ["https://admin.example"], (
        "\nset:      HARD_CORS_ORIGINS='[\"https://admin.example\"]'\n"
        f"expected: Settings().cors_origins == ['https://admin.example']\ngot:      {settings.cors_origins!r}"
    )
    with TestClient(module.create_app(settings, clock=clock.read)) as client:
        admin = preflight(client, "https://admin.example")
        local = preflight(client, "http://localhost:3000")
    expect_header(admin, "access-control-allow-origin", "https://admin.example", "the origin configured in the settings")
    assert "access-control-allow-credentials" not in admin.headers, explain(
        admin,
        "no Access-Control-Allow-Credentials once HARD_CORS_ALLOW_CREDENTIALS=false (take it from the settings, not True); "
        f"got Access-Control-Allow-Credentials: {admin.headers.get('access-control-allow-credentials')!r}",
    )
    assert "access-control-allow-origin" not in local.headers, explain(
        local, "no permission for http://localhost:3000 once the settings list only https://admin.example (no hard-coded origins)"
    )


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_a_wildcard_with_credentials_is_refused(module):
    with pytest.raises(ValidationError):
        module.Settings(cors_origins=["*"], cors_allow_credentials=True)
        pytest.fail(
            "\nexpected: Settings(cors_origins=['*'], cors_allow_credentials=True) raises a ValidationError\n"
            "got:      it was accepted. Browsers refuse '*' on credentialed requests, and echoing every origin instead "
            "lets any site use your users' cookies.",
            pytrace=False,
        )
    with pytest.raises(ValidationError):
        module.Settings(cors_origins=[SHOP, "*"], cors_allow_credentials=True)
        pytest.fail(
            f"\nexpected: Settings(cors_origins=[{SHOP!r}, '*'], cors_allow_credentials=True) raises a ValidationError\n"
            "got:      it was accepted. A '*' anywhere in the list allows every origin, so look for it in the list, "
            "not only at cors_origins == ['*'].",
            pytrace=False,
        )
    public = module.Settings(cors_origins=["*"], cors_allow_credentials=False)
    assert public.cors_origins == ["*"], "'*' without credentials is allowed (a public, cookie-less API)"


@pytest.mark.task("cors")
@pytest.mark.promise("P1")
def test_an_options_request_that_is_not_a_preflight_reaches_the_app(client):
    for headers, why in (
        ({"Origin": SHOP}, "an Origin but no Access-Control-Request-Method"),
        ({"Access-Control-Request-Method": "POST"}, "an Access-Control-Request-Method but no Origin"),
    ):
        response = client.options("/products", headers=headers)
        expect_problem(
            response, 405,
            f"OPTIONS /products with {why} is not a CORS preflight: the app answers it like any request, and no "
            "route accepts OPTIONS (a preflight needs both headers)",
        )
        allow = {method.strip() for method in response.headers.get("allow", "").split(",")}
        assert {"GET", "POST"} <= allow, explain(response, f"the 405's Allow lists GET and POST; got {response.headers.get('allow')!r}")
        if "Origin" in headers:
            expect_header(response, "access-control-allow-origin", SHOP, "an answer to an allowed origin, like any simple request")
        else:
            assert "access-control-allow-origin" not in response.headers, explain(response, "no Origin, no CORS permission")


def out_of_bounds(module, **values) -> list[str]:
    """The settings (one at a time) that Settings() accepted, though the README bounds them."""
    accepted = []
    for name, value in values.items():
        try:
            module.Settings(**{name: value})
        except ValidationError:
            continue
        accepted.append(f"{name}={value!r}")
    return accepted


def within_bounds(module, **values) -> list[str]:
    """The settings (one at a time) that Settings() refused, though they are within the README's bounds."""
    refused = []
    for name, value in values.items():
        try:
            module.Settings(**{name: value})
        except ValidationError as exc:
            refused.append(f"{name}={value!r} ({exc.errors(include_url=False)[0].get('msg')})")
    return refused


def expect_bounds(module, refused: dict, accepted: dict) -> None:
    wrong = out_of_bounds(module, **refused)
    assert not wrong, f"\nexpected: a ValidationError for a value outside the bounds of the Settings table\ngot:      accepted {wrong}"
    wrong = within_bounds(module, **accepted)
    assert not wrong, f"\nexpected: Settings() accepts values within the bounds of the Settings table\ngot:      refused {wrong}"


@pytest.fixture
def defaults(module, clock):
    """An app from create_app(Settings(), clock=clock): nothing set, so every default of the table."""
    settings = module.Settings()
    return TestClient(module.create_app(settings, clock=clock.read), raise_server_exceptions=False)


@pytest.mark.task("cors")
@pytest.mark.promise("P1", "P11")
def test_by_default_the_local_front_end_may_call_with_credentials(module, defaults):
    settings = module.Settings()
    assert (settings.cors_origins, settings.cors_allow_credentials) == (["http://localhost:3000"], True), (
        f"\nexpected: the defaults of the table, cors_origins=['http://localhost:3000'], cors_allow_credentials=True\n"
        f"got:      {settings.cors_origins!r}, {settings.cors_allow_credentials!r}"
    )
    with defaults as client:
        local, other = preflight(client, "http://localhost:3000"), preflight(client, SHOP)
    expect_header(local, "access-control-allow-origin", "http://localhost:3000", "create_app(Settings()): the default origin")
    expect_header(local, "access-control-allow-credentials", "true", "credentials are allowed by default")
    assert "access-control-allow-origin" not in other.headers, explain(other, f"{SHOP} is not among the default origins")


# ------------------------------------------------------------------------------ security headers


def _twice(client, path):
    client.get(path)
    return client.get(path)


def _too_many(build):
    # An app of its own: the shared one never runs out of tokens.
    with TestClient(build(rate_limit_capacity=1, rate_limit_refill_per_second=0.01), raise_server_exceptions=False) as client:
        return _twice(client, "/products")


# Every kind of answer the app gives: from a route, from the router, from each middleware, from a crash.
SCENARIOS = {
    "GET /health": lambda client, build: client.get("/health"),
    "GET /products": lambda client, build: client.get("/products"),
    "429 Too Many Requests": lambda client, build: _too_many(build),
    "404 Not Found": lambda client, build: client.get("/no/such/page"),
    "CORS preflight": lambda client, build: preflight(client, SHOP),
    "413 Content Too Large": lambda client, build: client.post("/upload", content=b"x" * 1001),  # max_body_bytes=1000
    "500 from an unexpected exception": lambda client, build: client.get("/test-only/explode"),
}


@pytest.mark.task("security_headers")
@pytest.mark.promise("P2")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_security_headers_on_every_response(client, build, scenario):
    response = SCENARIOS[scenario](client, build)
    headers = response.headers
    expect_header(response, "x-content-type-options", "nosniff", f"on every response, including {scenario}")
    framing = headers.get("x-frame-options", "").upper() == "DENY" or "frame-ancestors 'none'" in headers.get("content-security-policy", "")
    assert framing, explain(response, f"X-Frame-Options: DENY (or a CSP with frame-ancestors 'none') on {scenario}")
    expect_header(response, "referrer-policy", "no-referrer", f"on {scenario}")
    hsts = expect_header(response, "strict-transport-security", why=f"on {scenario}")
    max_age = next((int(part.split("=", 1)[1]) for part in hsts.split(";") if part.strip().startswith("max-age=")), 0)
    assert max_age >= 31_536_000, explain(response, f"Strict-Transport-Security with max-age of at least one year; got {hsts!r}")


# ------------------------------------------------------------------------------ body size


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3")
def test_a_body_at_the_limit_passes_one_byte_more_is_413(client):
    # The shared app has max_body_bytes=1000.
    expect_json(client.post("/upload", content=b"x" * 1000), {"size": 1000}, "exactly max_body_bytes is allowed", exact=True)
    response = client.post("/upload", content=b"x" * 1001)
    expect_problem(response, 413, "1001 bytes with max_body_bytes=1000")
    product = client.post("/products", json={"name": "x" * 1000, "price": 1.0, "stock": 1})
    expect_problem(product, 413, "a JSON body over 1000 bytes to POST /products: the limit holds on every route, not only /upload")


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3")
def test_a_chunked_body_without_content_length_is_limited_too(client):
    def chunks():
        for _ in range(3):
            yield b"x" * 600

    response = client.post("/upload", content=chunks())  # the shared app has max_body_bytes=1000
    assert "content-length" not in response.request.headers
    expect_problem(
        response, 413,
        "1800 bytes sent chunked, without Content-Length: count the bytes as they arrive, do not trust the header alone",
    )
    exact = client.post("/upload", content=Chunks(2, 500))
    expect_json(exact, {"size": 1000}, "exactly max_body_bytes=1000 sent chunked (two chunks of 500) is accepted", exact=True)
    over = client.post("/upload", content=iter([b"x" * 500, b"x" * 501]))
    expect_problem(over, 413, "1001 bytes sent chunked (500 + 501) with max_body_bytes=1000: one byte over is refused")


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3")
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("GET", "/products"), ("GET", "/products/1"), ("GET", "/no-such-path"), ("DELETE", "/products")],
)
def test_a_chunked_body_is_limited_on_routes_that_never_read_it(client, method, path):
    # "On every route": a route that never reads the body must not answer a chunked body of any
    # size, when the same body with a Content-Length would be a 413.
    declared = client.request(method, path, content=b"x" * 1001)
    expect_problem(declared, 413, f"{method} {path} with 1001 bytes and a Content-Length (max_body_bytes=1000)")
    over = client.request(method, path, content=Chunks(3, 400))
    assert "content-length" not in over.request.headers
    expect_problem(
        over, 413,
        f"{method} {path} with 1200 bytes sent chunked, without Content-Length (max_body_bytes=1000): refused like "
        "the same body with a Content-Length, even though this route never reads a body",
    )
    plain = client.request(method, path)
    fits = client.request(method, path, content=Chunks(2, 500))
    assert fits.status_code == plain.status_code and fits.status_code != 413, explain(
        fits, f"{method} {path} with exactly max_body_bytes=1000 sent chunked: answered as without a body "
        f"({plain.status_code}), not refused",
    )


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3", "P11")
def test_the_default_body_limit_is_1048576_bytes(module, defaults):
    expect_bounds(module, refused={"max_body_bytes": 0}, accepted={"max_body_bytes": 1})
    with defaults as client:
        expect_json(client.post("/upload", content=b"x" * 1_048_576), {"size": 1_048_576},
                    "create_app(Settings()): exactly the default max_body_bytes, 1048576 bytes, is accepted", exact=True)
        expect_problem(client.post("/upload", content=b"x" * 1_048_577), 413,
                       "create_app(Settings()): one byte over the default max_body_bytes of 1048576")


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3", "P11")
def test_the_settings_read_a_dotenv_file(module, clock, env, tmp_path):
    env.chdir(tmp_path)
    (tmp_path / ".env").write_text("HARD_MAX_BODY_BYTES=10\n", encoding="utf-8")
    settings = module.Settings()
    assert settings.max_body_bytes == 10, (
        "\nexpected: Settings() reads HARD_* values from a .env file in the working directory "
        f"(HARD_MAX_BODY_BYTES=10 there)\ngot:      max_body_bytes={settings.max_body_bytes!r}"
    )
    with TestClient(module.create_app(settings, clock=clock.read)) as client:
        expect_json(client.post("/upload", content=b"x" * 10), {"size": 10}, "10 bytes with HARD_MAX_BODY_BYTES=10 in .env", exact=True)
        expect_problem(client.post("/upload", content=b"x" * 11), 413, "11 bytes with HARD_MAX_BODY_BYTES=10 in .env")


class Chunks:
    """A request body httpx sends chunked (no Content-Length); iterable again for the failure message."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size

    def __iter__(self):
        for _ in range(self.count):
            yield b"x" * self.size


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3")
@pytest.mark.slow
def test_a_chunked_upload_to_a_real_server_is_cut_off(build):
    # Plain HTTP on loopback: no WebSocket library for the server (ws="none"), no CA bundle for
    # the client (http_only()).
    with serve_in_thread(build(max_body_bytes=1000), ws="none") as base_url, httpx.Client(base_url=base_url, timeout=5, verify=http_only()) as http:
        response = http.post("/upload", content=Chunks(5, 600))
        small = http.post("/upload", content=Chunks(2, 400))
    for sent in (response, small):
        sent.request.read()  # keep the body for the message if a check fails
    expect_problem(response, 413, "3000 bytes in chunks over real HTTP, to uvicorn")
    expect_json(small, {"size": 800}, "800 bytes in two chunks fit", exact=True)


@pytest.mark.task("body_limit")
@pytest.mark.promise("P3")
@pytest.mark.slow
def test_a_chunked_body_to_a_route_that_never_reads_it_is_refused_over_real_http(build):
    # Over a real socket too: the 413 must be the one answer that goes out (uvicorn, unlike the
    # TestClient, does not let a second answer overwrite a first one it has started to send).
    paths = ("/health", "/products/1", "/no-such-path")
    with serve_in_thread(build(max_body_bytes=1000, rate_limit_capacity=100), ws="none") as base_url, \
            httpx.Client(base_url=base_url, timeout=10, verify=http_only()) as http:
        over = {path: http.request("GET", path, content=Chunks(3, 400)) for path in paths}
        fits = {path: http.request("GET", path, content=Chunks(2, 500)) for path in paths}
    for path in paths:
        over[path].request.read()  # keep the body for the message if a check fails
        expect_problem(over[path], 413, f"GET {path} with 1200 bytes in chunks (max_body_bytes=1000), over real HTTP, to uvicorn")
        fits[path].request.read()
        expected = 404 if path == "/no-such-path" else 200
        expect_status(fits[path], expected, f"GET {path} with exactly 1000 bytes in chunks, over real HTTP: answered as usual")


# ------------------------------------------------------------------------------ rate limiting


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
def test_the_burst_is_allowed_then_429_with_retry_after(build, clock):
    with TestClient(build(rate_limit_capacity=3, rate_limit_refill_per_second=1.0)) as client:
        for n in range(3):
            expect_status(client.get("/products/1"), 200, f"request {n + 1} of a burst of 3 (rate_limit_capacity=3)")
        response = client.get("/products/1")
        expect_problem(response, 429, "the fourth request at the same instant")
        expect_header(response, "retry-after", "1", "one token per second: retry in 1 s")
        expect_status(client.get("/reports/summary"), 429, "the same client on another route: one bucket per client, not one per route")
        expect_json(client.get("/health"), {"status": "ok"}, "/health is never limited: a throttled probe gets a healthy pod restarted")
        clock.advance(1.0)
        expect_status(client.get("/products/1"), 200, "one second later one token has come back")
        expect_status(client.get("/products/1"), 429, "...and only one")
        clock.advance(100.0)
        for n in range(3):
            expect_status(client.get("/products/1"), 200, f"request {n + 1} after 100 idle seconds")
        expect_status(
            client.get("/products/1"), 429,
            "the fourth request after 100 idle seconds: the bucket holds at most rate_limit_capacity=3 tokens, however long the client waited",
        )


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
def test_retry_after_counts_whole_seconds_up(build, clock):
    with TestClient(build(rate_limit_capacity=1, rate_limit_refill_per_second=0.25)) as client:
        expect_status(client.get("/products"), 200)
        expect_header(client.get("/products"), "retry-after", "4", "one token every 4 s, none left")
        clock.advance(1.5)
        expect_header(client.get("/products"), "retry-after", "3", "2.5 s to go, rounded up to whole seconds")
        clock.advance(2.4)
        expect_header(client.get("/products"), "retry-after", "1", "0.1 s to go: rounded up, never 0 (at least 1)")
        clock.advance(10)
        expect_status(client.get("/products"), 200, "10 s later a token is back")
        expect_header(client.get("/products"), "retry-after", "4", "exactly 4 s to go: 4, not rounded past a whole number")


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4", "P11")
def test_the_default_rate_limit_is_60_then_10_a_second(module, defaults, clock):
    expect_bounds(
        module,
        refused={"rate_limit_capacity": 0, "rate_limit_refill_per_second": 0, "rate_limit_max_clients": 0},
        accepted={"rate_limit_capacity": 1, "rate_limit_refill_per_second": 0.5, "rate_limit_max_clients": 1},
    )
    settings = module.Settings()
    got = (settings.rate_limit_capacity, settings.rate_limit_refill_per_second, settings.rate_limit_max_clients)
    assert got == (60, 10.0, 10_000), (
        "\nexpected: Settings() with nothing set has the defaults of the table: rate_limit_capacity=60, "
        f"rate_limit_refill_per_second=10.0, rate_limit_max_clients=10000\ngot:      {got}"
    )
    with defaults as client:
        for n in range(60):
            response = client.get("/no/such/page")
            expect_status(response, 404, f"request {n + 1} of a burst of 60 (the default rate_limit_capacity) to create_app(Settings())")
        response = client.get("/no/such/page")
        expect_problem(response, 429, "the 61st request at the same instant: the default bucket holds 60")
        expect_header(response, "retry-after", "1", "10 tokens a second by default: 0.1 s to go, rounded up to 1")
        clock.advance(0.1)
        expect_status(client.get("/no/such/page"), 404, "0.1 s later one token is back (rate_limit_refill_per_second=10)")
        expect_status(client.get("/no/such/page"), 429, "...and only one")


def _burn(client, requests):
    """Send each (method, path, kwargs) in turn; the responses."""
    return [client.request(method, path, **kwargs) for method, path, kwargs in requests]


BAD_JSON = ("POST", "/products", {"content": b'{"name": "lamp", "price": ', "headers": {"content-type": "application/json"}})
UNKNOWN = ("GET", "/no/such/page", {})


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
@pytest.mark.parametrize(
    "spent_on",
    [
        pytest.param([BAD_JSON] * 3, id="malformed-json"),
        pytest.param([UNKNOWN] * 3, id="unknown-paths"),
        pytest.param([("GET", "/docs", {}), ("GET", "/openapi.json", {}), BAD_JSON], id="docs-and-schema"),
        pytest.param([("POST", "/upload", {"content": b"x" * 1001})] * 3, id="bodies-over-the-limit"),
    ],
)
def test_every_request_takes_a_token_before_its_body_is_read(build, spent_on):
    with TestClient(build(rate_limit_capacity=3, rate_limit_refill_per_second=0.01, max_body_bytes=1000)) as client:
        spent = _burn(client, spent_on)
        for response in spent:
            assert response.status_code in (200, 404, 413, 422), explain(
                response, "one of a burst of 3 (rate_limit_capacity=3): answered as usual"
            )
        for method, path, kwargs in (BAD_JSON, UNKNOWN, ("GET", "/docs", {}), ("GET", "/products/1", {})):
            response = client.request(method, path, **kwargs)
            expect_problem(
                response, 429,
                f"the bucket is empty after 3 requests ({', '.join(r.request.method + ' ' + r.request.url.path for r in spent)}): "
                "every request takes a token, malformed bodies and unknown paths too. A dependency runs only after "
                "FastAPI has read the body and found a route: check the limit in a middleware",
            )
        expect_json(client.get("/health"), {"status": "ok"}, "/health is never limited")


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
def test_preflights_are_answered_without_a_token(build):
    with TestClient(build(rate_limit_capacity=2, rate_limit_refill_per_second=0.01)) as client:
        for _ in range(3):
            expect_status(preflight(client, SHOP), 200, "a CORS preflight is answered by CORS before the limiter")
        expect_status(client.get("/products/1"), 200, "the preflights took no token: the bucket of 2 is still full")
        expect_status(
            client.options("/products", headers={"Origin": SHOP}), 405,
            "an OPTIONS with an Origin but no Access-Control-Request-Method is not a preflight: the app's 405",
        )
        expect_problem(
            client.get("/products/1"), 429,
            "the bucket of 2 is empty: one GET, and one OPTIONS that was not a preflight (only preflights go free)",
        )


def _as(app, host):
    return TestClient(app, client=(host, 50000))


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
def test_the_limiter_forgets_the_least_recently_seen_client_past_its_cap(build):
    app = build(rate_limit_capacity=1, rate_limit_refill_per_second=0.001, rate_limit_max_clients=2)
    a, b, c = _as(app, "10.0.0.1"), _as(app, "10.0.0.2"), _as(app, "10.0.0.3")
    expect_status(a.get("/products/1"), 200, "10.0.0.1 uses its one token")
    expect_status(b.get("/products/1"), 200, "10.0.0.2 uses its one token")
    expect_status(a.get("/products/1"), 429, "10.0.0.1 has no token left (and is now the most recently seen)")
    expect_status(c.get("/products/1"), 200, "a third client, 10.0.0.3: past rate_limit_max_clients=2, one bucket is dropped")
    expect_status(
        a.get("/products/1"), 429,
        "10.0.0.1 was seen more recently than 10.0.0.2, so 10.0.0.2's bucket was the one dropped, not 10.0.0.1's "
        "(least recently seen first out: an OrderedDict, moving a client to the end on every request)",
    )
    expect_status(
        b.get("/products/1"), 200,
        "10.0.0.2 was forgotten, so it starts again with a full bucket: the limiter keeps at most "
        "rate_limit_max_clients=2 clients (README)",
    )
    expect_status(
        a.get("/products/1"), 429,
        "10.0.0.1 keeps coming back, so it is never the least recently seen: its bucket stays, empty",
    )


@pytest.mark.task("rate_limit")
@pytest.mark.promise("P4")
def test_each_client_has_its_own_limit(build):
    app = build(rate_limit_capacity=2, rate_limit_refill_per_second=0.5)
    with TestClient(app, client=("10.0.0.1", 40001)) as first, TestClient(app, client=("10.0.0.2", 40002)) as second:
        # Each with another X-Forwarded-For: a header the client writes itself must not buy a new bucket.
        first.get("/products/1", headers={"X-Forwarded-For": "192.0.2.1"})
        first.get("/products/1", headers={"X-Forwarded-For": "192.0.2.2"})
        expect_status(
            first.get("/products/1", headers={"X-Forwarded-For": "192.0.2.3"}), 429,
            "client 10.0.0.1 used its burst of 2 (key on request.client.host, not on X-Forwarded-For)",
        )
        expect_status(second.get("/products/1"), 200, "client 10.0.0.2 has its own bucket: one greedy client must not lock out the rest")


# ------------------------------------------------------------------------------ compression


@pytest.mark.task("compression")
@pytest.mark.promise("P5")
def test_large_responses_are_gzipped_small_ones_are_not(client, build):
    # The shared app has gzip_minimum_size=500.
    large = client.get("/products", headers={"Accept-Encoding": "gzip"})
    small = client.get("/health", headers={"Accept-Encoding": "gzip"})
    plain = client.get("/products", headers={"Accept-Encoding": "identity"})
    expect_header(large, "content-encoding", "gzip", "the product list is larger than gzip_minimum_size")
    assert "accept-encoding" in large.headers.get("vary", "").lower(), explain(large, "Vary: Accept-Encoding, so caches keep both versions apart")
    assert isinstance(json_of(large), list), explain(large, "a JSON list once decompressed")
    assert "content-encoding" not in small.headers, explain(small, "no compression below gzip_minimum_size: it would only cost CPU")
    assert "content-encoding" not in plain.headers, explain(plain, "no compression for a client that did not ask for gzip")
    with TestClient(build(gzip_minimum_size=100_000)) as raised:
        listed = raised.get("/products", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in listed.headers, explain(
        listed,
        "no compression with gzip_minimum_size=100000: the product list is smaller (take the minimum from the settings); "
        f"got Content-Encoding: {listed.headers.get('content-encoding')!r}",
    )


@pytest.mark.task("compression")
@pytest.mark.promise("P5", "P11")
def test_by_default_responses_from_1000_bytes_are_gzipped(module, defaults):
    expect_bounds(module, refused={"gzip_minimum_size": -1}, accepted={"gzip_minimum_size": 0})
    minimum = module.Settings().gzip_minimum_size
    assert minimum == 1000, f"\nexpected: Settings().gzip_minimum_size is 1000, the default of the table\ngot:      {minimum!r}"
    with defaults as client:
        large = client.get("/products", headers={"Accept-Encoding": "gzip"})
        small = client.get("/health", headers={"Accept-Encoding": "gzip"})
    expect_status(large, 200)
    assert len(large.content) >= 1000, explain(large, "a product list of at least 1000 bytes")
    expect_header(large, "content-encoding", "gzip", "create_app(Settings()): the list is above the default gzip_minimum_size of 1000")
    assert "content-encoding" not in small.headers, explain(small, "no compression below the default gzip_minimum_size of 1000")


# ------------------------------------------------------------------------------ conditional GET

# RFC 9110's weak entity tag: W/ and a quoted string of visible ASCII characters other than '"'.
WEAK_ETAG = re.compile(r'W/"[\x21\x23-\x7e]*"')


@pytest.mark.task("conditional_get")
@pytest.mark.promise("P6")
def test_the_etag_is_weak_and_comes_from_the_content(build):
    with TestClient(build()) as one, TestClient(build()) as two:
        first = one.get("/products")
        plain = one.get("/products", headers={"Accept-Encoding": "identity"})
        zipped = one.get("/products", headers={"Accept-Encoding": "gzip"})
        replica = two.get("/products")
    etag = expect_header(first, "etag", why="GET /products carries an ETag")
    assert WEAK_ETAG.fullmatch(etag), explain(
        first, f'a weak entity tag as RFC 9110 writes it, W/"..." (visible ASCII, no quote inside); got {etag!r}'
    )
    for what, response in {"without compression": plain, "gzipped": zipped, "from a second app": replica}.items():
        expect_header(
            response, "etag", etag,
            f"the same products, {what}: the same ETag (computed from the content, so that replicas agree and a "
            "compressed copy revalidates too)",
        )


@pytest.mark.task("conditional_get")
@pytest.mark.promise("P6")
def test_if_none_match_with_the_current_etag_answers_304(client):
    first = client.get("/products")
    expect_status(first, 200)
    etag = expect_header(first, "etag", why="GET /products carries an ETag")
    again = client.get("/products", headers={"If-None-Match": etag})
    expect_status(again, 304, "the client's copy is current: 304 Not Modified")
    assert again.content == b"", explain(again, "no body with a 304")
    expect_header(again, "etag", etag, "the 304 repeats the ETag")


@pytest.mark.task("conditional_get")
@pytest.mark.promise("P6")
def test_if_none_match_may_list_several_tags(client):
    etag = expect_header(client.get("/products"), "etag")
    bare = etag.removeprefix("W/")
    listed = client.get("/products", headers={"If-None-Match": f'"an-old-one", {bare}'})
    expect_status(listed, 304, "If-None-Match lists several tags, one of them matches (weak comparison: W/ is ignored)")
    other = client.get("/products", headers={"If-None-Match": '"an-old-one"'})
    expect_status(other, 200, "no listed tag matches: the full list")


@pytest.mark.task("conditional_get")
@pytest.mark.promise("P6")
def test_a_write_changes_the_etag(client):
    old = expect_header(client.get("/products"), "etag")
    # A name no other test uses: this app is shared, so the list may hold other tests' products.
    created = client.post("/products", json={"name": "Desk lamp for the ETag", "price": 24.5, "stock": 3})
    expect_status(created, 201, "a new product is created")
    response = client.get("/products", headers={"If-None-Match": old})
    expect_status(response, 200, "the list changed, so the old ETag no longer matches")
    assert response.headers.get("etag") not in (None, old), explain(response, "a new ETag for the new content")
    assert any(item.get("name") == "Desk lamp for the ETag" for item in json_of(response)), explain(
        response, "the new product in the list"
    )


# ------------------------------------------------------------------------------ TTL cache


@pytest.mark.task("ttl_cache")
@pytest.mark.promise("P7")
def test_the_summary_is_cached_for_its_ttl(build, clock):
    with TestClient(build(summary_ttl_seconds=5)) as client:
        first = client.get("/reports/summary")
        expect_header(first, "x-cache", "miss", "the first call computes the summary")
        body = json_of(first)
        assert isinstance(body, dict) and body.get("products") == 40, explain(first, 'a summary with "products": 40')
        second = client.get("/reports/summary")
        expect_header(second, "x-cache", "hit", "within the TTL the cached summary is served")
        expect_json(second, body, "the same summary", exact=True)
        clock.advance(4)
        expect_header(client.get("/reports/summary"), "x-cache", "hit", "4 s into a summary_ttl_seconds of 5")
        clock.advance(1)
        expect_header(
            client.get("/reports/summary"), "x-cache", "miss",
            "exactly 5 s after it was computed, summary_ttl_seconds=5 have run out: computed again (take the TTL from the "
            "settings; an entry that expires at t + ttl is stale at that instant, not a moment later)",
        )
        expect_header(client.get("/reports/summary"), "x-cache", "hit", "then cached again")


@pytest.mark.task("ttl_cache")
@pytest.mark.promise("P7", "P11")
def test_by_default_the_summary_is_cached_for_30_seconds(module, defaults, clock):
    expect_bounds(module, refused={"summary_ttl_seconds": 0}, accepted={"summary_ttl_seconds": 0.5})
    with defaults as client:
        expect_header(client.get("/reports/summary"), "x-cache", "miss", "the first call computes the summary")
        clock.advance(29.5)
        expect_header(client.get("/reports/summary"), "x-cache", "hit", "29.5 s into the default summary_ttl_seconds of 30")
        clock.advance(0.5)
        expect_header(client.get("/reports/summary"), "x-cache", "miss", "30 s later: the default TTL has run out")


@pytest.mark.task("ttl_cache")
@pytest.mark.promise("P7")
def test_a_write_invalidates_the_summary(build, clock):
    with TestClient(build(summary_ttl_seconds=30)) as client, TestClient(build(summary_ttl_seconds=30)) as other:
        client.get("/reports/summary")
        expect_header(client.get("/reports/summary"), "x-cache", "hit")
        expect_status(client.post("/products", json={"name": "Desk lamp", "price": 24.5, "stock": 3}), 201)
        clock.advance(1)
        response = client.get("/reports/summary")
        expect_header(response, "x-cache", "miss", "creating a product invalidates the cached summary at once")
        expect_json(response, {"products": 41}, "the new product is counted")
        expect_json(
            other.get("/reports/summary"), {"products": 40},
            "a second app from create_app() has its own products and its own cache: nothing cached by the first one",
        )


# ------------------------------------------------------------------------------ errors


DOCUMENTED = {
    ("/health", "get"): {"200", "413"},
    ("/products", "get"): {"200", "304", "413", "429"},
    ("/products", "post"): {"201", "400", "413", "422", "429"},
    ("/products/{product_id}", "get"): {"200", "404", "413", "422", "429"},
    ("/reports/summary", "get"): {"200", "413", "429"},
    ("/upload", "post"): {"200", "413", "429"},
}


@pytest.mark.task("errors")
@pytest.mark.promise("P8")
def test_every_status_is_documented_as_a_problem(client):
    response = client.get("/openapi.json")
    document = json_of(response)
    schemas = document.get("components", {}).get("schemas", {})
    problems = []
    for (path, method), codes in DOCUMENTED.items():
        answers = document.get("paths", {}).get(path, {}).get(method, {}).get("responses", {})
        for code in sorted(codes - set(answers)):
            problems.append(f"{method.upper()} {path} does not document {code}")
        for code in sorted(set(answers) - codes):
            problems.append(f"{method.upper()} {path} documents {code}, which it never answers")
        for code in sorted(c for c in codes & set(answers) if c.startswith(("4", "5"))):
            schema = answers[code].get("content", {}).get("application/problem+json", {}).get("schema", {})
            schema = schemas.get(schema.get("$ref", "").rsplit("/", 1)[-1], schema)
            if not {"type", "title", "status", "detail", "instance"} <= set(schema.get("properties", {})):
                problems.append(f"{method.upper()} {path} documents {code} without a problem's schema "
                                "under application/problem+json")
    assert not problems, explain(
        response, "every status each route can answer, errors as problems (responses=problem_responses(...)):\n    "
        + "\n    ".join(problems),
    )


@pytest.mark.task("errors")
@pytest.mark.promise("P8")
def test_every_error_is_a_problem(client, build):
    """The errors of routes, of FastAPI and of Starlette (the given handlers make them problems),
    and those only your middleware can make problems: a 413, a 429, a refused preflight."""
    expect_problem(client.get("/products/999"), 404, "a missing product")
    expect_problem(client.get("/no/such/page"), 404, "no route matches: Starlette's own 404 is a problem too")
    response = client.post("/health")
    expect_problem(response, 405)
    expect_header(response, "allow", "GET", "a 405 keeps its Allow header")
    response = client.put("/products")
    expect_problem(response, 405)
    allow = {method.strip() for method in response.headers.get("allow", "").split(",")}
    assert {"GET", "POST"} <= allow and "PUT" not in allow, explain(
        response,
        "Allow lists every method /products accepts, GET and POST (two routes); Starlette's own header names only "
        f"the first route it tried. Got Allow: {response.headers.get('allow')!r}",
    )
    response = client.post("/products", json={"name": "", "price": -1, "stock": 2})
    problem = expect_problem(response, 422)
    errors = problem.get("errors")
    entries = errors if isinstance(errors, list) and all(isinstance(e, dict) for e in errors) else []
    fields = [entry["loc"][-1] for entry in entries if isinstance(entry.get("loc"), list) and entry["loc"]]
    shaped = bool(entries) and all(isinstance(e.get("loc"), list) and isinstance(e.get("msg"), str) for e in entries)
    assert shaped and {"name", "price"} <= set(fields), explain(
        response, 'an "errors" list with one {"loc": [...], "msg": "...", "type": "..."} per problem, naming name and price'
    )
    assert all(set(entry) <= {"loc", "msg", "type"} for entry in entries), explain(
        response, "each error's loc, msg and type only: never the refused input"
    )
    expect_problem(client.post("/upload", content=b"x" * 1001), 413,
                   "1001 bytes with max_body_bytes=1000: your middleware answers it, so it builds the problem itself")
    expect_problem(preflight(client, EVIL), 400, f"a refused preflight (from {EVIL}) is a problem too, not plain text")
    with TestClient(build(rate_limit_capacity=1), raise_server_exceptions=False) as limited:
        limited.get("/products/1")
        response = limited.get("/products/1")
        expect_problem(response, 429, "the second request with a bucket of 1: your middleware's 429 is a problem too")
        expect_header(response, "retry-after", why="a 429 keeps its Retry-After")
    response = client.get("/test-only/explode")  # raises RuntimeError(f"could not connect to {LEAK}")
    expect_problem(response, 500, "a route raised RuntimeError")
    for secret in ("Traceback", "RuntimeError", "hunter2", "db.internal", 'File "'):
        assert secret not in response.text, explain(response, f"a body that says nothing about the cause; it contains {secret!r}")


# ------------------------------------------------------------------------------ numbers

# Values no product may carry, as raw JSON: infinity and NaN in every spelling Python's json
# and Pydantic's lax mode read, integers far too large, strings and booleans, and values just
# past the README's bounds.
NOT_A_PRICE = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", '"inf"', '"NaN"', '"1e309"', '"12.5"', "true",
               str(10**400), str(2**63), "1000000.5", "0", "-1"]
NOT_A_STOCK = ["1e309", "NaN", "Infinity", '"inf"', '"7"', "true", "false", str(10**400), str(2**63), "1000001", "-1", "2.5"]


def _post_raw(client, price="2.5", stock="3", name="bounded"):
    body = f'{{"name": "{name}", "price": {price}, "stock": {stock}}}'
    return client.post("/products", content=body, headers={"content-type": "application/json"})


def _finite_json(response, why):
    """The body, parsed with NaN and Infinity refused: a number JSON cannot carry fails here."""
    def refuse(name):
        raise ValueError(name)

    try:
        return json.loads(response.text, parse_constant=refuse)
    except ValueError:
        pytest.fail(explain(response, f"a JSON body with finite numbers only ({why})"), pytrace=False)


@pytest.mark.task("numbers")
@pytest.mark.promise("P9", "P10")
def test_infinite_huge_and_non_numeric_values_are_refused_and_never_stored(build):
    with TestClient(build(), raise_server_exceptions=False) as client:
        before = client.get("/products").json()
        for name, why in (("", "an empty name"), ("n" * 101, "a name of 101 characters")):
            refused = client.post("/products", json={"name": name, "price": 2.5, "stock": 3})
            expect_problem(refused, 422, f"POST /products with {why}: a name is 1 to 100 characters")
        for field, raws in (("price", NOT_A_PRICE), ("stock", NOT_A_STOCK)):
            for raw in raws:
                response = _post_raw(client, **{field: raw})
                expect_problem(
                    response, 422,
                    f"{field} {raw}: price is a JSON number in (0, 1000000], stock a whole JSON number in [0, 1000000], "
                    "both finite (Field(..., allow_inf_nan=False, le=...)); a 500 here may be a 422 handler echoing the input",
                )
        for raw in ("0", "-1", "2147483648", str(10**400), "1e309", "inf", "nan", "1.5"):
            response = client.get(f"/products/{raw}")
            expect_problem(response, 422, f"product_id {raw}: an id is from 1 to 2147483647")
        after = client.get("/products")
        assert after.json() == before, explain(after, "none of the refused products was stored: the same 40 products")
        created = client.post("/products", json={"name": "n" * 100, "price": 2.5, "stock": 3})
        expect_status(created, 201, "POST /products with a name of exactly 100 characters (a name is 1 to 100)")
        product = json_of(created)
        expect_header(created, "location", f"/products/{product.get('id')}", "POST /products: where the new product is")
        expect_json(client.get(created.headers["location"]), product, "GET on the Location of the new product", exact=True)


@pytest.mark.task("numbers")
@pytest.mark.promise("P9")
def test_no_accepted_product_breaks_another_route(build):
    # Everything a client might try, the extremes the README allows among it: whatever is accepted
    # must leave every other route answering 200 with finite numbers.
    candidates = [("1000000", "1000000"), ("1000000", "1000000"), ("1e-300", "1000000"), ("5e-324", "0"),
                  ("999999.99", "999999"), ("1e309", "1"), ("NaN", "1"), ("1", str(10**30)), ("1e308", "1000000"),
                  ("1000000", "1e6"), ("1", str(2**63 - 1))]
    with TestClient(build(), raise_server_exceptions=False) as client:
        created = []
        for n, (price, stock) in enumerate(candidates):
            response = _post_raw(client, price, stock, name=f"extreme {n}")
            if response.status_code == 201:
                created.append(json_of(response).get("id"))
            else:
                expect_status(response, 422, f"price {price}, stock {stock}: accepted (201) or refused as invalid (422)")
        routes = ["/products", "/reports/summary"] + [f"/products/{product_id}" for product_id in created]
        for path in routes:
            response = client.get(path)
            expect_status(
                response, 200,
                f"GET {path} after POST /products accepted {len(created)} of {len(candidates)} extreme products: "
                "no accepted input may break another route (bound the numbers so the summary stays finite)",
            )
            _finite_json(response, f"GET {path}")
        response = client.get("/reports/summary")
        summary, products = json_of(response), client.get("/products").json()
        expected = sum(p["price"] * p["stock"] for p in products)  # may be inf, if the bounds are missing
        value = summary.get("stock_value") if isinstance(summary, dict) else None
        ok = (
            summary.get("products") == len(products) and isinstance(value, (int, float)) and math.isfinite(expected)
            and math.isclose(value, expected, rel_tol=1e-9, abs_tol=0.01)
        )
        assert ok, explain(
            response,
            f"the summary of the {len(products)} products, a finite stock_value of about {expected} "
            "(an infinite value is written as null, or breaks the response)",
        )
