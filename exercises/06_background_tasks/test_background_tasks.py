"""Graded tests for exercise 06. Run: pytest exercises/06_background_tasks

Every test builds its own app with create_app(<a fresh temporary outbox folder>). One test talks
to the app through the raw ASGI protocol, to see the moment the response is complete and check
that the welcome message has not been written yet at that moment.
"""

import json
import logging
import re
import shutil
from contextlib import ExitStack, contextmanager

import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from grader.expect import StartupFailed, expect_json, expect_problem, expect_status, explain, json_of

ADA = {"email": "ada@example.com", "name": "Ada"}
BOB = {"email": "bob@example.com", "name": "Bob"}


@pytest.fixture
def module(load):
    # Imported once per run: the README promises that create_app() builds all the state.
    return load(fresh=False)


@pytest.fixture
def outbox(tmp_path):
    return tmp_path / "mail" / "outbox"


def usable(app_or_client):
    """Fail at once, with the reason, when create_app() could not build the app."""
    if isinstance(app_or_client, StartupFailed):
        pytest.fail(app_or_client.message, pytrace=False)
    return app_or_client


def build(module, outbox, sent=None):
    """create_app(outbox), or a StartupFailed that says why not; `sent` describes the call when the argument is not all."""
    sent = sent or f"create_app({'' if outbox is None else repr(str(outbox))})"
    try:
        return module.create_app(outbox)
    except Exception as exc:
        hint = ("\n          (a DeprecationWarning means an outdated idiom: the lesson says what replaced it)"
                if isinstance(exc, DeprecationWarning) else "")
        message = " ".join(str(exc).split())
        return StartupFailed(f"\nsent:     {sent}\nexpected: a FastAPI app"
                       f"\ngot:      {type(exc).__name__}: {message}{hint}")


@pytest.fixture
def app(module, outbox):
    return build(module, outbox)


@pytest.fixture
def client(app):
    if isinstance(app, StartupFailed):
        yield app
        return
    with TestClient(app) as client:  # `with` runs the lifespan: startup before, shutdown after
        yield client


@contextmanager
def started(app, sent, expected):
    """`with TestClient(app) as client`, but a startup that raises fails the test with the reason."""
    with ExitStack() as stack:
        try:
            client = stack.enter_context(TestClient(app))
        except Exception as exc:  # failed outside the except block: no chained traceback to read
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        else:
            error = None
        if error is not None:
            pytest.fail(f"\nsent:     {sent}\nexpected: {expected}"
                        f"\ngot:      {error}, raised by the lifespan's startup", pytrace=False)
        yield client


def messages(outbox):
    """The outbox's messages by file name: {"1.json": {...}}."""
    if not outbox.is_dir():
        return {}
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(outbox.glob("*.json"))}


def post_signup(client, payload):
    """POST /signup; an exception escaping a background task is turned into a lesson."""
    try:
        return client.post("/signup", json=payload)
    except Exception as exc:  # TestClient re-raises what escapes the app, background tasks included
        error = exc
    pytest.fail(
        f"\nsent:     POST /signup {json.dumps(payload)}"
        f"\ngot:      {type(error).__name__}: {error} raised out of the app."
        "\nexpected: the background task catches its own failure and logs it to the 'signup' logger."
        "\n          Under a real server the client already has its 201 when the task runs: an escaping"
        "\n          exception only reaches the server's generic error log, and later tasks are skipped.",
        pytrace=False,
    )


def break_outbox(outbox):
    """Replace the outbox folder by a plain file, so that writing a message into it fails."""
    shutil.rmtree(outbox)
    outbox.write_text("the outbox folder is gone", encoding="utf-8")


def repair_outbox(outbox):
    outbox.unlink()
    outbox.mkdir()


# ---------------------------------------------------------------- after the response


@pytest.mark.task("after_response")
@pytest.mark.promise("P2", "P6", "P7")
def test_signup_answers_201_and_the_welcome_arrives(client, outbox):
    response = post_signup(client, ADA)
    expect_status(response, 201, "a signup creates a user")
    expect_json(response, {"id": 1, **ADA}, exact=True)
    found = messages(outbox)
    assert set(found) == {"1.json"}, (
        f"\nexpected: after the request, the outbox holds exactly one message file, 1.json\ngot:      {sorted(found)}"
        f" in {outbox}"
    )
    message = found["1.json"]
    assert (
        message.get("to") == "ada@example.com" and message.get("subject") == "Welcome, Ada!"
        and isinstance(message.get("body"), str) and message["body"]
    ), (
        f'\nexpected: 1.json holds {{"to": "ada@example.com", "subject": "Welcome, Ada!", "body": "<some text>"}}'
        f"\ngot:      {message}"
    )
    events = json_of(client.get("/events"))
    if not isinstance(events, list) or "welcome sent to ada@example.com" not in events:
        pytest.fail(
            "\nsent:     GET /events after Ada's signup"
            "\nexpected: the event 'welcome sent to ada@example.com', recorded by send_welcome once the message is written"
            f"\ngot:      {events}",
            pytrace=False,
        )


