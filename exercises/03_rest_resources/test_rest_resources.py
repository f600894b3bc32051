"""Graded tests for exercise 03. Run: pytest exercises/03_rest_resources"""

from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from grader.expect import expect_header, expect_json, expect_status, explain, json_of


@pytest.fixture
def module(load):
    # Imported once per test run: the README promises that create_app() builds all state.
    return load("app", fresh=False)


@pytest.fixture
def client(module):
    # A new app from create_app() for every test: its own, empty store.
    with TestClient(module.create_app()) as client:
        yield client


def check(condition, response, expected):
    """Fail with the request, the response and what was expected (no traceback to read)."""
    if not condition:
        pytest.fail(explain(response, expected), pytrace=False)


def create(client, name="pen", price=1.5, version="v1"):
    response = client.post(f"/api/{version}/items", json={"name": name, "price": price})
    expect_status(response, 201, f"POST /api/{version}/items creates the item and answers 201 Created")
    return response


def ids_of(items):
    return [item.get("id") for item in items] if isinstance(items, list) else items


# --- create ----------------------------------------------------------------------------


@pytest.mark.task("create")
def test_create_answers_201_with_the_item(client):
    response = create(client, "pen", 1.5)
    expect_json(response, {"id": 1, "name": "pen", "price": 1.5}, "the item, with the id the server chose", exact=True)


@pytest.mark.task("create")
def test_create_sets_a_location_header_that_leads_to_the_item(client):
    create(client, "pen")
    response = create(client, "ink")
    location = expect_header(response, "location", why="a 201 says where the new resource lives")
    check(urlsplit(location).path == "/api/v1/items/2", response, f"a Location with the path /api/v1/items/2, not {location!r}")
    followed = client.get(location)
    expect_json(followed, {"id": 2, "name": "ink"}, "following the Location header finds the new item")


@pytest.mark.task("create")
def test_every_app_starts_with_its_own_empty_store(module):
    first, second = module.create_app(), module.create_app()
    if not (isinstance(first, FastAPI) and isinstance(module.app, FastAPI)):
        pytest.fail("app.py must define create_app() returning a FastAPI application, and app = create_app().", pytrace=False)
    with TestClient(first) as one, TestClient(second) as two:
        create(one, "pen")
        expect_json(
            two.get("/api/v1/items"),
            [],
            "a second app made by create_app() starts empty: create the store inside create_app(), not at module level",
            exact=True,
        )
        expect_json(create(two, "pen"), {"id": 1}, "ids count per app, so the second app's first item is 1 too")


@pytest.mark.task("create")
def test_invalid_item_is_not_created(client):
    for body in ({"name": "", "price": 1}, {"name": "pen", "price": 0}, {"price": 1}):
        expect_status(client.post("/api/v1/items", json=body), 422, "a name must be non-empty and a price above zero")
    expect_json(client.get("/api/v1/items"), [], "nothing was stored", exact=True)


# --- crud ------------------------------------------------------------------------------


@pytest.mark.task("crud")
def test_read_one_item(client):
    create(client, "pen", 2.0)
    expect_json(client.get("/api/v1/items/1"), {"id": 1, "name": "pen", "price": 2.0}, exact=True)


@pytest.mark.task("crud")
def test_put_replaces_the_item(client):
    create(client, "pen", 2.0)
    response = client.put("/api/v1/items/1", json={"name": "fountain pen", "price": 30})
    expect_status(response, 200, "a successful replace answers 200 with the new state")
    expect_json(response, {"id": 1, "name": "fountain pen", "price": 30.0}, exact=True)
    expect_json(client.get("/api/v1/items/1"), {"name": "fountain pen"}, "the change is stored")


@pytest.mark.task("crud")
def test_delete_answers_204_and_the_item_is_gone(client):
    create(client, "pen")
    response = client.delete("/api/v1/items/1")
    expect_status(response, 204, "a successful delete with nothing to return is 204 No Content")
    check(response.content == b"", response, "an empty body: 204 means no content")
    expect_status(client.get("/api/v1/items/1"), 404, "a deleted item is not found any more")


@pytest.mark.task("crud")
def test_missing_item_is_404(client):
    create(client, "pen")
    for method, body in (("GET", None), ("PUT", {"name": "x", "price": 1}), ("DELETE", None)):
        response = client.request(method, "/api/v1/items/42", json=body)
        expect_status(response, 404, f"{method} on an item that does not exist is 404 Not Found")


@pytest.mark.task("crud")
def test_ids_are_never_reused(client):
    create(client, "pen")
    create(client, "ink")
    expect_status(client.delete("/api/v1/items/2"), 204)
    expect_json(
        create(client, "pad"),
        {"id": 3},
        "a new id after a delete: reusing 2 would make old links to the deleted item point at another one",
    )


# --- conflict --------------------------------------------------------------------------


