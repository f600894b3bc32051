"""The differential grader (grader.differential): a tiny reference and tiny wrong apps side by side."""

import importlib.util
import os
import stat
from dataclasses import replace
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from grader import differential
from grader.catalog import all_exercises
from grader.loader import load_module
from grader.zygote import reference_files, write_reference

from .conftest import ROOT


class Note(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=10)
    stars: int = Field(ge=1, le=5)


def build(*, off_by_one: bool = False, delete_forgets: bool = False, greeting: str = "Hello",
          token: str = "fixed", crash_on_zero: bool = False, key_any_case: bool = False) -> SimpleNamespace:
    """A fresh module-like namespace holding an app; the keyword arguments make it wrong."""
    app = FastAPI()
    items = {1: {"id": 1, "name": "pen"}, 2: {"id": 2, "name": "ink"}}

    @app.get("/greet/{name}")
    async def greet(name: str) -> dict:
        return {"message": f"{greeting}, {name}!", "token": token}

    @app.get("/double")
    async def double(n: int = Query(ge=0, le=100)) -> dict:
        if crash_on_zero and n == 0:
            raise ValueError("zero")
        return {"result": 2 * n}

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict:
        if item_id not in items:
            raise HTTPException(404, f"Item {item_id} not found")
        return items[item_id]

    @app.delete("/items/{item_id}", status_code=204)
    async def delete(item_id: int) -> None:
        if item_id not in items:
            raise HTTPException(404, "gone")
        if not delete_forgets:
            del items[item_id]

    @app.post("/notes", status_code=201)
    async def note(body: Note) -> dict:
        if off_by_one and body.stars == 5:
            raise HTTPException(422, "too many stars")
        return {"text": body.text, "stars": body.stars}

    @app.get("/secret")
    async def secret(x_api_key: str = Header()) -> dict:
        if (x_api_key.lower() if key_any_case else x_api_key) != "s3cret":
            raise HTTPException(401, "Unknown key")
        return {"secret": 42}

    return SimpleNamespace(app=app, ITEMS=items, create_app=lambda: app)


TABLE = {
    "free": ["$.token"],
    "requests": 30,
    "operations": {
        "GET /greet/{name}": {"task": "greet", "values": {"name": ["Ada", "zoë"]}},
        "GET /double": {"task": "maths"},
        "GET /items/{item_id}": {"task": "items", "values": {"item_id": [1, 2, 3]}},
        "DELETE /items/{item_id}": {"task": "items", "values": {"item_id": [1, 2, 3]}},
        "POST /notes": {"task": "notes", "examples": [{"text": "hi", "stars": 3}]},
        "GET /secret": {"task": "keys", "values": {"x-api-key": ["s3cret", "S3CRET", ""]}},
    },
}


def run(table: dict = TABLE, **wrong) -> differential.Session:
    promises = differential.Promises.parse(table)
    session = differential.Session(lambda: build(**wrong), lambda: build(), promises,
                                   state=lambda module: module.ITEMS)
    session.run()
    return session


def failure(session: differential.Session, task: str) -> str:
    with pytest.raises(pytest.fail.Exception) as caught:
        session.check(task)
    return str(caught.value)


def test_identical_apps_pass_every_task():
    session = run()
    assert not session.differences and not session.broken
    for task in ("greet", "maths", "items", "notes", "keys"):
        session.check(task)
        assert session.compared[task] > 0


def test_a_difference_names_the_request_both_answers_and_where():
    session = run(greeting="Hi")
    message = failure(session, "greet")
    assert "GET /greet/" in message
    assert '"message":"Hello, ' in message and '"message":"Hi, ' in message
    assert "$.message" in message
    session.check("maths")  # the other tasks are not blamed


def test_free_fields_are_not_compared_but_must_be_there():
    run(token="random-bytes").check("greet")
    table = {**TABLE, "free": []}
    assert "$.token" in failure(run(table, token="random-bytes"), "greet")


def test_a_bound_off_by_one_is_found_and_shrunk_to_one_request():
    session = run(off_by_one=True)
    message = failure(session, "notes")
    assert '"stars": 5' in message and "201" in message and "422" in message
    difference = next(iter(session.differences.values()))
    assert len(difference.requests) == 1


def test_a_stateful_mistake_is_shown_as_the_shortest_sequence():
    session = run(delete_forgets=True)
    message = failure(session, "items")
    difference = next(d for d in session.differences.values() if d.input.task == "items")
    methods = [request.method for request in difference.requests]
    # a delete that removes nothing shows in the stored state at once, or on a later read
    assert methods[0] == "DELETE" and len(methods) <= 2, message
    assert "stored" in message or "GET /items/" in message