@pytest.mark.task("after_response")
@pytest.mark.promise("P6")
@pytest.mark.asyncio
async def test_the_response_is_complete_before_the_welcome_is_written(app, outbox):
    usable(app)
    body = json.dumps(ADA).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/signup", "raw_path": b"/signup", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("test", 80),
    }
    request_sent = False
    status, at_response_end = None, None

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status, at_response_end
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            at_response_end = sorted(messages(outbox))  # the client has the whole response now

    async with LifespanManager(app):
        await app(scope, receive, send)
        after = sorted(messages(outbox))
    assert status == 201, f"\nsent:     POST /signup {body.decode()}\nexpected: status 201\ngot:      {status}"
    assert at_response_end == [], (
        f"\nsent:     POST /signup {body.decode()}"
        "\nexpected: when the response is complete, the outbox is still empty: the welcome is written by a"
        "\n          background task, after the response"
        f"\ngot:      {at_response_end} already in the outbox, so the client waited for the welcome message"
    )
    assert after == ["1.json"], f"\nexpected: 1.json in the outbox once the request has finished\ngot:      {after}"


@pytest.mark.task("after_response")
@pytest.mark.promise("P3", "P4", "P5")
def test_a_rejected_signup_sends_no_welcome(client, outbox):
    expect_status(post_signup(client, ADA), 201)
    duplicate = post_signup(client, {"email": "ada@example.com", "name": "Ada again"})
    expect_problem(duplicate, 409, "the e-mail address is already registered")
    expect_problem(post_signup(client, {"email": "not-an-email", "name": "X"}), 422, "the e-mail must be valid")
    expect_problem(post_signup(client, {"email": "cy@example.com", "name": ""}), 422, "the name must not be empty")
    expect_problem(
        client.post("/signup", params={"email": "dee@example.com", "name": "Dee"}), 422,
        "the same fields in the query string, with no body: a signup reads them from the JSON body only, since an "
        "e-mail address in the URL is personal data that every access log and proxy on the way would record",
    )
    expect_problem(
        client.post("/signup", content=b'{"email": "eve@example.com", "name": ', headers={"content-type": "application/json"}),
        422, "a body cut off in the middle is not JSON: FastAPI answers 422 (error type json_invalid), not 400",
    )
    assert sorted(messages(outbox)) == ["1.json"], (
        f"\nexpected: only Ada's welcome (1.json): a rejected signup sends nothing\ngot:      {sorted(messages(outbox))}"
    )
    expect_json(
        client.get("/events"),
        ["POST /signup", "welcome sent to ada@example.com"],
        "only Ada's signup: a rejected request runs none of its background tasks, the audit entry included",
        exact=True,
    )


