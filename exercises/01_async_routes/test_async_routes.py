"""Graded tests for exercise 01. Run: pytest exercises/01_async_routes"""

import asyncio
import contextlib
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from grader.expect import expect_json, expect_status, explain, json_of


# Most tests only read, so they share one app per run; a test that changes the data
# (the delete) asks for `fresh_client` and gets an app of its own.
@pytest.fixture(scope="module")
def app(load):
    return load("app").app


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def fresh_client(load):
    with TestClient(load("app").app) as client:
        yield client


@pytest.mark.task("health")
@pytest.mark.promise("P1")
def test_health_says_ok(client):
    expect_json(client.get("/health"), {"status": "ok"}, exact=True)


@pytest.mark.task("parameters")
@pytest.mark.promise("P2")
def test_greet_uses_the_path_parameter_and_default_greeting(client):
    response = client.get("/greet/Ada")
    expect_status(response, 200, "the route /greet/{name} exists")
    expect_json(response, {"message": "Hello, Ada!"}, exact=True)


@pytest.mark.task("parameters")
@pytest.mark.promise("P2")
def test_greet_takes_an_optional_greeting(client):
    expect_json(client.get("/greet/Grace", params={"greeting": "Hi"}), {"message": "Hi, Grace!"}, exact=True)


@pytest.mark.task("parameters")
@pytest.mark.promise("P2")
@pytest.mark.parametrize(("value", "message"), [("true", "HELLO, ADA!"), ("1", "HELLO, ADA!"), ("false", "Hello, Ada!"), ("0", "Hello, Ada!")])
def test_greet_shout_is_a_real_boolean(client, value, message):
    response = client.get("/greet/Ada", params={"shout": value})
    expect_json(response, {"message": message}, f"shout={value} is parsed as a boolean, so 'false' means no", exact=True)


@pytest.mark.task("parameters")
@pytest.mark.promise("P3")
def test_add_parses_integers(client):
    response = client.get("/add", params={"a": "2", "b": "40"})
    expect_json(response, {"result": 42}, "query values arrive as text; `a: int` makes them numbers", exact=True)


@pytest.mark.task("parameters")
@pytest.mark.promise("P3")
@pytest.mark.parametrize("params", [{"a": "2"}, {"a": "x", "b": "1"}, {"a": "1.5", "b": "1"}])
def test_add_rejects_missing_or_non_integer_values(client, params):
    expect_status(client.get("/add", params=params), 422, "a required integer that is missing or not an integer is a validation error")


@pytest.mark.task("status_codes")
@pytest.mark.promise("P4")
def test_read_item(client):
    expect_json(client.get("/items/2"), {"id": 2, "name": "mouse"}, exact=True)


@pytest.mark.task("status_codes")
@pytest.mark.promise("P4")
def test_missing_item_is_404_with_a_detail(client):
    response = client.get("/items/7")
    expect_status(response, 404, "a resource that does not exist is 404 Not Found, not 200 with null")
    expect_json(response, {"detail": "Item 7 not found"}, exact=True)


@pytest.mark.task("status_codes")
@pytest.mark.promise("P4")
def test_item_id_must_be_an_integer(client):
    expect_status(client.get("/items/abc"), 422, "item_id is declared as int")


@pytest.mark.task("status_codes")
@pytest.mark.promise("P5")
def test_delete_answers_204_and_removes_the_item(fresh_client):
    response = fresh_client.delete("/items/1")
    expect_status(response, 204, "a successful delete with nothing to say is 204 No Content")
    assert response.content == b"", explain(response, "an empty body: 204 means no content")
    expect_status(fresh_client.get("/items/1"), 404, "the deleted item is gone")
    again = fresh_client.delete("/items/1")
    expect_status(again, 404, "deleting it twice finds nothing the second time")
    expect_json(again, {"detail": "Item 1 not found"}, "the same 404 body as GET /items/{item_id} answers", exact=True)


@pytest.mark.task("concurrency")
@pytest.mark.promise("P6")
def test_wait_answers_with_the_time_waited(client):
    expect_json(client.get("/wait", params={"seconds": 0.01}), {"waited": 0.01}, exact=True)
    response = client.get("/openapi.json")
    parameters = json_of(response).get("paths", {}).get("/wait", {}).get("get", {}).get("parameters", [])
    seconds = next((p for p in parameters if p.get("name") == "seconds"), {})
    assert seconds.get("schema", {}).get("default") == 0.1, explain(
        response, "the query parameter `seconds` of GET /wait with the default 0.1"
    )


@pytest.mark.task("concurrency")
@pytest.mark.promise("P6")
@pytest.mark.parametrize("seconds", ["-1", "5", "soon"])
def test_wait_bounds_its_parameter(client, seconds):
    expect_status(client.get("/wait", params={"seconds": seconds}), 422, "seconds must be a number between 0 and 2")