def test_header_parameters_are_sent_and_shown():
    message = failure(run(key_any_case=True), "keys")
    assert "GET /secret" in message and "x-api-key: S3CRET" in message


def test_an_app_built_by_a_factory():
    promises = differential.Promises.parse(TABLE)
    session = differential.Session(lambda: build(greeting="Hi"), lambda: build(), promises, app="create_app()")
    session.run()
    assert "$.message" in failure(session, "greet")


def test_a_crash_is_reported_as_one():
    message = failure(run(crash_on_zero=True), "maths")
    assert "raised ValueError: zero" in message and "GET /double?n=0" in message


def test_what_the_reference_itself_cannot_answer_is_not_compared():
    promises = differential.Promises.parse(TABLE)
    session = differential.Session(lambda: build(), lambda: build(crash_on_zero=True), promises)
    session.run()
    assert not session.differences
    assert any("n=0" in request.show() for request, _ in session.reference_failures)


def test_free_errors_may_be_there_or_not():
    promises = differential.Promises.parse({"operations": {}, "free_errors": [{"loc": ["body"], "type": "value_error"}]})
    field = b'{"loc":["body","a"],"msg":"x","type":"missing"}'
    one = differential.Answer(422, {}, b'{"detail":[' + field + b']}')
    other = differential.Answer(422, {}, b'{"detail":[' + field + b',{"loc":["body"],"msg":"no match","type":"value_error"}]}')
    missing = differential.Answer(422, {}, b'{"detail":[{"loc":["body"],"msg":"x","type":"missing"}]}')
    assert differential.compare(one, other, promises) == ""
    assert differential.compare(one, missing, promises) != ""


def test_422_bodies_compare_where_the_errors_are_not_their_wording():
    promises = differential.Promises.parse({"operations": {}})
    one = differential.Answer(422, {"content-type": "application/json"},
                              b'{"detail":[{"loc":["body","stars"],"msg":"too big","type":"x"}]}')
    other = differential.Answer(422, {"content-type": "application/json"},
                                b'{"detail":[{"loc":["body","stars"],"msg":"Input should be <= 5","type":"y","input":6}]}')
    elsewhere = differential.Answer(422, {"content-type": "application/json"},
                                    b'{"detail":[{"loc":["body"],"msg":"too big","type":"x"}]}')
    assert differential.compare(one, other, promises) == ""
    assert "detail" in differential.compare(one, elsewhere, promises)
    exact = differential.Promises.parse({"operations": {}, "validation": "exact"})
    assert differential.compare(one, other, exact) != ""


def test_422_errors_inside_an_error_body_of_the_exercises_own():
    promises = differential.Promises.parse({"operations": {}, "validation_at": "$.error.details", "free": ["$.error.message"]})

    def answer(code: str, loc: str, msg: str) -> differential.Answer:
        return differential.Answer(422, {}, ('{"error":{"code":"%s","message":"%s","details":[{"loc":["body","%s"],'
                                             '"msg":"%s","type":"x"}]}}' % (code, msg, loc, msg)).encode())

    one = answer("validation_error", "price", "too big")
    assert differential.compare(one, answer("validation_error", "price", "Input should be <= 5"), promises) == ""
    assert "details" in differential.compare(one, answer("validation_error", "name", "too big"), promises)
    assert "$.error.code" in differential.compare(one, answer("invalid", "price", "too big"), promises)


def test_a_location_header_may_be_absolute_on_the_host_the_request_reached():
    promises = differential.Promises.parse({"operations": {}, "headers": ["location"]})
    path = differential.Answer(201, {"location": "/items/1"}, b"{}")
    absolute = differential.Answer(201, {"location": "http://testserver/items/1"}, b"{}")
    elsewhere = differential.Answer(201, {"location": "http://evil.example/items/1"}, b"{}")
    other = differential.Answer(201, {"location": "/items/2"}, b"{}")
    assert differential.compare(path, absolute, promises) == ""
    assert "location" in differential.compare(path, elsewhere, promises)
    assert "location" in differential.compare(path, other, promises)
    assert "location" in differential.compare(path, differential.Answer(201, {}, b"{}"), promises)