@pytest.mark.task("after_response")
@pytest.mark.promise("P4")
@pytest.mark.parametrize("body, where", [
    (b'{"email": "ada@example.com", "name": 1e309}', "name"),
    (b'{"email": "ada@example.com", "name": NaN}', "name"),
    (b'{"email": "not-an-email", "name": "Ada"}', "email"),
    (b'{"email": "ada@example.com", "name": "Ada"', None),
    (b'{"email": "ada@example.com", "name": "Ad\xe9"}', None),
], ids=["1e309", "NaN", "bad-email", "not-json", "not-utf-8"])
def test_an_invalid_body_is_a_problem_that_never_echoes_it(client, body, where):
    response = client.post("/signup", content=body, headers={"content-type": "application/json"})
    if body.endswith(b'\xe9"}'):
        expect_problem(response, 400, "bytes that are not UTF-8 text: FastAPI cannot even decode the body, and answers 400")
        errors = [{"loc": [], "msg": "", "type": ""}]  # a 400 carries no errors list
    else:
        problem = expect_problem(response, 422, "an invalid body is 422, never 500 (JSON cannot write 1e309 or NaN back)")
        errors = problem.get("errors")
    shapes_ok = isinstance(errors, list) and errors and all(
        isinstance(e, dict) and isinstance(e.get("loc"), list) and isinstance(e.get("msg"), str)
        and isinstance(e.get("type"), str) and not {"input", "ctx"} & set(e) for e in errors)
    assert shapes_ok, (
        f"\nsent:     POST /signup {body!r}\nexpected: \"errors\": a list of {{\"loc\", \"msg\", \"type\"}}, "
        f"never the refused \"input\" (it may be an e-mail address, or a number JSON cannot carry)\ngot:      {errors!r}")
    if where is not None:
        assert any(e["loc"][-1] == where for e in errors), (
            f"\nsent:     POST /signup {body!r}\nexpected: an error located at {where!r}\ngot:      {errors!r}")
    assert "ada@example.com" not in response.text and "not-an-email" not in response.text, (
        f"\nsent:     POST /signup {body!r}\nexpected: no part of the refused body in the answer"
        f"\ngot:      {response.text}")
    expect_status(post_signup(client, BOB), 201)
    expect_json(
        client.get("/events"),
        ["POST /signup", "welcome sent to bob@example.com"],
        f"the refused body ({body!r}) ran none of its tasks; only Bob's signup that followed left events",
        exact=True,
    )


@pytest.mark.task("after_response")
@pytest.mark.promise("P11")
def test_the_openapi_document_lists_every_error_as_a_problem(client):
    response = client.get("/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI document")
    operation = json_of(response).get("paths", {}).get("/signup", {}).get("post", {})
    documented = operation.get("responses", {})
    for code in ("201", "400", "409", "422"):
        assert code in documented, explain(
            response, f"POST /signup documents its {code} (responses=problem_responses(400, 409) on the route; "
            f"the 422 in FastAPI(responses=problem_responses(422))); documented: {sorted(documented)}")
        if code != "201":
            assert "schema" in documented[code].get("content", {}).get("application/problem+json", {}), explain(
                response, f"POST /signup's {code} documented as a problem: its schema under application/problem+json")


# ---------------------------------------------------------------- tasks from a dependency


@pytest.mark.task("dependency")
@pytest.mark.promise("P6", "P7")
def test_the_audit_dependency_and_the_route_share_their_tasks(client):
    expect_status(post_signup(client, ADA), 201)
    expect_status(post_signup(client, BOB), 201)
    expected = ["POST /signup", "welcome sent to ada@example.com", "POST /signup", "welcome sent to bob@example.com"]
    expect_json(
        client.get("/events"),
        expected,
        "each signup: first the audit entry (a task added by the audit dependency), then the welcome "
        "(added by the route) — one BackgroundTasks object, run in the order the tasks were added",
        exact=True,
    )


# ---------------------------------------------------------------- failures


@pytest.mark.task("failures")
@pytest.mark.promise("P8")
def test_a_failing_welcome_leaves_the_response_alone_and_is_logged(client, outbox, caplog):
    usable(client)
    caplog.set_level(logging.INFO, logger="signup")
    break_outbox(outbox)
    response = post_signup(client, ADA)
    expect_status(response, 201, "the user was created; the welcome fails later, after the response")
    expect_json(response, {"id": 1, **ADA}, "the same answer as when the welcome succeeds", exact=True)
    errors = [r for r in caplog.records if r.name == "signup" and r.levelno >= logging.ERROR]
    # Exactly ERROR (the level of logger.exception()): one lost e-mail is an error, not a CRITICAL outage.
    assert any(r.levelno == logging.ERROR and re.search(r"\b1\b", r.getMessage()) and r.exc_info for r in errors), (
        "\nexpected: an ERROR record (not CRITICAL) on the 'signup' logger that names the user's id (1) and carries"
        "\n          the traceback (logger.exception(...) inside the except block)"
        f"\ngot:      {[(r.levelname, r.getMessage(), bool(r.exc_info)) for r in errors] or 'no ERROR record'}"
    )
    leaked = [r.getMessage() for r in caplog.records if "ada@example.com" in r.getMessage()]
    assert not leaked, (
        "\nexpected: no log line carries the e-mail address (personal data: logs are copied and kept far and wide;"
        "\n          name the user's id instead — lesson 06, common mistakes)"
        f"\ngot:      {leaked}"
    )
    expect_json(client.get("/events"), ["POST /signup", "welcome failed for ada@example.com"], exact=True)


