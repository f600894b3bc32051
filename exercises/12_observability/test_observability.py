"""Graded tests for exercise 12. Run: pytest exercises/12_observability"""

import asyncio
import json
import logging
import re
import sys
import time
import types
from contextlib import ExitStack
from datetime import datetime

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from grader.environment import settings_environment
from grader.expect import StartupFailed, expect_header, expect_json, expect_problem, expect_status, explain, json_of
from grader.upstreams import Streaming

SECRET = "s3cr3t-value-that-must-never-be-shown-0123456789"
# The longest incoming X-Request-ID that must be reused: 64 characters, every allowed kind.
LONGEST_REQUEST_ID = "req-42.a_b-" + "0123456789" * 5 + "xyz"
ACCESS_LOGGER = "inventory.access"
NOT_READY = "https://course.example/problems/not-ready"


def expect_not_ready(response, why: str) -> None:
    """The 503 problem of /ready, naming the database as down (README: GET /ready)."""
    body = expect_problem(response, 503, why, type=NOT_READY)
    assert body.get("title") == "Not ready" and body.get("checks") == {"database": "down"}, explain(
        response, f'the problem\'s title "Not ready" and "checks": {{"database": "down"}}; got {body}'
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A clean environment for the whole file: no stray OBS_* variable, no .env from elsewhere."""
    folder = tmp_path_factory.mktemp("observability")
    database_url = f"sqlite+aiosqlite:///{folder / 'inventory.db'}"
    with settings_environment("OBS_", folder, OBS_SECRET_KEY=SECRET, OBS_DATABASE_URL=database_url):
        yield folder


@pytest.fixture(autouse=True)
def env(workdir, monkeypatch):
    """What a test changes in the environment (or the working directory) is undone after it."""
    return monkeypatch


@pytest.fixture(scope="module", autouse=True)
def clean_loggers():
    """Logging is global to the process: start this file from unconfigured loggers, restore them after.

    Every app here comes from the same module, so each one configures the loggers the same way.
    """
    loggers = [logging.getLogger(name) for name in ("inventory", ACCESS_LOGGER)]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
        logger.handlers.clear()
        logger.propagate = True
    yield
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.fixture(scope="module")
def module(load):
    # One import per file: create_app() builds every app's state, and get_settings() is
    # cleared around each test (below), so tests still start from what the environment says.
    return load("app", fresh=False)


def clear_settings_cache(module) -> None:
    clear = getattr(getattr(module, "get_settings", None), "cache_clear", None)
    if callable(clear):
        clear()


@pytest.fixture(autouse=True)
def fresh_settings(module, env):
    """get_settings() reads the environment of this test, whatever an earlier test cached."""
    clear_settings_cache(module)
    yield
    clear_settings_cache(module)


@pytest.fixture(scope="module")
def client(module, workdir, clean_loggers):
    """One running app (the module's `app`) for the tests that need no fresh state of their own."""
    clear_settings_cache(module)
    app = getattr(module, "app", None)
    if app is None:
        yield StartupFailed("\nexpected: app.py defines `app = create_app()`\ngot:      no name `app`")
        return
    with ExitStack() as stack:
        try:
            client = stack.enter_context(TestClient(app))
        except Exception as exc:  # the learner's lifespan failed: every test that needs the app fails
            client = StartupFailed(
                f"\nexpected: the app starts (`with TestClient(app)` runs its lifespan) with OBS_SECRET_KEY and "
                f"OBS_DATABASE_URL set\ngot:      {type(exc).__name__}: {exc}"
            )
        yield client


def new_app(module):
    """A new app from create_app(), as the README promises; a failure reads as one."""
    try:
        return module.create_app()
    except Exception as exc:
        hint = (
            "\nMetrics registered on prometheus_client's global REGISTRY collide the second time: "
            "give every app its own CollectorRegistry."
            if isinstance(exc, ValueError) else ""
        )
        pytest.fail(
            "\nexpected: create_app() builds a new, independent app every time it is called\n"
            f"got:      {type(exc).__name__}: {exc}{hint}",
            pytrace=False,
        )


class JsonLines(logging.Handler):
    """Formats every record of the access logger with the learner's JsonFormatter, as it is emitted."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def access_lines(module, client):
    """The JSON lines written on the access logger while the test runs (after startup)."""
    handler = JsonLines(module.JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def parse_lines(lines: list[str], response) -> list[dict]:
    entries = []
    for line in lines:
        assert "\n" not in line, explain(response, f"one log line per record; this one spans several:\n{line}")
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(explain(response, f"every access log line to be JSON (JsonFormatter); got:\n    {line}"), pytrace=False)
    return entries


def one_entry_for(lines: list[str], response) -> dict:
    entries = parse_lines(lines, response)
    if len(entries) != 1:
        pytest.fail(
            explain(
                response,
                f"exactly one record on the {ACCESS_LOGGER!r} logger for this request, at INFO "
                f"(is the level set from settings.log_level at startup?); got {len(entries)}: {entries}",
            ),
            pytrace=False,
        )
    return entries[0]


def expect_header_logged(response, entry: dict) -> None:
    """The response carries an X-Request-ID, and it is the one in the request's log line."""
    header = expect_header(response, "x-request-id", why="every response carries its request ID, an error too")
    assert entry.get("request_id") == header, explain(
        response, f"the log line's request_id equals the X-Request-ID header {header!r}; got {entry.get('request_id')!r}"
    )


def samples(client) -> tuple[object, list]:
    """GET /metrics and parse it the way Prometheus does; return the response and every sample."""
    response = client.get("/metrics")
    expect_status(response, 200, "/metrics serves the metrics")
    try:
        families = list(text_string_to_metric_families(response.text))
    except Exception as exc:  # the parser raises plain ValueErrors and friends on bad input
        pytest.fail(explain(response, f"the Prometheus text exposition format (parser said: {exc})"), pytrace=False)
    return response, [sample for family in families for sample in family.samples]


def value_of(found: list, name: str, **labels: str) -> float | None:
    for sample in found:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


# ------------------------------------------------------------------------------ settings


def field(settings, name: str):
    if not hasattr(settings, name):
        pytest.fail(f"\nexpected: Settings has a field {name!r} (see the README)\ngot:      {settings!r}", pytrace=False)
    return getattr(settings, name)


def secret_of(settings) -> str:
    secret = field(settings, "secret_key")
    if not hasattr(secret, "get_secret_value"):
        pytest.fail(f"\nexpected: secret_key is a pydantic SecretStr\ngot:      {type(secret).__name__}", pytrace=False)
    return secret.get_secret_value()


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_settings_come_from_the_environment_with_types(module, env):
    env.delenv("OBS_DATABASE_URL")  # only the required secret is left set
    defaults = {"app_name": "inventory", "environment": "dev", "database_url": "sqlite+aiosqlite:///./inventory.db",
                "log_level": "INFO", "ready_timeout": 2.0, "warehouse_url": "http://127.0.0.1:8001",
                "warehouse_timeout": 5.0}
    settings = module.Settings()
    got = {name: field(settings, name) for name in defaults}
    wrong = {name: value for name, value in got.items() if value != defaults[name]}
    assert not wrong, (
        f"\nset:      only OBS_SECRET_KEY\nexpected: the defaults of the README's table {defaults}\n"
        f"got:      {wrong} (the other fields as expected)"
    )
    env.setenv("OBS_APP_NAME", "stockroom")
    env.setenv("OBS_ENVIRONMENT", "staging")
    env.setenv("OBS_READY_TIMEOUT", "0.5")
    settings = module.Settings()
    got = tuple(field(settings, name) for name in ("app_name", "environment", "ready_timeout"))
    assert got == ("stockroom", "staging", 0.5), (
        f"\nset:      OBS_APP_NAME=stockroom OBS_ENVIRONMENT=staging OBS_READY_TIMEOUT=0.5\n"
        f"expected: Settings() reads them (env_prefix='OBS_'), ready_timeout as the float 0.5\n"
        f"got:      app_name={got[0]!r}, environment={got[1]!r}, ready_timeout={got[2]!r}"
    )


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_the_secret_is_required_and_hidden(module, env):
    settings = module.Settings()
    assert secret_of(settings) == SECRET, "Settings().secret_key holds the value of OBS_SECRET_KEY"
    assert SECRET not in repr(settings) and SECRET not in str(settings.secret_key), (
        "\nexpected: the secret is masked when the settings are printed or logged (declare it as SecretStr)\n"
        f"got:      {settings!r}"
    )
    env.delenv("OBS_SECRET_KEY")
    with pytest.raises(ValidationError):
        module.Settings()
        pytest.fail(
            "\nunset:    OBS_SECRET_KEY\nexpected: Settings() raises a ValidationError (a required secret has no default)\n"
            "got:      Settings() was created anyway",
            pytrace=False,
        )


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
@pytest.mark.parametrize(("name", "value"), [
    ("OBS_READY_TIMEOUT", "soon"), ("OBS_READY_TIMEOUT", "0"), ("OBS_ENVIRONMENT", "production"), ("OBS_LOG_LEVEL", "LOUD"),
    ("OBS_WAREHOUSE_TIMEOUT", "0"),
])
def test_malformed_values_are_rejected(module, env, name, value):
    env.setenv(name, value)
    with pytest.raises(ValidationError):
        module.Settings()
        pytest.fail(
            f"\nset:      {name}={value}\nexpected: a ValidationError (ready_timeout and warehouse_timeout are floats > 0; "
            "environment is one of dev, staging, prod; log_level one of DEBUG, INFO, WARNING, ERROR)\n"
            "got:      Settings() accepted it",
            pytrace=False,
        )


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_a_dotenv_file_is_read_and_the_environment_wins(module, env, tmp_path):
    env.chdir(tmp_path)  # a folder of its own: the .env written here must not reach other tests
    env.delenv("OBS_SECRET_KEY")
    (tmp_path / ".env").write_text(
        "# read from the working directory\nOBS_SECRET_KEY=from-dotenv\nOBS_APP_NAME=from-dotenv\n"
        "UNRELATED_TOOL=1\nOBS_FEATURE_FLAGS=beta\n",
        encoding="utf-8",
    )
    env.setenv("OBS_APP_NAME", "from-environment")
    dotenv = "OBS_SECRET_KEY=from-dotenv, OBS_APP_NAME=from-dotenv, UNRELATED_TOOL=1, OBS_FEATURE_FLAGS=beta"
    try:
        settings = module.Settings()
    except ValidationError as exc:
        pytest.fail(
            f"\n.env:     {dotenv}\nexpected: keys of the file that name no field (UNRELATED_TOOL, OBS_FEATURE_FLAGS) "
            "are ignored (extra=\"ignore\"): a shared .env holds other tools' variables\n"
            f"got:      ValidationError: {exc.errors(include_input=False, include_url=False)}",
            pytrace=False,
        )
    got = (secret_of(settings), field(settings, "app_name"))
    assert got == ("from-dotenv", "from-environment"), (
        f"\n.env:     {dotenv}\n"
        "env:      OBS_APP_NAME=from-environment\n"
        "expected: the secret from .env (env_file='.env'), the app name from the environment (it wins)\n"
        f"got:      secret={got[0]!r}, app_name={got[1]!r}"
    )


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_the_app_refuses_to_start_without_its_secret(module, env, load):
    env.delenv("OBS_SECRET_KEY")
    try:
        load("app")  # a fresh import, without the secret: only starting the app may read the settings
        failed = ""
    except pytest.fail.Exception as exc:
        failed = str(exc).splitlines()[0]
    if failed:  # failed outside the `except`, so the message is not buried under the import's traceback
        pytest.fail(
            "\nunset:    OBS_SECRET_KEY\nexpected: importing app.py reads no settings (the lifespan does, at startup), "
            f"so it imports without the secret\ngot:      {failed}",
            pytrace=False,
        )
    try:
        with TestClient(new_app(module)) as client:
            response = client.get("/health")
    except ValidationError:
        return
    pytest.fail(
        explain(response, "the app to fail at startup (in the lifespan, by calling get_settings()) with a ValidationError, "
                "because OBS_SECRET_KEY is unset; it started and answered instead"),
        pytrace=False,
    )


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_get_settings_is_cached_and_can_be_cleared(module, env):
    first = module.get_settings()
    if module.get_settings() is not first or not hasattr(module.get_settings, "cache_clear"):
        pytest.fail(
            "\nexpected: get_settings() returns the same Settings object every time, and has cache_clear() "
            "(decorate it with functools.lru_cache)\ngot:      a new object on every call",
            pytrace=False,
        )
    env.setenv("OBS_APP_NAME", "renamed")
    module.get_settings.cache_clear()
    renamed = field(module.get_settings(), "app_name")
    assert renamed == "renamed", f"after get_settings.cache_clear() the environment is read again; got app_name={renamed!r}"


@pytest.mark.task("settings")
@pytest.mark.promise("P1")
def test_info_uses_the_settings_dependency_and_hides_the_secret(module, client):
    response = client.get("/info")
    expect_json(response, {"app_name": "inventory", "environment": "dev"}, "the defaults", exact=True)
    module.app.dependency_overrides[module.get_settings] = lambda: module.Settings(
        app_name="overridden", environment="prod", secret_key="another-secret-value"
    )
    try:
        response = client.get("/info")
    finally:
        module.app.dependency_overrides.clear()
    expect_json(
        response, {"app_name": "overridden", "environment": "prod"},
        "/info takes its settings from Depends(get_settings), so app.dependency_overrides replaces them", exact=True,
    )
    assert "another-secret-value" not in response.text, explain(response, "no secret in the body")


# ------------------------------------------------------------------------------ health


@pytest.mark.task("health")
@pytest.mark.promise("P2")
def test_liveness_and_readiness_when_the_database_is_up(client):
    expect_json(client.get("/health"), {"status": "ok"}, exact=True)
    response = client.get("/ready")
    expect_status(response, 200, "the database answers SELECT 1, so the service is ready")
    expect_json(response, {"status": "ready", "checks": {"database": "ok"}}, exact=True)


@pytest.mark.task("health")
@pytest.mark.promise("P2")
def test_readiness_fails_but_liveness_holds_when_the_database_is_down(module, env, tmp_path):
    # SQLite cannot create a file in a folder that does not exist: the database is "down".
    missing = tmp_path / "not-there-yet"
    env.setenv("OBS_DATABASE_URL", f"sqlite+aiosqlite:///{missing / 'inventory.db'}")
    with TestClient(new_app(module)) as client:
        response = client.get("/ready")
        expect_not_ready(response, "the database cannot be reached, so the service is not ready: a 503 problem")
        expect_json(
            client.get("/health"), {"status": "ok"},
            "liveness checks only the process: a database outage must not get healthy pods restarted", exact=True,
        )
        missing.mkdir()
        response = client.get("/ready")
        expect_status(response, 200, "once the database is back, /ready checks again (on every call) and says ready")


def expect_a_warning_naming(lines: list[str], response, cause: str, why: str) -> None:
    """One of the service's lines at WARNING names the cause of the failure (README: Errors)."""
    entries = parse_lines(lines, response)
    # Searched outside the identifiers and the time stamp, whose digits could hold the cause by chance.
    ids = ("timestamp", "trace_id", "span_id", "request_id")
    named = [entry for entry in entries if entry.get("level") == "WARNING"
             and re.search(rf"\b{cause}\b", json.dumps({k: v for k, v in entry.items() if k not in ids}, default=str))]
    assert named, explain(
        response,
        f"{why}: a line at WARNING on the service's logger that names the cause ({cause!r} somewhere in it, e.g. "
        f"extra={{\"error\": f\"{{type(exc).__name__}}: {{exc}}\"}}); the service logged {entries}",
    )


@pytest.mark.task("health")
@pytest.mark.promise("P2", "P10")
def test_a_database_down_is_logged_as_a_warning_with_its_cause(module, env, tmp_path):
    env.setenv("OBS_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'not-there' / 'inventory.db'}")
    handler = JsonLines(module.JsonFormatter())
    service = logging.getLogger("inventory")
    with TestClient(new_app(module)) as client:
        service.addHandler(handler)  # after startup: the lifespan sets the logger's own handlers
        try:
            response = client.get("/ready")
        finally:
            service.removeHandler(handler)
    expect_not_ready(response, "the database cannot be reached")
    expect_a_warning_naming(handler.lines, response, "OperationalError", "/ready answered 503 because SQLite cannot open its file")
    assert "OperationalError" not in response.text and "not-there" not in response.text, explain(
        response, "the cause goes to the log, never to the client: the 503 names no exception and no path"
    )


class FailsEveryQuery:
    """A database URL whose connections open but whose every SELECT 1 fails (a database that is up but broken)."""

    NAME = "brokensqlite"

    @classmethod
    def url(cls, path) -> str:
        from sqlalchemy.dialects import registry
        from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

        class Dialect(SQLiteDialect_aiosqlite):
            supports_statement_cache = True

            def do_execute(self, cursor, statement, parameters, context=None):
                if statement.strip().upper().startswith("SELECT"):
                    raise self.loaded_dbapi.OperationalError("disk I/O error")
                return super().do_execute(cursor, statement, parameters, context)

        holder = types.ModuleType("grader_broken_database")
        holder.Dialect = Dialect
        sys.modules[holder.__name__] = holder
        registry.register(f"{cls.NAME}.aiosqlite", holder.__name__, "Dialect")
        return f"{cls.NAME}+aiosqlite:///{path}"


@pytest.mark.task("health")
@pytest.mark.promise("P2")
def test_readiness_runs_a_query_not_only_a_connection(module, env, tmp_path):
    env.setenv("OBS_DATABASE_URL", FailsEveryQuery.url(tmp_path / "inventory.db"))
    with TestClient(new_app(module)) as client:
        response = client.get("/ready")
    expect_not_ready(
        response,
        "a database that accepts connections but fails every query (SELECT 1 raises OperationalError): not ready. "
        "Opening a connection is not enough; run SELECT 1 on it",
    )


class SlowToConnect:
    """A database URL whose connections take HANG seconds to open, awaiting all the while.

    The dialect is SQLAlchemy's aiosqlite one, registered under another name, with a connect()
    that first awaits asyncio.sleep: a check bounded by a timeout is cancelled during that sleep.
    """

    NAME = "slowsqlite"
    HANG = 5.0

    @classmethod
    def url(cls, path) -> str:
        from sqlalchemy.dialects import registry
        from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
        from sqlalchemy.util import await_

        hang = cls.HANG

        class Dialect(SQLiteDialect_aiosqlite):
            supports_statement_cache = True

            def connect(self, *cargs, **cparams):
                await_(asyncio.sleep(hang))
                return super().connect(*cargs, **cparams)

        holder = types.ModuleType("grader_slow_database")
        holder.Dialect = Dialect
        sys.modules[holder.__name__] = holder
        registry.register(f"{cls.NAME}.aiosqlite", holder.__name__, "Dialect")
        return f"{cls.NAME}+aiosqlite:///{path}"


@pytest.mark.task("health")
@pytest.mark.promise("P2")
def test_readiness_gives_up_after_ready_timeout(module, env, tmp_path):
    env.setenv("OBS_DATABASE_URL", SlowToConnect.url(tmp_path / "inventory.db"))
    env.setenv("OBS_READY_TIMEOUT", "0.2")
    with TestClient(new_app(module)) as client:
        started = time.perf_counter()
        response = client.get("/ready")
        took = time.perf_counter() - started
    expect_not_ready(
        response,
        f"a database that takes {SlowToConnect.HANG:.0f} s to accept a connection, with OBS_READY_TIMEOUT=0.2: the "
        "check gives up after ready_timeout seconds (asyncio.timeout around connecting and SELECT 1) and answers 503; "
        "a probe that hangs is as bad as one that fails",
    )
    assert took < SlowToConnect.HANG - 1, explain(
        response, f"the answer within about ready_timeout (0.2 s); it took {took:.1f} s"
    )


# ------------------------------------------------------------------------------ logging


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_the_service_writes_its_logs_to_stdout_as_json(module, capfd, env):
    env.setenv("OBS_APP_NAME", "stockroom-7")
    env.setenv("OBS_ENVIRONMENT", "staging")
    loggers = [logging.getLogger(name) for name in ("inventory", ACCESS_LOGGER)]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    # The root logger has a plain-text handler on stdout, as after a logging.basicConfig() somewhere
    # in the process: the service's records must not reach it too.
    root = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(root)
    try:
        capfd.readouterr()  # start from nothing
        with TestClient(new_app(module)) as client:
            response = client.get("/items/1")
        out = capfd.readouterr().out
    finally:  # the app's handlers write to this test's captured stdout: take them away again
        logging.getLogger().removeHandler(root)
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate
    lines = [line for line in out.splitlines() if line.strip()]
    not_json = []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            not_json.append(line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            not_json.append(line)
    assert lines and not not_json, explain(
        response,
        "the service's own log records on standard output, each one line of JSON (a StreamHandler on sys.stdout "
        "with JsonFormatter, set up by the lifespan), and only once: with a plain handler on the root logger (as "
        "after logging.basicConfig()), a record that propagates is printed again as text (propagate = False); "
        f"stdout held {len(lines)} line(s), these not JSON: {not_json[:3]}",
    )
    started = [entry for entry in entries if entry.get("logger") != ACCESS_LOGGER
               and "stockroom-7" in json.dumps(entry) and "staging" in json.dumps(entry)]
    assert started, explain(
        response,
        "at startup, a line that names the configuration the service runs with: its app_name (stockroom-7) and "
        f"environment (staging); got {entries}",
    )
    header = response.headers.get("x-request-id")
    access = [entry for entry in entries if entry.get("logger") == ACCESS_LOGGER and entry.get("request_id") == header]
    assert len(access) == 1, explain(
        response,
        f"exactly one JSON line on stdout from {ACCESS_LOGGER!r} with this request's request_id {header!r}; "
        f"got {len(access)} among {entries}",
    )


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_one_json_line_per_request_with_the_route_template(client, access_lines):
    started = time.perf_counter()
    response = client.get("/items/2", headers={"X-Request-ID": LONGEST_REQUEST_ID})
    took_ms = (time.perf_counter() - started) * 1000  # the whole request, as its client saw it
    expect_status(response, 200)
    expect_header(
        response, "x-request-id", LONGEST_REQUEST_ID,
        "the incoming ID is reused: 64 characters (the most allowed) of letters, digits, '.', '_' and '-'",
    )
    entry = one_entry_for(access_lines, response)
    expected = {"method": "GET", "route": "/items/{item_id}", "status": 200, "request_id": LONGEST_REQUEST_ID,
                "level": "INFO", "logger": ACCESS_LOGGER}
    wrong = {key: entry.get(key) for key, value in expected.items() if entry.get(key) != value}
    assert not wrong, explain(response, f"a log line with {expected} (route is the template, not /items/2); wrong: {wrong}\nline:     {entry}")
    duration = entry.get("duration_ms")
    # The server's time is part of the client's: no margin for timing, 1 ms for rounding.
    assert isinstance(duration, (int, float)) and not isinstance(duration, bool) and 0 <= duration <= took_ms + 1, explain(
        response,
        f"duration_ms, the milliseconds from the request's arrival to its response: a number from 0 to the "
        f"{took_ms:.1f} ms the whole call took in the test; got {duration!r}",
    )
    try:
        stamp = datetime.fromisoformat(str(entry.get("timestamp")))
    except ValueError:
        stamp = None
    assert stamp is not None and stamp.tzinfo is not None, explain(
        response, f"an ISO 8601 timestamp with a time zone, like 2026-01-31T12:00:00+00:00; got {entry.get('timestamp')!r}"
    )


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_unmatched_and_failed_requests_are_logged_too(client, access_lines):
    response = client.get("/items/99")
    expect_problem(response, 404, "no item has the id 99: a 404 problem (the given problems.py)")
    expect_own_detail(response)
    entry = one_entry_for(access_lines, response)
    assert (entry.get("route"), entry.get("status"), entry.get("level")) == ("/items/{item_id}", 404, "INFO"), explain(
        response, f"route '/items/{{item_id}}', status 404 and level INFO in the log line (every request logs at INFO); got {entry}"
    )
    expect_header_logged(response, entry)
    access_lines.clear()
    response = client.get("/no/such/page")
    expect_problem(response, 404, "no route matches: Starlette's 404, as a problem")
    entry = one_entry_for(access_lines, response)
    assert (entry.get("route"), entry.get("status"), entry.get("level")) == ("unmatched", 404, "INFO"), explain(
        response,
        "route 'unmatched' (no route matched, and raw paths are never logged as routes), status 404 and level INFO; "
        f"got {entry}",
    )
    expect_header_logged(response, entry)


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_a_request_that_crashes_is_logged_too(module):
    app = new_app(module)

    @app.get("/crash")
    async def crash() -> dict:
        raise RuntimeError("a bug in a route")

    handler = JsonLines(module.JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    # raise_server_exceptions=False: answer 500 as a real server would, instead of re-raising here.
    with TestClient(app, raise_server_exceptions=False) as client:
        logger.addHandler(handler)
        try:
            response = client.get("/crash")
        finally:
            logger.removeHandler(handler)
    entries = parse_lines(handler.lines, response)
    if [(entry.get("route"), entry.get("status")) for entry in entries] != [("/crash", 500)]:
        pytest.fail(explain(
            response,
            "one access log line with route '/crash' and status 500, although the route raised. Log in a `finally` "
            "around the call to the app: the exception passes through your middleware (call_next re-raises it), "
            f"so code after the call never runs; got {entries}",
        ), pytrace=False)
    expect_problem(response, 500, "a route that raises: the 500 problem, saying nothing about the cause")
    assert "a bug in a route" not in response.text and "RuntimeError" not in response.text, explain(
        response, "a 500 that says nothing about its cause: no exception name, no message, no traceback"
    )
    expect_header_logged(response, entries[0])


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_the_log_level_comes_from_the_settings(module, env):
    # Logging is global: put back the levels these apps set, so later tests log at INFO again.
    loggers = [logging.getLogger(name) for name in ("", "inventory", ACCESS_LOGGER)]
    levels = [logger.level for logger in loggers]
    access = logging.getLogger(ACCESS_LOGGER)
    try:
        for level, lines in (("DEBUG", 1), ("WARNING", 0)):
            env.setenv("OBS_LOG_LEVEL", level)
            clear_settings_cache(module)  # the lifespan reads this level, not the one cached before
            handler = JsonLines(module.JsonFormatter())
            with TestClient(new_app(module)) as client:
                access.addHandler(handler)
                try:
                    response = client.get("/health")
                finally:
                    access.removeHandler(handler)
            if lines:
                one_entry_for(handler.lines, response)
            else:
                assert not handler.lines, explain(
                    response,
                    "no INFO access line from an app started with OBS_LOG_LEVEL=WARNING: the lifespan configures "
                    f"logging at settings.log_level, not at a fixed level; got {handler.lines}",
                )
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
def test_a_request_id_is_generated_and_returned(client, access_lines):
    first = client.get("/health")
    second = client.get("/health")
    one = expect_header(first, "x-request-id", why="every response carries its request ID")
    two = expect_header(second, "x-request-id")
    assert one != two, explain(second, f"a new ID for every request; both got {one!r}")
    logged = [entry.get("request_id") for entry in parse_lines(access_lines, second)]
    assert logged == [one, two], explain(second, f"the log lines carry the same IDs as the headers {[one, two]}; got {logged}")


@pytest.mark.task("logging")
@pytest.mark.promise("P3")
@pytest.mark.parametrize("incoming", ["x" * 65, "two words", "<script>", ""])
def test_an_unsafe_incoming_request_id_is_replaced(client, incoming):
    first = client.get("/health", headers={"X-Request-ID": incoming})
    got = expect_header(first, "x-request-id")
    assert got and got != incoming, explain(
        first, f"a fresh request ID: the incoming {incoming[:20]!r} is not 1-64 letters, digits, '.', '_' or '-'"
    )
    second = client.get("/health", headers={"X-Request-ID": incoming})
    again = expect_header(second, "x-request-id")
    assert again != got, explain(
        second,
        f"a new, unique ID each time the unsafe {incoming[:20]!r} is sent (not a cut or cleaned copy of it); "
        f"both requests got {got!r}",
    )


# ------------------------------------------------------------------------------ metrics


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
def test_requests_are_counted_by_route_template(module):
    # Exact counts: a new app from create_app(), whose metrics start from zero.
    with TestClient(new_app(module)) as client:
        for path in ("/items/1", "/items/2", "/items/3", "/items/99"):
            client.get(path)
        response, found = samples(client)
    ok = value_of(found, "http_requests_total", method="GET", route="/items/{item_id}", status="200")
    missing = value_of(found, "http_requests_total", method="GET", route="/items/{item_id}", status="404")
    assert (ok, missing) == (3.0, 1.0), explain(
        response,
        'http_requests_total{method="GET",route="/items/{item_id}",status="200"} 3.0 and the same with status="404" 1.0; '
        f"got {ok} and {missing}",
    )
    labels = sorted({tuple(sorted(s.labels)) for s in found if s.name.startswith("http_requests_total")})
    assert labels == [("method", "route", "status")], explain(
        response, f"http_requests_total is labelled by method, route and status, no others; got label sets {labels}"
    )
    raw = sorted({s.labels["route"] for s in found if s.labels.get("route", "").startswith("/items/") and "{" not in s.labels["route"]})
    assert not raw, explain(response, f"no label with a raw path (one series per item id grows without end); found routes {raw}")


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
def test_unmatched_paths_share_one_label(module):
    # Exact counts: a new app from create_app(), whose metrics start from zero.
    with TestClient(new_app(module)) as client:
        for path in ("/wp-login.php", "/a/b/c", "/items"):
            client.get(path)
        response, found = samples(client)
    count = value_of(found, "http_requests_total", method="GET", route="unmatched", status="404")
    assert count == 3.0, explain(response, f'http_requests_total{{method="GET",route="unmatched",status="404"}} 3.0; got {count}')


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
def test_latency_histogram_by_route_template(module):
    # Exact counts: a new app from create_app(), whose metrics start from zero.
    handler = JsonLines(module.JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    with TestClient(new_app(module)) as client:
        logger.addHandler(handler)
        try:
            started = time.perf_counter()
            client.get("/items/1")
            client.get("/items/2")
            took = time.perf_counter() - started  # both requests, as their client saw them
        finally:
            logger.removeHandler(handler)
        response, found = samples(client)
    assert response.headers.get("content-type", "").startswith("text/plain"), explain(
        response, "Content-Type text/plain (prometheus_client.CONTENT_TYPE_LATEST)"
    )
    count = value_of(found, "http_request_duration_seconds_count", method="GET", route="/items/{item_id}")
    everything = value_of(found, "http_request_duration_seconds_bucket", method="GET", route="/items/{item_id}", le="+Inf")
    total = value_of(found, "http_request_duration_seconds_sum", method="GET", route="/items/{item_id}")
    assert count == 2.0 and everything == 2.0 and total is not None and total >= 0, explain(
        response,
        'a histogram http_request_duration_seconds{method="GET",route="/items/{item_id}"} with _count 2 '
        f"and a +Inf bucket of 2; got _count={count}, +Inf bucket={everything}, _sum={total}",
    )
    # The server's time is part of the client's: no margin for timing, 1 ms for rounding.
    assert total <= took + 0.001, explain(
        response,
        f"http_request_duration_seconds_sum, the seconds the two requests took in the service: at most the {took:.4f} s "
        f"the two calls took in the test; got {total}",
    )
    labels = sorted({
        tuple(sorted(set(s.labels) - {"le"})) for s in found if s.name.startswith("http_request_duration_seconds")
    })
    assert labels == [("method", "route")], explain(
        response, f"the histogram's labels are method and route, no others; got label sets {labels}"
    )
    # The log lines and the histogram time the same two requests: one in milliseconds, the other in seconds.
    logged = [entry.get("duration_ms") for entry in parse_lines(handler.lines, response)]
    milliseconds = sum(value for value in logged if isinstance(value, (int, float)))
    # A wide margin (100x either way) for timing jitter; a mix-up of units is a factor of 1000.
    if total >= 0.0001:  # two requests take more than 0.1 ms; below that the ratio says nothing
        assert 0.01 < milliseconds / (total * 1000) < 100, explain(
            response,
            f"duration_ms in milliseconds and http_request_duration_seconds in seconds for the same requests; "
            f"the log lines say {logged} ms, the histogram's _sum {total} s",
        )


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
def test_each_app_has_its_own_registry(module, client):
    # `app` is already one app from create_app(); build a second one next to it.
    try:
        second = module.create_app()
    except ValueError as exc:
        pytest.fail(
            "\nexpected: create_app() can be called again in a process that already has `app` (tests, reloads)\n"
            f"got:      ValueError: {exc}\n"
            "Metrics registered on prometheus_client's global REGISTRY collide the second time: "
            "give every app its own CollectorRegistry.",
            pytrace=False,
        )
    client.get("/items/1")
    with TestClient(second) as two:
        response, found = samples(two)
    count = value_of(found, "http_requests_total", method="GET", route="/items/{item_id}", status="200")
    assert count is None, explain(
        response,
        "two apps from create_app() keep separate metrics (a CollectorRegistry per app); "
        f"a new app reports the requests that `app` answered: {count}",
    )


# ------------------------------------------------------------------------------ tracing

# A caller's trace: trace ID and parent span ID as W3C Trace Context writes them, sampled.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class Warehouse:
    """The warehouse service behind httpx.MockTransport: records each request, answers with stock."""

    def __init__(self, answer=None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or (lambda request: httpx.Response(200, json={"item_id": int(request.url.path.rsplit("/", 1)[-1]), "quantity": 7}))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)


def traced_app(module, warehouse: Warehouse | None = None, *, transport: httpx.AsyncBaseTransport | None = None):
    """A new app from create_app(tracer_provider=..., transport=...), its spans kept in memory; its
    warehouse is `warehouse` (answers by a function) or `transport` (e.g. a streamed answer)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    transport = transport or httpx.MockTransport(warehouse or Warehouse())
    try:
        app = module.create_app(tracer_provider=provider, transport=transport)
    except TypeError as exc:
        pytest.fail(
            "\nexpected: create_app(tracer_provider=provider, transport=transport), as the README promises\n"
            f"got:      TypeError: {exc}",
            pytrace=False,
        )
    return app, exporter


def server_spans(exporter, response) -> list:
    spans = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    if len(spans) != 1:
        pytest.fail(
            explain(
                response,
                "exactly one server span (kind SERVER) per request, ended and given to the tracer provider "
                f"passed to create_app(); got {len(spans)}: {[span.name for span in spans]}",
            ),
            pytrace=False,
        )
    return spans


def hex_ids(span) -> tuple[str, str]:
    return format_trace_id(span.context.trace_id), format_span_id(span.context.span_id)


@pytest.mark.task("tracing")
@pytest.mark.promise("P5")
@pytest.mark.parametrize(("path", "template", "code"), [
    ("/items/1", "/items/{item_id}", 200),
    ("/items/99", "/items/{item_id}", 404),
    ("/health", "/health", 200),
])
def test_an_incoming_traceparent_is_continued(module, path, template, code):
    app, exporter = traced_app(module)
    with TestClient(app) as client:
        response = client.get(path, headers={"traceparent": CALLER_TRACEPARENT})
        expect_status(response, code)
    (span,) = server_spans(exporter, response)
    trace_id, _ = hex_ids(span)
    parent = format_span_id(span.parent.span_id) if span.parent is not None else None
    assert (trace_id, parent) == (CALLER_TRACE, CALLER_SPAN), explain(
        response,
        f"sent traceparent {CALLER_TRACEPARENT}: the server span continues that trace (trace ID {CALLER_TRACE}) "
        f"as a child of the caller's span {CALLER_SPAN}; got trace ID {trace_id}, parent {parent} "
        "(a new trace per service breaks the request's story in two: extract the context from the headers)",
    )
    assert span.name == f"GET {template}", explain(
        response,
        f"the server span is named by the method and the route template, {'GET ' + template!r}; got {span.name!r} "
        "(a raw path with an id makes one span name per item)",
    )


@pytest.mark.task("tracing")
@pytest.mark.promise("P5")
def test_without_a_traceparent_every_request_starts_its_own_trace(module):
    app, exporter = traced_app(module)
    with TestClient(app) as client:
        for _ in range(2):
            response = client.get("/items/1")
            expect_status(response, 200)
    spans = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    traces = {hex_ids(span)[0] for span in spans}
    assert len(spans) == 2 and len(traces) == 2 and all(span.parent is None for span in spans), explain(
        response,
        "with no traceparent, each request is the root of a new trace: two requests, two server spans, two trace IDs, "
        f"no parent; got {len(spans)} server span(s) in trace(s) {sorted(traces)}",
    )


@pytest.mark.task("tracing")
@pytest.mark.promise("P6")
@pytest.mark.parametrize("incoming", [CALLER_TRACEPARENT, None], ids=["continued", "new"])
def test_the_trace_goes_on_to_the_warehouse(module, incoming):
    warehouse = Warehouse()
    app, exporter = traced_app(module, warehouse)
    headers = {"traceparent": incoming} if incoming else {}
    with TestClient(app) as client:
        response = client.get("/items/2/stock", headers=headers)
        expect_status(response, 200)
        expect_json(response, {"item_id": 2, "quantity": 7}, "the stock the warehouse answered", exact=True)
    (server,) = server_spans(exporter, response)
    trace_id, _ = hex_ids(server)
    ours = {hex_ids(span)[1] for span in exporter.get_finished_spans() if hex_ids(span)[0] == trace_id}
    sent = [request.headers.get_list("traceparent") for request in warehouse.requests]
    assert len(sent) == 1 and len(sent[0]) == 1, explain(
        response, f"one call to the warehouse carrying one traceparent header; got the headers {sent}"
    )
    match = TRACEPARENT.fullmatch(sent[0][0])
    assert match is not None, explain(
        response, f"the warehouse call carries a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>); got {sent[0][0]!r}"
    )
    assert match[1] == trace_id and match[2] in ours, explain(
        response,
        f"sent traceparent {incoming}: the call to the warehouse carries the same trace ({trace_id}) and names one "
        f"of this service's spans {sorted(ours)} as its parent; got {sent[0][0]!r}",
    )
    assert int(match[3], 16) & 1, explain(response, f"the sampled flag goes on with the trace; got {sent[0][0]!r}")


@pytest.mark.task("tracing")
@pytest.mark.promise("P9")
def test_an_empty_shelf_is_a_stock_of_zero(module):
    app, _ = traced_app(module, Warehouse(lambda request: httpx.Response(200, json={"item_id": 3, "quantity": 0})))
    with TestClient(app) as client:
        response = client.get("/items/3/stock")
    expect_json(response, {"item_id": 3, "quantity": 0},
                "the warehouse holds none of item 3: a quantity of 0 is an answer (quantity >= 0), not a failure", exact=True)


@pytest.mark.task("tracing")
@pytest.mark.promise("P9", "P10")
@pytest.mark.parametrize("failure", ["status 500", "status 503 with a stock body", "connection refused", "not JSON",
                                     "negative quantity", "quantity as text", "quantity not whole", "another item"])
def test_a_failing_warehouse_answers_502(module, failure):
    def answer(request: httpx.Request) -> httpx.Response:
        if failure == "connection refused":
            raise httpx.ConnectError("connection refused", request=request)
        return {
            "status 500": httpx.Response(500, json={"detail": "boom"}),
            # an error status is a failure whatever the body says
            "status 503 with a stock body": httpx.Response(503, json={"item_id": 3, "quantity": 5}),
            "not JSON": httpx.Response(200, text="<html>"),
            "negative quantity": httpx.Response(200, json={"item_id": 3, "quantity": -1}),
            "quantity as text": httpx.Response(200, json={"item_id": 3, "quantity": "7"}),  # integers, not strings
            "quantity not whole": httpx.Response(200, json={"item_id": 3, "quantity": 7.5}),
            "another item": httpx.Response(200, json={"item_id": 1, "quantity": 4}),
        }[failure]

    app, _ = traced_app(module, Warehouse(answer))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/items/3/stock")
        expect_problem(response, 502, f"the warehouse fails ({failure}): a 502 problem, never a 500 or its answer passed on")
        missing = client.get("/items/99/stock")
        expect_problem(missing, 404, "an item the service does not have: a 404 problem, without asking the warehouse")
    for answer in (response, missing):
        expect_own_detail(answer)


class Trickle(httpx.AsyncByteStream):
    """A warehouse answer that never keeps one read waiting long: a space every 50 ms, for `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        end = loop.time() + self.seconds
        while loop.time() < end:
            await asyncio.sleep(0.05)
            yield b" "


@pytest.mark.task("tracing")
@pytest.mark.promise("P9")
def test_a_trickling_warehouse_is_cut_off_at_warehouse_timeout(module, env):
    env.setenv("OBS_WAREHOUSE_TIMEOUT", "0.5")
    trickling = Warehouse(lambda request: httpx.Response(200, headers={"Content-Type": "application/json"}, stream=Trickle(12.0)))
    app, _ = traced_app(module, trickling)
    with TestClient(app, raise_server_exceptions=False) as client:
        started = time.perf_counter()
        response = client.get("/items/3/stock")
        took = time.perf_counter() - started
    expect_problem(response, 502, "the warehouse sends a byte every 50 ms and has not finished after OBS_WAREHOUSE_TIMEOUT=0.5 s")
    assert took < 6.0, explain(
        response,
        "a 502 once OBS_WAREHOUSE_TIMEOUT (0.5 s) has passed: one deadline for the whole call (asyncio.timeout around "
        f"it), since httpx's timeout bounds each read and a trickle never keeps one waiting; it took {took:.1f} s",
    )


def expect_own_detail(response) -> None:
    """A problem's detail is a sentence about this occurrence, not the status's name (that is the title)."""
    body = json_of(response)
    detail, title = body.get("detail"), body.get("title")
    assert isinstance(detail, str) and detail.strip() and detail != title, explain(
        response,
        f"a detail of the service's own about this occurrence (HTTPException(..., detail=\"...\")), not the status's "
        f"name, which is already the title {title!r}; got detail {detail!r}",
    )


@pytest.mark.task("tracing")
@pytest.mark.promise("P7", "P10")
def test_every_log_line_carries_the_trace(module):
    warehouse = Warehouse(lambda request: httpx.Response(503))
    app, exporter = traced_app(module, warehouse)
    handler = JsonLines(module.JsonFormatter())
    service = logging.getLogger("inventory")
    with TestClient(app, raise_server_exceptions=False) as client:
        service.addHandler(handler)  # after startup: the lifespan sets the logger's own handlers
        try:
            response = client.get("/items/1/stock", headers={"traceparent": CALLER_TRACEPARENT})
        finally:
            service.removeHandler(handler)
    (server,) = server_spans(exporter, response)
    trace_id, span_id = hex_ids(server)
    ours = {hex_ids(span)[1] for span in exporter.get_finished_spans()}
    entries = parse_lines(handler.lines, response)
    access = [entry for entry in entries if entry.get("logger") == ACCESS_LOGGER]
    assert len(access) == 1, explain(response, f"one access line for the request; got {entries}")
    assert (access[0].get("trace_id"), access[0].get("span_id")) == (trace_id, span_id), explain(
        response,
        f"the access line carries the server span's trace_id {trace_id!r} and span_id {span_id!r} (32 and 16 "
        f"lower-case hex digits); got trace_id={access[0].get('trace_id')!r}, span_id={access[0].get('span_id')!r}",
    )
    wrong = [entry for entry in entries if entry.get("trace_id") != trace_id or entry.get("span_id") not in ours]
    assert not wrong, explain(
        response, f"every line logged while serving the request carries its trace_id {trace_id!r} and a span_id of it; got {wrong}"
    )
    request_id = response.headers.get("x-request-id")
    wrong = [entry for entry in entries if entry.get("request_id") != request_id]
    assert not wrong, explain(
        response,
        f"every line logged while serving the request carries its request_id {request_id!r} (the X-Request-ID header), "
        f"those of the route too (a logging.Filter that reads it from a ContextVar); got {wrong}",
    )
    expect_a_warning_naming(handler.lines, response, "503", "the warehouse answered 503, so the service answered 502")


@pytest.mark.task("tracing")
@pytest.mark.promise("P7")
def test_a_new_request_id_is_the_trace_id(module):
    app, exporter = traced_app(module)
    with TestClient(app) as client:
        response = client.get("/items/1", headers={"X-Request-ID": "not a valid id"})
    (server,) = server_spans(exporter, response)
    trace_id, _ = hex_ids(server)
    got = expect_header(response, "x-request-id")
    assert got == trace_id, explain(
        response, f"without a valid X-Request-ID, the request ID is the trace ID {trace_id!r} (one rule); got {got!r}"
    )


@pytest.mark.task("tracing")
@pytest.mark.promise("P8")
@pytest.mark.parametrize("malformed", [
    "",
    "garbage",
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # version ff is forbidden
    f"00-{'0' * 32}-{CALLER_SPAN}-01",  # all-zero trace ID
    f"00-{CALLER_TRACE}-{'0' * 16}-01",  # all-zero parent ID
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",  # upper-case hex
    f"00-{CALLER_TRACE[:-1]}-{CALLER_SPAN}-01",  # one digit short
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has exactly four fields
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-zz",
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01\u00e9".encode("latin-1"),  # a byte outside ASCII
])
def test_a_malformed_traceparent_starts_a_new_trace(module, malformed):
    app, exporter = traced_app(module)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/items/1", headers={"traceparent": malformed})
        expect_status(response, 200, f"a malformed traceparent {malformed!r} is ignored, never an error")
    (span,) = server_spans(exporter, response)
    trace_id, _ = hex_ids(span)
    assert span.parent is None and trace_id != CALLER_TRACE and span.context.trace_id != 0, explain(
        response,
        f"sent the malformed traceparent {malformed!r}: a new trace (a root span, a fresh trace ID); "
        f"got trace ID {trace_id}, parent {span.parent}",
    )


def spans_by_id(exporter) -> dict:
    return {span.context.span_id: span for span in exporter.get_finished_spans()}


@pytest.mark.task("tracing")
@pytest.mark.promise("P5", "P6")
@pytest.mark.parametrize(("path", "template", "code"), [
    ("/items/1", "/items/{item_id}", 200),
    ("/items/99", "/items/{item_id}", 404),
    ("/items/3/stock", "/items/{item_id}/stock", 502),
    ("/crash", "/crash", 500),
])
def test_the_server_span_describes_the_answer(module, path, template, code):
    warehouse = Warehouse(lambda request: httpx.Response(503, json={"detail": "down for maintenance"}))
    app, exporter = traced_app(module, warehouse)

    @app.get("/crash")
    async def crash() -> dict:
        raise RuntimeError("a bug in a route")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(path)
        expect_status(response, code)
    (span,) = server_spans(exporter, response)
    attributes = dict(span.attributes or {})
    expected = {"http.request.method": "GET", "http.route": template, "http.response.status_code": code}
    wrong = {key: attributes.get(key) for key, value in expected.items() if attributes.get(key) != value}
    assert not wrong, explain(
        response,
        f"the server span carries OpenTelemetry's HTTP attributes {expected} (the status code an integer); wrong: {wrong}",
    )
    failed = code >= 500
    assert (span.status.status_code == StatusCode.ERROR) == failed, explain(
        response,
        f"the server span's status is ERROR when the answer is a 5xx, and not ERROR otherwise (a {code} "
        + ("is the service's failure" if failed else "is the client's mistake, not the service's")
        + f"); got {span.status.status_code.name}",
    )
    recorded = [event for event in span.events if event.name == "exception"]
    if path == "/crash":
        assert len(recorded) == 1 and recorded[0].attributes.get("exception.type", "").endswith("RuntimeError"), explain(
            response,
            "the route raised RuntimeError: the server span records the exception once (span.record_exception, "
            f"or the span's own record_exception, not both); got {[dict(e.attributes or {}) for e in recorded]}",
        )
    if path.endswith("/stock"):
        (sent,) = warehouse.requests
        parent = spans_by_id(exporter).get(int(TRACEPARENT.fullmatch(sent.headers["traceparent"])[2], 16))
        assert parent is not None and parent.kind in (SpanKind.SERVER, SpanKind.CLIENT), explain(
            response,
            "the call to the warehouse names as its parent the server span or a span of kind CLIENT around the call; "
            f"got {parent.kind.name if parent is not None else 'no span of this service'}",
        )
        assert parent.status.status_code == StatusCode.ERROR, explain(
            response, f"the warehouse answered 503: the span of the call is marked ERROR; got {parent.status.status_code.name}"
        )
        if parent.kind == SpanKind.CLIENT:
            got = (parent.attributes or {}).get("http.response.status_code")
            assert got == 503, explain(
                response, f"the client span of the call carries the warehouse's http.response.status_code 503; got {got!r}"
            )


# The statuses each operation of the OpenAPI document lists (every route: 422, from create_app's FastAPI(responses=...)).
DOCUMENTED = {
    ("/ready", "get"): {"200", "422", "503"},
    ("/items/{item_id}", "get"): {"200", "404", "422"},
    ("/items/{item_id}/stock", "get"): {"200", "404", "422", "502"},
}


def expect_documented(client, operations: dict) -> dict:
    response = client.get("/openapi.json")
    document = json_of(response)
    schemas = document.get("components", {}).get("schemas", {})
    problems = []
    for (path, method), codes in operations.items():
        answers = document.get("paths", {}).get(path, {}).get(method, {}).get("responses", {})
        for code in sorted(codes - set(answers)):
            problems.append(f"{method.upper()} {path} does not document {code}")
        for code in sorted(c for c in codes & set(answers) if c.startswith(("4", "5"))):
            schema = answers[code].get("content", {}).get("application/problem+json", {}).get("schema", {})
            schema = schemas.get(schema.get("$ref", "").rsplit("/", 1)[-1], schema)
            if not {"type", "title", "status", "detail", "instance"} <= set(schema.get("properties", {})):
                problems.append(f"{method.upper()} {path} documents {code} without a problem's schema under application/problem+json")
    assert not problems, explain(
        response, "every status each route can answer, errors as problems (responses=problem_responses(...)):\n    "
        + "\n    ".join(problems),
    )
    return document


@pytest.mark.task("health")
@pytest.mark.promise("P10")
def test_ready_documents_its_503_as_a_problem(module):
    with TestClient(new_app(module)) as client:
        expect_documented(client, {key: value for key, value in DOCUMENTED.items() if key[0] == "/ready"})


@pytest.mark.task("tracing")
@pytest.mark.promise("P10")
def test_the_item_routes_document_their_errors_as_problems(module):
    with TestClient(new_app(module)) as client:
        expect_documented(client, {key: value for key, value in DOCUMENTED.items() if key[0].startswith("/items")})


@pytest.mark.task("metrics")
@pytest.mark.promise("P4")
def test_metrics_are_not_part_of_the_api_document(module):
    with TestClient(new_app(module)) as client:
        expect_status(client.get("/metrics"), 200, "/metrics serves the metrics")
        response = client.get("/openapi.json")
    paths = set(json_of(response).get("paths", {}))
    assert "/metrics" not in paths, explain(
        response, "/metrics is for Prometheus, not part of the API a client is offered: include_in_schema=False"
    )

# ---------------------------------------------------------------------------------------
# The warehouse's answer is read no further than warehouse_max_bytes (P11)
# ---------------------------------------------------------------------------------------

WAREHOUSE_DEFAULT_LIMIT = 65_536


def stock_of(size: int) -> bytes:
    """Item 3's stock as JSON of exactly `size` bytes (blanks before the closing brace)."""
    start = b'{"item_id": 3, "quantity": 7'
    return start + b" " * (size - len(start) - 1) + b"}"


def in_chunks(body: bytes, size: int) -> list[bytes]:
    return [body[at:at + size] for at in range(0, len(body), size)]


def get_stock(module, warehouse: Streaming):
    """GET /items/3/stock from a new app; the response, its spans and the service's log lines."""
    app, exporter = traced_app(module, transport=warehouse)
    handler = JsonLines(module.JsonFormatter())
    service = logging.getLogger("inventory")
    with TestClient(app, raise_server_exceptions=False) as client:
        service.addHandler(handler)  # after startup: the lifespan sets the logger's own handlers
        try:
            response = client.get("/items/3/stock")
        finally:
            service.removeHandler(handler)
    return response, exporter, handler.lines


@pytest.mark.task("settings")
@pytest.mark.promise("P1", "P11")
def test_warehouse_max_bytes_is_a_setting(module, env):
    settings = module.Settings()
    got = getattr(settings, "warehouse_max_bytes", "no such field")
    assert got == WAREHOUSE_DEFAULT_LIMIT and isinstance(got, int), (
        f"\nexpected: Settings().warehouse_max_bytes is {WAREHOUSE_DEFAULT_LIMIT} (an int) when OBS_WAREHOUSE_MAX_BYTES is unset"
        f"\ngot:      {got!r}"
    )
    for value, limit in (("1", 1), ("16777216", 16_777_216)):  # the smallest and the largest allowed
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", value)
        got = getattr(module.Settings(), "warehouse_max_bytes", "no such field")
        assert got == limit, f"\nset:      OBS_WAREHOUSE_MAX_BYTES={value} (allowed: 1 to 16777216)\ngot:      {got!r}"
    for value in ("0", "16777217", "many", "1e3"):
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", value)
        with pytest.raises(ValidationError):
            module.Settings()
            pytest.fail(
                f"\nset:      OBS_WAREHOUSE_MAX_BYTES={value}\nexpected: a ValidationError (an int from 1 to 16777216)"
                "\ngot:      Settings() accepted it",
                pytrace=False,
            )


@pytest.mark.task("tracing")
@pytest.mark.promise("P9", "P11")
@pytest.mark.parametrize(("limit", "chunk"), [(None, 4096), (64, 8)], ids=["default", "64"])
def test_an_answer_of_exactly_the_limit_is_served(module, env, limit, chunk):
    if limit is not None:
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", str(limit))
    size = limit or WAREHOUSE_DEFAULT_LIMIT
    response, _, _ = get_stock(module, Streaming(in_chunks(stock_of(size), chunk)))
    expect_json(response, {"item_id": 3, "quantity": 7},
                f"the warehouse's answer is {size} bytes, exactly warehouse_max_bytes: it is read and served", exact=True)


@pytest.mark.task("tracing")
@pytest.mark.promise("P6", "P9", "P10", "P11")
@pytest.mark.parametrize(("limit", "chunk"), [(None, 4096), (64, 8)], ids=["default", "64"])
def test_one_byte_past_the_limit_is_a_502_that_says_why(module, env, limit, chunk):
    if limit is not None:
        env.setenv("OBS_WAREHOUSE_MAX_BYTES", str(limit))
    size = (limit or WAREHOUSE_DEFAULT_LIMIT) + 1
    warehouse = Streaming(in_chunks(stock_of(size), chunk))
    response, exporter, lines = get_stock(module, warehouse)
    why = f"the warehouse's answer is {size} bytes, one more than warehouse_max_bytes"
    expect_problem(response, 502, f"{why}: a 502 problem")
    assert "warehouse_max_bytes" not in response.text, explain(
        response, "the cause goes to the log, never to the client: the problem does not name the setting"
    )

    sent = [request.headers.get("traceparent") or "" for request in warehouse.requests]
    match = TRACEPARENT.fullmatch(sent[0]) if len(sent) == 1 else None
    assert match is not None, explain(response, f"one call to the warehouse carrying a W3C traceparent; got {sent}")
    caller = [span for span in exporter.get_finished_spans() if format_span_id(span.context.span_id) == match[2]]
    assert caller and caller[0].status.status_code == StatusCode.ERROR, explain(
        response,
        f"{why}: the span the call to the warehouse names as its parent ({match[2]}) is ended with status ERROR; "
        f"got {[(span.name, span.status.status_code.name) for span in caller] or 'no such span ended'}",
    )

    expect_a_warning_naming(lines, response, "warehouse_max_bytes", why)


@pytest.mark.task("tracing")
@pytest.mark.promise("P9", "P11")
def test_an_endless_answer_is_cut_off_after_the_limit(module, env):
    env.setenv("OBS_WAREHOUSE_MAX_BYTES", "64")
    chunks = [b'{"item_id": 3, "quantity": 7'] + [b" " * 64] * 100_000  # 6.4 MB of blanks, never a "}"
    warehouse = Streaming(chunks)
    response, _, _ = get_stock(module, warehouse)
    expect_problem(response, 502, "the warehouse's answer goes on far past warehouse_max_bytes (64): a 502 problem")
    pulled = [answer.pulled for answer in warehouse.answers]
    # The limit is passed at the 2nd chunk; reading ahead a little is allowed, reading on is not.
    assert len(pulled) == 1 and pulled[0] <= 100, explain(
        response,
        "the answer is read as it streams in (client.stream, aiter_bytes) and no further than one byte past "
        f"warehouse_max_bytes (64 bytes here, passed at the 2nd of {len(chunks)} chunks of at most 64 bytes); "
        f"the service pulled {pulled} chunks",
    )