def test_a_free_header_must_be_there_whatever_its_value():
    promises = differential.Promises.parse({"operations": {}, "free_headers": ["X-Request-ID"]})
    one = differential.Answer(200, {"x-request-id": "4bf92f3577b34da6a3ce929d0e0e4736"}, b"{}")
    other = differential.Answer(200, {"x-request-id": "req-1"}, b"{}")
    assert differential.compare(one, other, promises) == ""
    assert "x-request-id" in differential.compare(one, differential.Answer(200, {}, b"{}"), promises)
    assert "x-request-id" in differential.compare(differential.Answer(200, {}, b"{}"), one, promises)


def test_values_the_readme_leaves_free_are_never_sent():
    import random

    table = {"operations": {"POST /notes": {"task": "notes", "free_values": {"stars": [True, "3"]}}}}
    promises = differential.Promises.parse(table)
    generator = differential.Generator(build().app.openapi(), promises, random.Random(1))
    stars = generator.pools["POST /notes", "stars"]
    assert {0, 1, 5, 6} <= {v for v in stars if type(v) is int}  # the schema's edges are still sent
    assert not differential._among(True, stars) and not differential._among("3", stars)
    assert differential._among(42, generator.pools["POST /notes", "text"])  # other inputs keep their pools


def test_paths_free_in_the_answers_of_one_status_only():
    promises = differential.Promises.parse({"operations": {}, "free_by_status": {"409": ["$.detail"]}})

    def answer(status: int, detail: str) -> differential.Answer:
        return differential.Answer(status, {}, ('{"detail":"%s"}' % detail).encode())

    assert differential.compare(answer(409, "name taken"), answer(409, "duplicate"), promises) == ""
    assert "$.detail" in differential.compare(answer(404, "Author 1 not found"), answer(404, "missing"), promises)
    assert "status" in differential.compare(answer(409, "x"), answer(404, "x"), promises)
    with pytest.raises(ValueError):
        differential.Promises.parse({"operations": {}, "free_by_status": {"conflict": ["$.detail"]}})


def test_ignored_and_free_paths():
    promises = differential.Promises.parse({"operations": {}, "ignore": ["$..created_at"], "free": ["$.items[*].id"]})
    body = {"items": [{"id": 7, "created_at": 1}], "created_at": 2}
    assert differential.normalise(body, promises, 200) == {"items": [{"id": differential.FREE}]}


def test_the_declaration_is_checked():
    with pytest.raises(ValueError, match="unknown key"):
        differential.Promises.parse({"operation": {}})
    with pytest.raises(ValueError, match="needs a task"):
        differential.Promises.parse({"operations": {"GET /x": {}}})
    with pytest.raises(ValueError, match="is not an operation"):
        differential.Promises.parse({"operations": {"/x": {"task": "t"}}})
    declared = differential.Promises.parse({"operations": {"GET /x": {"task": "t", "promises": ["P1", "P3"]}}})
    assert declared.operations["GET /x"].promises == ("P1", "P3")