@pytest.mark.task("failures")
@pytest.mark.promise("P8")
def test_the_service_goes_on_after_a_failed_welcome(client, outbox):
    usable(client)
    break_outbox(outbox)
    expect_status(post_signup(client, ADA), 201)
    repair_outbox(outbox)
    response = post_signup(client, BOB)
    expect_status(response, 201, "one failed welcome does not break the service")
    expect_json(response, {"id": 2, **BOB}, exact=True)
    assert sorted(messages(outbox)) == ["2.json"], (
        f"\nexpected: Bob's welcome (2.json) once the outbox is back\ngot:      {sorted(messages(outbox))}"
    )


# ---------------------------------------------------------------- lifespan


@pytest.mark.task("lifespan")
@pytest.mark.promise("P1", "P9")
def test_the_outbox_is_prepared_at_startup_not_before(module, app, outbox, tmp_path, monkeypatch):
    usable(app)
    assert not outbox.exists(), (
        f"\nexpected: create_app() touches nothing on disk; the lifespan creates {outbox} at startup"
        "\ngot:      the folder exists before the app started"
    )
    with TestClient(app) as client:
        assert outbox.is_dir(), f"\nexpected: the lifespan's startup creates the outbox folder {outbox} (with parents)"
        expect_status(post_signup(client, ADA), 201)
    # A restart: the lifespan runs again on the same app, and this time the outbox folder is there.
    with started(app, f"a second startup of the same app (a restart), with {outbox} already there",
                 "the app starts again: an outbox folder that exists already is no error") as client:
        expect_json(
            client.get("/events"), [],
            "a restart begins with empty state: the lifespan's startup builds it, not create_app()", exact=True,
        )
    from_env = tmp_path / "from-env" / "outbox"
    monkeypatch.setenv("OUTBOX_DIR", str(from_env))
    with TestClient(usable(build(module, None))):
        assert from_env.is_dir(), (
            f"\nsent:     create_app() with OUTBOX_DIR={from_env}"
            "\nexpected: without an argument, the outbox folder is $OUTBOX_DIR, created at startup"
        )
    monkeypatch.delenv("OUTBOX_DIR")
    monkeypatch.chdir(tmp_path)
    sent = "create_app() with $OUTBOX_DIR unset"
    default = tmp_path / "outbox"
    expected = f"the app starts with the outbox folder 'outbox' ({default})"
    with started(usable(build(module, None, sent)), sent, expected):
        assert default.is_dir(), (
            f"\nsent:     {sent}\nexpected: the outbox folder is 'outbox' in the working directory ({default}),"
            " created at startup"
        )


@pytest.mark.task("lifespan")
@pytest.mark.promise("P10")
def test_shutdown_reports_what_was_delivered(app, outbox, caplog):
    usable(app)
    caplog.set_level(logging.INFO, logger="signup")
    with TestClient(app) as client:
        expect_status(post_signup(client, ADA), 201)
        expect_status(post_signup(client, BOB), 201)
        break_outbox(outbox)
        expect_status(post_signup(client, {"email": "cy@example.com", "name": "Cy"}), 201)
        early = [r.getMessage() for r in caplog.records if r.name == "signup" and "shutdown:" in r.getMessage()]
        assert not early, f"\nexpected: no shutdown report while the app is running\ngot:      {early}"
    summary = [r.getMessage() for r in caplog.records if r.name == "signup" and r.levelno == logging.INFO]
    assert any(re.search(r"\bshutdown: 2 welcome messages sent, 1 failed\b", line) for line in summary), (
        "\nexpected: at shutdown, an INFO record on the 'signup' logger: "
        "'shutdown: 2 welcome messages sent, 1 failed'"
        f"\ngot:      {summary or 'no INFO record'}"
    )


@pytest.mark.task("lifespan")
@pytest.mark.promise("P2", "P9")
def test_each_app_has_its_own_state(module, tmp_path):
    first, second = usable(build(module, tmp_path / "one")), usable(build(module, tmp_path / "two"))
    with TestClient(first) as one, TestClient(second) as two:
        expect_json(post_signup(one, ADA), {"id": 1}, "the first signup of the first app")
        expect_json(
            post_signup(two, ADA), {"id": 1},
            "the same e-mail is new to a second app: state lives on the app (built by its lifespan), not in the module",
        )
        expect_json(two.get("/events"), ["POST /signup", "welcome sent to ada@example.com"], exact=True)