@pytest.mark.task("conflict")
def test_duplicate_name_is_409(client):
    create(client, "Pen")
    response = client.post("/api/v1/items", json={"name": "pen", "price": 9})
    expect_status(response, 409, "'pen' is taken by 'Pen' (names are compared ignoring case): 409 Conflict")
    listing = client.get("/api/v1/items")
    check(ids_of(json_of(listing)) == [1], listing, "only item 1: the duplicate was not stored")


@pytest.mark.task("conflict")
def test_put_to_another_items_name_is_409_but_own_name_is_fine(client):
    create(client, "pen")
    create(client, "ink")
    response = client.put("/api/v1/items/2", json={"name": "PEN", "price": 1})
    expect_status(response, 409, "renaming item 2 to the name of item 1 conflicts")
    response = client.put("/api/v1/items/2", json={"name": "Ink", "price": 4})
    expect_status(response, 200, "an item may keep (or re-case) its own name: compare with the OTHER items only")


# --- errors ----------------------------------------------------------------------------


def expect_error(response, status, code, why, fix="raise your exception class; one exception handler writes this shape for every error"):
    expect_status(response, status, why)
    body = json_of(response)
    error = body.get("error") if isinstance(body, dict) else None
    shaped = (
        isinstance(error, dict)
        and error.get("code") == code
        and isinstance(error.get("message"), str)
        and bool(error.get("message"))
        and set(body) == {"error"}
    )
    check(
        shaped,
        response,
        f'the shared error body {{"error": {{"code": "{code}", "message": "<a sentence>"}}}} and nothing else ({fix})',
    )
    return error


@pytest.mark.task("errors")
def test_not_found_uses_the_error_body(client):
    response = client.get("/api/v1/items/7")
    error = expect_error(response, 404, "item_not_found", "there is no item 7")
    check("7" in error["message"], response, "a message that names the missing id, e.g. 'Item 7 not found'")


@pytest.mark.task("errors")
def test_conflict_uses_the_error_body(client):
    create(client, "pen")
    response = client.post("/api/v1/items", json={"name": "pen", "price": 1})
    expect_error(response, 409, "duplicate_item", "the name is taken")


@pytest.mark.task("errors")
def test_validation_errors_use_the_error_body_with_details(client):
    response = client.post("/api/v1/items", json={"name": "pen", "price": -1})
    expect_status(response, 422, "a negative price is invalid")
    body = json_of(response)
    error = body.get("error") if isinstance(body, dict) else None
    check(
        isinstance(error, dict) and error.get("code") == "validation_error" and bool(error.get("message")),
        response,
        '{"error": {"code": "validation_error", "message": ..., "details": [...]}} (handle RequestValidationError)',
    )
    details = error.get("details")
    about_price = isinstance(details, list) and any("price" in map(str, d.get("loc", [])) for d in details)
    check(about_price, response, "error.details: the list of validation errors (exc.errors()), one of them about 'price'")


@pytest.mark.task("errors")
def test_framework_errors_use_the_error_body(client):
    fix = "the router raises Starlette's HTTPException for these: handle starlette.exceptions.HTTPException"
    response = client.get("/api/v9/nothing-here")
    expect_error(response, 404, "http_404", "the framework's own 404 for an unknown path, in the shared shape", fix)
    response = client.patch("/api/v1/items")
    expect_error(response, 405, "http_405", "the framework's own 405 for a method the path does not allow", fix)


# --- paginate --------------------------------------------------------------------------


@pytest.fixture
def twelve(client):
    for n in range(1, 13):
        create(client, f"item {n:02d}", n)
    return client


@pytest.mark.task("paginate")
def test_list_defaults_to_the_first_ten(twelve):
    response = twelve.get("/api/v1/items")
    body = json_of(response)
    check(
        isinstance(body, list) and ids_of(body) == list(range(1, 11)),
        response,
        "a list of the first 10 items (ids 1..10): limit defaults to 10, offset to 0",
    )


@pytest.mark.task("paginate")
def test_limit_and_offset_select_a_page(twelve):
    response = twelve.get("/api/v1/items", params={"limit": 3, "offset": 4})
    check(ids_of(json_of(response)) == [5, 6, 7], response, "items 5, 6, 7: skip 4, then take 3")
    response = twelve.get("/api/v1/items", params={"limit": 5, "offset": 10})
    check(ids_of(json_of(response)) == [11, 12], response, "items 11, 12: the last page is short")
    response = twelve.get("/api/v1/items", params={"offset": 50})
    expect_json(response, [], "an offset past the end is an empty page, not an error", exact=True)


@pytest.mark.task("paginate")
def test_page_parameters_are_bounded(client):
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "ten"}):
        response = client.get("/api/v1/items", params=params)
        expect_status(response, 422, "limit must be 1..100 and offset 0 or more: Query(ge=..., le=...)")
    expect_status(client.get("/api/v1/items", params={"limit": 100}), 200, "limit=100 is the largest page allowed")