def test_values_from_a_schema_include_the_edges_and_one_past_them():
    import random

    values = differential.pool({"type": "integer", "minimum": 13, "maximum": 120}, {}, random.Random(1))
    assert {13, 12, 120, 121} <= set(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    text = differential.pool({"type": "string", "pattern": "^[a-z][a-z0-9_]{2,19}$"}, {}, random.Random(1))
    assert any(isinstance(v, str) and 3 <= len(v) <= 20 and v[0].isalpha() and v.islower() for v in text)


# --------------------------------------------------------------------------- the course's declarations


def _quick_hashing(module) -> None:
    """02's given hash_password is slow on purpose (scrypt); no answer shows a hash."""
    if callable(getattr(module, "hash_password", None)):
        module.hash_password = lambda password: "scrypt$quick$" + password[::-1]


DECLARED = [exercise for exercise in all_exercises(ROOT) if "differential" in exercise.extra]


def _session_options(exercise) -> dict:
    """How the exercise's own differential suite builds its apps: ``SESSION_OPTIONS`` in its
    test_differential.py (an app built by a factory with settings, say), else the defaults."""
    path = exercise.folder / "test_differential.py"
    spec = importlib.util.spec_from_file_location(f"_course_differential_{exercise.name}", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return getattr(suite, "SESSION_OPTIONS", None) or {"prepare": _quick_hashing}


@pytest.mark.parametrize("exercise", DECLARED, ids=lambda e: e.name)
def test_every_operation_of_the_reference_is_declared_or_skipped(exercise):
    promises = differential.Promises.parse(exercise.extra["differential"], exercise.name)
    module = load_module(exercise.solution_folder, exercise.editable[0])
    session = differential.Session(lambda: module, lambda: module, promises, **_session_options(exercise))
    assert not differential.undeclared(session.app_of(module, "the reference's").openapi(), promises), (
        "add each operation to [differential.operations] (with its task) or to skip, with the reason in a comment")
    tasks = {task.id for task in exercise.tasks}
    assert set(promises.tasks()) <= tasks, f"tasks exercise.toml does not define: {set(promises.tasks()) - tasks}"


@pytest.mark.parametrize("exercise", DECLARED, ids=lambda e: e.name)
def test_the_reference_answers_every_generated_request(exercise):
    """A request the reference cannot answer (a 5xx) is one the differential suite cannot grade."""
    promises = differential.Promises.parse(exercise.extra["differential"], exercise.name)
    session = differential.Session(lambda: load_module(exercise.solution_folder, exercise.editable[0]),
                                   lambda: load_module(exercise.solution_folder, exercise.editable[0]), promises,
                                   **_session_options(exercise))
    session.run()
    assert not session.broken and not session.differences
    assert not session.reference_failures, [(r.show(), a.show()) for r, a in session.reference_failures[:3]]
    assert set(session.compared) == set(promises.tasks()), "every task's inputs are compared"


# --------------------------------------------------------------------------- class grading


def test_class_grading_hands_a_run_only_its_exercises_reference(tmp_path):
    files = reference_files(str(ROOT), "01_async_routes")
    assert set(files) == {"app.py"}
    assert files["app.py"] == (ROOT / "solutions" / "01_async_routes" / "app.py").read_text(encoding="utf-8")
    assert reference_files(str(ROOT), "09_testing") == {}  # no [differential] table: nothing leaves solutions/
    folder = tmp_path / "run-reference"
    write_reference(files, str(folder))
    assert stat.S_IMODE(os.stat(folder / "app.py").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o555
    os.chmod(folder, 0o755)  # let tmp_path be cleaned up


def build_things(*, forgets: bool = False) -> SimpleNamespace:
    """Things with generated ids: the README would leave the id free, not its meaning."""
    import uuid

    app = FastAPI()
    things: dict[str, dict] = {}

    @app.post("/things", status_code=201)
    async def create(body: Note) -> dict:
        thing = {"id": str(uuid.uuid4()), "text": body.text}
        if not forgets:
            things[thing["id"]] = thing
        return thing

    @app.get("/things/{thing_id}")
    async def read(thing_id: str) -> dict:
        if thing_id not in things:
            raise HTTPException(404, "No such thing")
        return things[thing_id]

    return SimpleNamespace(app=app)


THINGS = {
    "free": ["$.id"],
    "requests": 20,
    "operations": {
        "POST /things": {"task": "create", "examples": [{"text": "hi", "stars": 3}]},
        "GET /things/{thing_id}": {"task": "read"},
    },
}


def test_free_ids_are_followed_from_one_request_to_the_next():
    promises = differential.Promises.parse(THINGS)
    session = differential.Session(lambda: build_things(), lambda: build_things(), promises)
    session.run()
    assert not session.differences
    # the reads found what was created, through each app's own id
    assert session.compared["read"] > 0
    wrong = differential.Session(lambda: build_things(forgets=True), lambda: build_things(), promises)
    wrong.run()
    message = failure(wrong, "read")
    assert "POST /things" in message and "GET /things/" in message and "404" in message


def build_shop(first_id: int = 1) -> SimpleNamespace:
    """An app that starts with data (as 01 starts with ITEMS); ``first_id`` other than 1 is wrong."""
    app = FastAPI()
    items = {1: {"id": first_id, "name": "pen"}, 2: {"id": 2, "name": "ink"}}

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict:
        if item_id not in items:
            raise HTTPException(404, f"Item {item_id} not found")
        return items[item_id]

    @app.delete("/items/{item_id}", status_code=204)
    async def delete(item_id: int) -> None:
        if items.pop(item_id, None) is None:
            raise HTTPException(404, f"Item {item_id} not found")

    return SimpleNamespace(app=app)


@pytest.mark.parametrize("seed", range(6))
def test_what_the_app_starts_with_is_read_before_anything_is_deleted(seed):
    # The sweep is shuffled: on some seeds the delete of item 1 comes before the read of item 1.
    # An id the README promises (here: of the data the app starts with) is compared whatever the
    # order, with no stored state to read. (Free ids: test_free_fields_are_not_compared_but_must_be_there.)
    table = {"seed": seed, "requests": 10, "operations": {
        "GET /items/{item_id}": {"task": "read", "values": {"item_id": [1, 2, 3]}},
        "DELETE /items/{item_id}": {"task": "delete", "values": {"item_id": [1, 2, 3]}},
    }}
    wrong = differential.Session(lambda: build_shop(first_id=7), lambda: build_shop(), differential.Promises.parse(table))
    wrong.run()
    message = failure(wrong, "read")
    assert "GET /items/1" in message and "$.id: 1 in the reference's answer, 7 in yours" in message, message


def build_login(*, anyone_is_alice: bool = False, accepts_junk: bool = False) -> SimpleNamespace:
    """A form login that hands out random tokens, and a route that needs one: each app knows only its own."""
    import uuid

    from fastapi import Depends, Form
    from fastapi.security import OAuth2PasswordBearer

    app = FastAPI()
    scheme = OAuth2PasswordBearer(tokenUrl="login")
    tokens: dict[str, str] = {}

    @app.post("/login")
    async def login(username: str = Form(), password: str = Form()) -> dict:
        if password != f"{username}-pw":
            raise HTTPException(401, "Wrong password", headers={"WWW-Authenticate": "Bearer"})
        token = uuid.uuid4().hex
        tokens[token] = username
        return {"token": token, "user": username}

    @app.get("/me")
    async def me(token: str = Depends(scheme)) -> dict:
        if token not in tokens and not (accepts_junk and token == "not-a-jwt"):
            raise HTTPException(401, "Who are you?", headers={"WWW-Authenticate": "Bearer"})
        return {"user": "alice" if anyone_is_alice else tokens.get(token, "alice")}

    return SimpleNamespace(made=lambda: app)


LOGIN = {
    "free": ["$.token"],
    "requests": 30,
    "bearer": {"token": "$.token", "values": ["Bearer not-a-jwt"], "task": "tokens"},
    "operations": {
        "POST /login": {"task": "login", "examples": [{"username": "ada", "password": "ada-pw"},
                                                       {"username": "bob", "password": "bob-pw"}]},
        "GET /me": {"task": "me"},
    },
}


def test_form_bodies_and_bearer_tokens_each_app_gets_its_own():
    promises = differential.Promises.parse(LOGIN)
    assert promises.tasks() == ["login", "tokens", "me"]
    made = differential.Session(lambda: build_login(), lambda: build_login(), promises, app=lambda module: module.made())
    sent: list = []
    original = differential.Pair.send

    def spy(pair, request):
        answers = original(pair, request)
        sent.append((request, answers[0]))
        return answers

    differential.Pair.send = spy
    try:
        made.run()
    finally:
        differential.Pair.send = original
    assert not made.broken and not made.differences, [made.message(d, 1) for d in made.differences.values()]
    logins = [request for request, _ in sent if request.operation == "POST /login"]
    assert logins and all(request.form for request in logins) and "form username=" in logins[0].show()
    # the route that needs a token got one the reference handed out (and the learner's app its own)
    assert any(request.operation == "GET /me" and answer.status == 200 for request, answer in sent)
    assert any(("authorization", "Bearer not-a-jwt") in request.headers for request, _ in sent)
    for wrong, task in ((dict(anyone_is_alice=True), "me"), (dict(accepts_junk=True), "tokens")):
        session = differential.Session(lambda wrong=wrong: build_login(**wrong), lambda: build_login(), promises,
                                       app=lambda module: module.made())
        assert "GET /me" in failure(session, task)


def test_a_free_value_can_be_compared_through_what_the_readme_promises_of_it():
    promises = differential.Promises.parse({"operations": {}, "free": ["$.token"]})
    viewed = replace(promises, views=(("$.token", lambda token: token.count(".")),))
    one = differential.Answer(200, {}, b'{"token": "a.b.c", "n": 1}')
    other = differential.Answer(200, {}, b'{"token": "x.y.z", "n": 1}')
    broken = differential.Answer(200, {}, b'{"token": "xyz", "n": 1}')
    assert differential.compare(one, broken, promises) == ""  # free: not compared
    assert differential.compare(one, other, viewed) == ""
    assert "$.token" in differential.compare(one, broken, viewed)
    with pytest.raises(ValueError, match="must be free"):
        differential.Promises.parse({"operations": {}, "bearer": {"token": "$.token"}})


def build_counted(*, same_id: bool = False) -> SimpleNamespace:
    """Things numbered by a counter the README leaves free; the wrong app answers id 1 for each."""
    app = FastAPI()
    things: dict[int, dict] = {}

    @app.post("/things", status_code=201)
    async def create(body: Note, x_key: str | None = Header(default=None)) -> dict:
        if x_key != "k":
            raise HTTPException(401, "No key")
        thing = {"id": 1 if same_id else 100 + len(things), "text": body.text}
        things[len(things)] = thing
        return thing

    @app.get("/things")
    async def listing() -> list[dict]:
        return list(things.values())

    return SimpleNamespace(app=app)


COUNTED = {
    "ids": ["$.id", "$[*].id"],
    "requests": 10,
    "operations": {
        "POST /things": {"task": "create", "examples": [{"text": "hi", "stars": 3}], "usual": {"x-key": "k"}},
        "GET /things": {"task": "read"},
    },
}


def test_ids_are_free_but_each_names_one_thing():
    promises = differential.Promises.parse(COUNTED)
    assert "$.id" in promises.free  # an id is free…
    session = differential.Session(lambda: build_counted(), lambda: build_counted(), promises)
    session.run()
    assert not session.differences and session.compared["create"] > 1
    # the usual key goes with every request that varies something else
    import random

    generator = differential.Generator(build_counted().app.openapi(), promises, random.Random(1))
    text = next(i for i in generator.inputs if i.name == "text")
    assert all(("x-key", "k") in generator.request(text).headers for _ in range(10))
    wrong = differential.Session(lambda: build_counted(same_id=True), lambda: build_counted(), promises)
    wrong.run()
    message = failure(wrong, "create")
    assert "names two things" in message, message


def build_later(*, delay: float | None) -> SimpleNamespace:
    """A route that hands its work to the event loop, to finish after the response (or, with no
    delay, does it before answering)."""
    import asyncio

    app = FastAPI()
    done: list[str] = []

    async def later(name: str) -> None:
        await asyncio.sleep(delay)
        done.append(name)

    @app.post("/jobs/{name}", status_code=202)
    async def job(name: str) -> dict:
        if delay is None:
            done.append(name)
        else:
            asyncio.get_running_loop().create_task(later(name))  # noqa: RUF006 - the test's point
        return {"queued": name}

    return SimpleNamespace(app=app, DONE=done)


def test_settle_waits_for_the_work_a_request_left_running():
    table = {"requests": 4, "operations": {"POST /jobs/{name}": {"task": "jobs", "values": {"name": ["a", "b"]}}}}
    state = lambda module: list(module.DONE)  # noqa: E731
    for settle, differs in ((True, False), (False, True)):
        promises = differential.Promises.parse(table | {"settle": settle})
        session = differential.Session(lambda: build_later(delay=0.01), lambda: build_later(delay=None), promises,
                                       state=state)
        session.run()
        assert bool(session.differences) is differs, [session.message(d, 1) for d in session.differences.values()]


def test_shrinking_tries_the_accepted_writes_alone_first(monkeypatch):
    import asyncio

    monkeypatch.setattr(differential, "SHRINK_SECONDS", 0)  # no time for cutting chunks: the first tries must do
    promises = differential.Promises.parse(TABLE)
    session = differential.Session(lambda: build(delete_forgets=True), lambda: build(), promises)
    reads = [differential.Request("GET", "/double", [("n", str(n))], operation="GET /double") for n in range(6)]
    refused = differential.Request("DELETE", "/items/7", operation="DELETE /items/{item_id}")
    delete = differential.Request("DELETE", "/items/2", operation="DELETE /items/{item_id}")
    last = differential.Request("GET", "/items/2", operation="GET /items/{item_id}")
    history = [*reads[:3], refused, delete, *reads[3:], last]
    session.refused.add(id(refused))
    session.loop = asyncio.new_event_loop()
    try:
        pair = differential.Pair(session)
        for request in history:
            answers = pair.send(request)
        pair.close()
        observed = (*answers, differential.compare(*answers, promises), None)
        assert observed[2]  # 404 from the reference, 200 from the app that forgets
        target = differential.Input("GET /items/{item_id}", "", "", "items")
        difference = session._shrink(history, target, observed)
    finally:
        session.loop.close()
    assert difference.requests == [delete, last]


def test_all_the_shrinking_of_a_run_has_one_budget(monkeypatch):
    monkeypatch.setattr(differential, "SHRINK_BUDGET", 0.0)  # spent: no more chunks are cut
    session = run(delete_forgets=True, off_by_one=True, greeting="Hi")
    assert len(session.differences) >= 3 and session.shrink_spent < 1.0
    assert "GET /greet/" in failure(session, "greet")  # every difference is still reported