@pytest.mark.task("concurrency")
@pytest.mark.promise("P6")
@pytest.mark.asyncio
async def test_wait_accepts_both_ends_of_its_range(app):
    # 0 and 2 are both allowed. Waiting 2 s for the answer would make every run slower, so the
    # test only checks that seconds=2 is not refused: an accepted request cannot answer before
    # its 2 s are over, while a refusal (422) comes back about as fast as the refusal of 2.001
    # sent beside it. So the test waits for seconds=2 ten times as long as that refusal took
    # (at most 1.5 s, well before an accepted wait could end): an answer by then was a refusal.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/wait", params={"seconds": 0})
        expect_json(response, {"waited": 0}, "seconds=0 is inside the range: both ends are included", exact=True)
        started = time.perf_counter()
        top = asyncio.create_task(client.get("/wait", params={"seconds": 2}))
        try:
            past = await client.get("/wait", params={"seconds": 2.001})
            refusal = time.perf_counter() - started
            expect_status(past, 422, "seconds=2.001 is past the upper end 2")
            done, _ = await asyncio.wait({top}, timeout=min(1.5, 0.2 + 10 * refusal))
            if done:
                expect_json(top.result(), {"waited": 2}, "seconds=2 is inside the range: both ends are included, "
                            "so GET /wait?seconds=2 waits 2 s and answers 200 (use ge= and le=, not gt= or lt=)",
                            exact=True)
        finally:
            top.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await top


# The task's main promise: a blocking wait (time.sleep in `async def`) costs most of its points.
@pytest.mark.task("concurrency", weight=12)
@pytest.mark.promise("P7")
@pytest.mark.asyncio
async def test_waiting_requests_do_not_block_each_other(app):
    # Judged by order and lower bounds, never by an upper bound alone: a busy machine makes
    # everything slower, but it never makes a blocked event loop answer /health first.
    seconds = 0.3
    done: list[str] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def call(path: str, **params: float) -> httpx.Response:
            response = await client.get(path, params=params)
            done.append(path)
            return response

        started = time.perf_counter()
        waits = [asyncio.create_task(call("/wait", seconds=seconds)) for _ in range(5)]
        await asyncio.sleep(0.05)  # the five are waiting now
        try:
            health = await call("/health")
        finally:  # every wait is awaited, even when /health raised: none is left for the garbage collector
            outcomes = await asyncio.gather(*waits, return_exceptions=True)
        elapsed = time.perf_counter() - started
    responses = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        responses.append(outcome)
    for response in responses:
        expect_json(response, {"waited": seconds}, exact=True)
    expect_status(health, 200)
    assert done[0] == "/health", (
        f"\nsent:     five GET /wait?seconds={seconds} at the same time, then GET /health while they wait\n"
        f"expected: /health answers at once, while the five are still waiting\n"
        f"got:      /health answered only after {done.index('/health')} of the waits had finished.\n"
        "A blocking call (time.sleep) inside `async def` freezes the event loop; use `await asyncio.sleep`."
    )
    assert elapsed >= seconds, (
        f"\nsent:     five GET /wait?seconds={seconds} at the same time\n"
        f"expected: each request waits the {seconds} s it asks for\n"
        f"got:      all five answered after {elapsed:.2f} s: the route does not sleep for `seconds`."
    )
    # One after another they would take 1.5 s; together, a little over 0.3 s.
    assert elapsed < 3 * seconds, (
        f"\nsent:     five GET /wait?seconds={seconds} at the same time\n"
        f"expected: all five done in about {seconds} s, because waiting must not block other waits\n"
        f"got:      {elapsed:.2f} s — the waits ran (partly) one after another."
    )


@pytest.mark.task("docs")
@pytest.mark.promise("P8")
def test_openapi_document_describes_the_service(client):
    response = client.get("/openapi.json")
    document = json_of(response)
    info = document.get("info", {})
    assert (info.get("title"), info.get("version")) == ("Hello Microservices", "0.1.0"), explain(
        response, "info.title 'Hello Microservices' and info.version '0.1.0' (set them on FastAPI(...))"
    )
    missing = {"/health", "/greet/{name}", "/add", "/items/{item_id}", "/wait"} - set(document.get("paths", {}))
    assert not missing, explain(response, f"the paths {sorted(missing)} in the document")
    docs = client.get("/docs")
    expect_status(docs, 200, "the interactive docs page")


# Every status code the README's table promises for a route, as the OpenAPI document must list it.
DOCUMENTED = {
    ("get", "/health"): {"200"},
    ("get", "/greet/{name}"): {"200", "422"},
    ("get", "/add"): {"200", "422"},
    ("get", "/items/{item_id}"): {"200", "404", "422"},
    ("delete", "/items/{item_id}"): {"204", "404", "422"},
    ("get", "/wait"): {"200", "422"},
}


@pytest.mark.task("docs")
@pytest.mark.promise("P8")
def test_openapi_document_lists_every_status_code_a_route_answers(client):
    response = client.get("/openapi.json")
    paths = json_of(response).get("paths", {})
    missing = {}
    for (method, path), codes in DOCUMENTED.items():
        documented = set(paths.get(path, {}).get(method, {}).get("responses", {}))
        if codes - documented:
            missing[f"{method.upper()} {path}"] = sorted(codes - documented)
    assert not missing, explain(
        response, f"every status code each route can answer, in its `responses`; missing: {missing}. FastAPI lists the "
        "success and the 422 by itself; a 404 you raise must be declared with `responses={404: {...}}`")
    for method in ("get", "delete"):
        not_found = paths.get("/items/{item_id}", {}).get(method, {}).get("responses", {}).get("404", {})
        schema = not_found.get("content", {}).get("application/json", {}).get("schema", {})
        assert schema, explain(response, f"the 404 of {method.upper()} /items/{{item_id}} with a model for its body "
                                         "(`responses={404: {\"model\": ErrorMessage}}`, ErrorMessage having `detail: str`)")