@pytest.mark.task("paginate")
def test_order_is_by_id_and_survives_updates(client):
    for name in ("c", "a", "b"):
        create(client, name)
    expect_status(client.put("/api/v1/items/1", json={"name": "z", "price": 1}), 200)
    response = client.get("/api/v1/items")
    check(
        ids_of(json_of(response)) == [1, 2, 3],
        response,
        "ids [1, 2, 3]: a stable order (by id) that neither names nor updates can shuffle",
    )


# --- versions --------------------------------------------------------------------------


@pytest.mark.task("versions")
def test_v2_lists_in_a_page_envelope(twelve):
    response = twelve.get("/api/v2/items", params={"limit": 5, "offset": 5})
    body = expect_json(response, {"total": 12, "limit": 5, "offset": 5}, "v2 wraps a page in an envelope")
    check(ids_of(body.get("items")) == [6, 7, 8, 9, 10], response, '"items": the page itself, ids 6..10')
    link = body.get("next")
    check(
        isinstance(link, str) and urlsplit(link).path == "/api/v2/items",
        response,
        '"next": the path of the following page, e.g. "/api/v2/items?limit=5&offset=10"',
    )
    followed = twelve.get(link)
    body = expect_json(followed, {"total": 12, "offset": 10, "next": None}, "the last page has next = null")
    check(ids_of(body.get("items")) == [11, 12], followed, "following next gives items 11 and 12")


@pytest.mark.task("versions")
def test_v2_envelope_on_an_empty_store(client):
    expect_json(
        client.get("/api/v2/items"),
        {"items": [], "total": 0, "limit": 10, "offset": 0, "next": None},
        "an empty store is an empty page with total 0",
        exact=True,
    )


@pytest.mark.task("versions")
def test_v1_still_answers_a_plain_list(twelve):
    response = twelve.get("/api/v1/items", params={"limit": 2})
    body = json_of(response)
    check(
        isinstance(body, list) and ids_of(body) == [1, 2],
        response,
        "v1 keeps its contract (a plain list): clients built against v1 must not break when v2 ships",
    )


@pytest.mark.task("versions")
def test_both_versions_serve_the_same_items(client):
    response = create(client, "pen", version="v2")
    location = expect_header(response, "location", why="v2 answers 201 with a Location too")
    check(urlsplit(location).path == "/api/v2/items/1", response, "a v2 Location: /api/v2/items/1")
    expect_json(client.get("/api/v1/items/1"), {"id": 1, "name": "pen"}, "the item created through v2 is visible in v1")
    expect_status(client.delete("/api/v2/items/1"), 204, "v2 deletes too")
    expect_status(client.get("/api/v1/items/1"), 404, "deleted through v2, gone in v1")
    expect_status(client.get("/api/v2/items", params={"limit": 1000}), 422, "v2's limit is bounded like v1's")


# --- docs ------------------------------------------------------------------------------

SUMMARIES = {
    ("/items", "post"): "Create an item",
    ("/items/{item_id}", "get"): "Read an item",
    ("/items/{item_id}", "put"): "Replace an item",
    ("/items/{item_id}", "delete"): "Delete an item",
}
LIST_SUMMARY = {"v1": "List items", "v2": "List items in a page envelope"}
DOCUMENTED_ERRORS = {("/items", "post"): "409", ("/items/{item_id}", "get"): "404", ("/items/{item_id}", "delete"): "404"}


@pytest.mark.task("docs")
def test_operations_have_tags_and_summaries(client):
    response = client.get("/openapi.json")
    paths = json_of(response).get("paths", {})
    problems = []
    for version in ("v1", "v2"):
        for (path, method), summary in {**SUMMARIES, ("/items", "get"): LIST_SUMMARY[version]}.items():
            full = f"/api/{version}{path}"
            operation = paths.get(full, {}).get(method)
            if operation is None:
                problems.append(f"{method.upper()} {full} is missing")
                continue
            if f"items {version}" not in operation.get("tags", []):
                problems.append(f"{method.upper()} {full}: tags {operation.get('tags')} lack 'items {version}'")
            if operation.get("summary") != summary:
                problems.append(f"{method.upper()} {full}: summary {operation.get('summary')!r}, expected {summary!r}")
    check(not problems, response, "every operation tagged by version, with the README's summary:\n    " + "\n    ".join(problems))


@pytest.mark.task("docs")
def test_error_responses_are_documented(client):
    response = client.get("/openapi.json")
    paths = json_of(response).get("paths", {})
    missing = [
        f"{method.upper()} /api/v1{path} does not document {code}"
        for (path, method), code in DOCUMENTED_ERRORS.items()
        if code not in paths.get(f"/api/v1{path}", {}).get(method, {}).get("responses", {})
    ]
    check(not missing, response, "error answers in the docs (responses={409: {'model': ErrorBody}}):\n    " + "\n    ".join(missing))
