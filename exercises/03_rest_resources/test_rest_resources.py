"""Graded tests for exercise 03. Run: pytest exercises/03_rest_resources"""

from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from grader.expect import expect_header, expect_json, expect_problem, expect_status, explain, json_of

# Every app here comes from the README's create_app(), in one of three ways:
# - `client`: a new, empty app per test, for a test that counts on a clean state (ids from
#   1, an exact listing);
# - `shared`: one app per run for tests that create items under names no other test uses
#   and find them through the ids the server returned;
# - `catalogue`: one app per run holding items 1..12, which its tests only read (GET).


@pytest.fixture(scope="module")
def module(load):
    # Imported once per test run: the README promises that create_app() builds all state.
    return load("app", fresh=False)


@pytest.fixture
def client(module):
    # A new app from create_app() for every test: its own, empty store.
    with TestClient(module.create_app()) as client:
        yield client


@pytest.fixture(scope="module")
def shared(module):
    with TestClient(module.create_app()) as client:
        yield client


class Catalogue:
    """An app holding items 1..12 ("item 01", price 1 ... "item 12", price 12)."""

    WHY = "this test reads 12 items made that way"

    def __init__(self, client):
        self.client = client
        self.failure = ""
        try:
            for n in range(1, 13):
                response = client.post("/api/v1/items", json={"name": f"item {n:02d}", "price": n})
                if response.status_code != 201:
                    self.failure = explain(response, f"status 201: POST /api/v1/items creates the item ({self.WHY})")
                    return
        except Exception as exc:  # the app raised: fail the tests that need the items, not the fixture
            self.failure = f"POST /api/v1/items raised {type(exc).__name__}: {exc} ({self.WHY})"

    def twelve(self):
        """The client, once the 12 items exist: a failed POST fails the test that asks, not the fixture."""
        if self.failure:
            pytest.fail(self.failure, pytrace=False)
        return self.client


@pytest.fixture(scope="module")
def catalogue(module):
    with TestClient(module.create_app()) as client:
        yield Catalogue(client)


def check(condition, response, expected):
    """Fail with the request, the response and what was expected (no traceback to read)."""
    if not condition:
        pytest.fail(explain(response, expected), pytrace=False)


def create(client, name="pen", price=1.5, version="v1"):
    response = client.post(f"/api/{version}/items", json={"name": name, "price": price})
    expect_status(response, 201, f"POST /api/{version}/items creates the item and answers 201 Created")
    return response


def id_of(response):
    body = json_of(response)
    item_id = body.get("id") if isinstance(body, dict) else None
    check(isinstance(item_id, int), response, 'the created item with the "id" the server chose')
    return item_id


def ids_of(items):
    return [item.get("id") for item in items] if isinstance(items, list) else items


def listing(client):
    """All items of the shared app (it holds far fewer than 100): the response and its list."""
    response = client.get("/api/v1/items", params={"limit": 100})
    items = json_of(response)
    check(
        isinstance(items, list) and all(isinstance(item, dict) for item in items),
        response,
        "a JSON list of items: this test reads the listing to see what was stored",
    )
    return response, items


# --- create ----------------------------------------------------------------------------


@pytest.mark.task("create")
@pytest.mark.promise("P2")
def test_create_answers_201_with_the_item(client):
    response = create(client, "pen", 1.5)
    expect_json(response, {"id": 1, "name": "pen", "price": 1.5}, "the item, with the id the server chose", exact=True)


@pytest.mark.task("create")
@pytest.mark.promise("P2")
def test_create_sets_a_location_header_that_leads_to_the_item(shared):
    create(shared, "pencil")
    response = create(shared, "eraser")
    item_id = id_of(response)
    location = expect_header(response, "location", why="a 201 says where the new resource lives")
    path = f"/api/v1/items/{item_id}"
    check(urlsplit(location).path == path, response, f"a Location with the path {path} (the new item's id), not {location!r}")
    followed = shared.get(location)
    expect_json(followed, {"id": item_id, "name": "eraser"}, "following the Location header finds the new item")


@pytest.mark.task("create")
@pytest.mark.promise("P1")
def test_every_app_starts_with_its_own_empty_store(module, catalogue):
    catalogue.twelve()  # one app made by create_app() that holds items "item 01".."item 12"
    second = module.create_app()
    if not (isinstance(second, FastAPI) and isinstance(module.app, FastAPI)):
        pytest.fail("app.py must define create_app() returning a FastAPI application, and app = create_app().", pytrace=False)
    with TestClient(second) as two:
        expect_json(
            two.get("/api/v1/items"),
            [],
            "a second app made by create_app() starts empty: create the store inside create_app(), not at module level",
            exact=True,
        )
        expect_json(
            create(two, "item 01"),
            {"id": 1},
            "ids and names count per app, so the second app's first item is 1 too (and 'item 01' is free there)",
        )


@pytest.mark.task("create")
@pytest.mark.promise("P3")
def test_invalid_item_is_not_created(shared):
    _, before = listing(shared)
    for body in ({"name": "", "price": 1}, {"name": "free pen", "price": 0}, {"price": 1}):
        expect_status(shared.post("/api/v1/items", json=body), 422, "a name must be non-empty and a price above zero")
    response, after = listing(shared)
    check(after == before, response, f"nothing was stored: the same items as before these POSTs, ids {ids_of(before)}")


# Prices no item may have, written as raw JSON: numbers too large for a float (which Python's
# json module turns into infinity), the NaN/Infinity literals it also accepts, the same as
# strings (Pydantic parses "inf" and "1e309" in a float field), integers far too large, and
# values just past the README's bounds.
NOT_A_PRICE = [
    "1e309", "-1e309", "NaN", "Infinity", "-Infinity", '"inf"', '"-inf"', '"NaN"', '"nan"', '"Infinity"',
    '"1e309"', str(10**400), str(2**63), "1000000.5", "1e7", "0", "-0.0",
]


def post_raw(client, url, body_text, method="POST"):
    return client.request(method, url, content=body_text, headers={"content-type": "application/json"})


@pytest.mark.task("create")
@pytest.mark.promise("P3", "P14")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_infinite_nan_and_huge_prices_are_refused_and_never_stored(shared, version):
    _, before = listing(shared)
    for raw in NOT_A_PRICE:
        body = f'{{"name": "priceless {version} {raw}", "price": {raw}}}'
        response = post_raw(shared, f"/api/{version}/items", body)
        expect_error(
            response, 422, ABOUT_BLANK,
            f"price {raw} is not a finite number from above 0 to 1000000: Field(gt=0, le=..., allow_inf_nan=False)",
            "validate the price in the model; a 500 here means the 422 handler echoed the refused input, "
            "which JSON cannot carry (infinity, NaN): keep only loc, msg and type in errors",
        )
    response, after = listing(shared)
    check(after == before, response, f"none of those items was stored: the same items as before, ids {ids_of(before)}")
    top = create(shared, f"the dearest {version}", 1_000_000, version)
    expect_json(top, {"price": 1_000_000}, "1000000 is the highest price allowed, answered as a JSON number")


@pytest.mark.task("crud")
@pytest.mark.promise("P3", "P8")
def test_a_replacement_with_an_infinite_or_huge_price_changes_nothing(shared):
    item_id = id_of(create(shared, "abacus", 3.0))
    for raw in NOT_A_PRICE:
        response = post_raw(shared, f"/api/v1/items/{item_id}", f'{{"name": "abacus", "price": {raw}}}', "PUT")
        expect_error(response, 422, ABOUT_BLANK, f"PUT with price {raw}: PUT validates with the same rules as POST")
    expect_json(
        shared.get(f"/api/v1/items/{item_id}"), {"id": item_id, "name": "abacus", "price": 3.0},
        "the refused replacements changed nothing", exact=True,
    )


# Ids in the URL that are not an id the API can have: zero and below, past 2147483647, not an
# integer at all, infinity and NaN spelled every way a URL can.
NOT_AN_ID = ["0", "-1", "2147483648", "99999999999999999999", str(10**400), "1e309", "inf", "-inf", "nan", "NaN", "1.5", "1e3"]


@pytest.mark.task("crud")
@pytest.mark.promise("P6")
def test_ids_in_the_url_are_bounded(catalogue):
    for version in ("v1", "v2"):
        for raw in NOT_AN_ID:
            for method, body in (("GET", None), ("PUT", {"name": "unbounded", "price": 1}), ("DELETE", None)):
                response = catalogue.client.request(method, f"/api/{version}/items/{raw}", json=body)
                expect_error(
                    response, 422, ABOUT_BLANK,
                    f"{method} with item_id {raw}: an id is an integer from 1 to 2147483647, anything else is invalid "
                    "(Path(ge=1, le=2147483647)), not a 404 and never a 500",
                )
        response = catalogue.client.get(f"/api/{version}/items/2147483647")
        expect_error(response, 404, ITEM_NOT_FOUND, "2147483647 is a valid id that no item has yet")


# --- crud ------------------------------------------------------------------------------


@pytest.mark.task("crud")
@pytest.mark.promise("P7")
def test_read_one_item(shared):
    item_id = id_of(create(shared, "ruler", 2.0))
    expect_json(shared.get(f"/api/v1/items/{item_id}"), {"id": item_id, "name": "ruler", "price": 2.0}, exact=True)


@pytest.mark.task("crud")
@pytest.mark.promise("P8")
def test_put_replaces_the_item(shared):
    item_id = id_of(create(shared, "ballpoint", 2.0))
    response = shared.put(f"/api/v1/items/{item_id}", json={"name": "fountain pen", "price": 30})
    expect_status(response, 200, "a successful replace answers 200 with the new state")
    expect_json(response, {"id": item_id, "name": "fountain pen", "price": 30.0}, exact=True)
    response = shared.put(f"/api/v1/items/{item_id}", json={"name": "fountain pen", "price": 0})
    why = "a replacement follows the item's rules too: a price above zero, as for POST (PUT takes the same ItemIn)"
    expect_status(response, 422, why)
    expect_json(
        shared.get(f"/api/v1/items/{item_id}"),
        {"id": item_id, "name": "fountain pen", "price": 30.0},
        "the replacement is stored, name AND price, and the refused one changed nothing",
        exact=True,
    )


@pytest.mark.task("crud")
@pytest.mark.promise("P9")
def test_delete_answers_204_and_the_item_is_gone(shared):
    item_id = id_of(create(shared, "scissors"))
    response = shared.delete(f"/api/v1/items/{item_id}")
    expect_status(response, 204, "a successful delete with nothing to return is 204 No Content")
    check(response.content == b"", response, "an empty body: 204 means no content")
    expect_status(shared.get(f"/api/v1/items/{item_id}"), 404, "a deleted item is not found any more")


@pytest.mark.task("crud")
@pytest.mark.promise("P7", "P8", "P9")
def test_missing_item_is_404(shared):
    create(shared, "stapler")
    for method, body in (("GET", None), ("PUT", {"name": "stapler", "price": 1}), ("DELETE", None)):
        response = shared.request(method, "/api/v1/items/4242", json=body)
        why = f"{method} on an item that does not exist is 404 Not Found"
        if method == "PUT":
            why += ", even with a taken name: there is no item to rename, so look it up before checking the name"
        expect_status(response, 404, why)


@pytest.mark.task("crud")
@pytest.mark.promise("P4")
def test_ids_are_never_reused(shared):
    create(shared, "stamp")
    second = id_of(create(shared, "folder"))
    expect_status(shared.delete(f"/api/v1/items/{second}"), 204)
    expect_json(
        create(shared, "binder"),
        {"id": second + 1},
        f"a new id after a delete: reusing {second} would make old links to the deleted item point at another one",
    )


# --- conflict --------------------------------------------------------------------------


@pytest.mark.task("conflict")
@pytest.mark.promise("P4", "P5")
def test_duplicate_name_is_409(shared):
    item_id = id_of(create(shared, "Brush"))
    response = shared.post("/api/v1/items", json={"name": "brush", "price": 9})
    expect_status(response, 409, "'brush' is taken by 'Brush' (names are compared ignoring case): 409 Conflict")
    response, items = listing(shared)
    named = [item.get("id") for item in items if str(item.get("name")).casefold() == "brush"]
    check(named == [item_id], response, f"only item {item_id} is named 'Brush' in any case: the duplicate was not stored")
    expect_json(
        create(shared, "palette"),
        {"id": item_id + 1},
        f"id {item_id + 1}: ids grow by one and the refused duplicate took none; check the name before taking an id",
    )


@pytest.mark.task("conflict")
@pytest.mark.promise("P8")
def test_put_to_another_items_name_is_409_but_own_name_is_fine(shared):
    create(shared, "marker")
    item_id = id_of(create(shared, "crayon"))
    response = shared.put(f"/api/v1/items/{item_id}", json={"name": "MARKER", "price": 1})
    expect_status(response, 409, "renaming 'crayon' to the name of the item 'marker' conflicts")
    response = shared.put(f"/api/v1/items/{item_id}", json={"name": "Crayon", "price": 4})
    expect_status(response, 200, "an item may keep (or re-case) its own name: compare with the OTHER items only")


# --- errors ----------------------------------------------------------------------------

ABOUT_BLANK = "about:blank"
ITEM_NOT_FOUND = "https://course.example/problems/item-not-found"
DUPLICATE_NAME = "https://course.example/problems/duplicate-name"
TITLES = {ITEM_NOT_FOUND: "Item not found", DUPLICATE_NAME: "Name taken"}  # the README's table


def expect_error(response, status, type, why, fix="raise your exception class; one exception handler turns each into a problem"):
    """The README's error contract: a problem (RFC 9457) of this status and type."""
    problem = expect_problem(response, status, f"{why}; {fix}", type=type)
    if type in TITLES:
        check(problem.get("title") == TITLES[type], response, f'"title": "{TITLES[type]}", the fixed title of the problem type {type}')
    return problem


@pytest.mark.task("errors")
@pytest.mark.promise("P13")
def test_not_found_is_a_problem(shared):
    # 7070: an id the shared app never reaches; a correct app creates and removes nothing here.
    for version in ("v1", "v2"):
        for method, body in (("GET", None), ("PUT", {"name": "no such item", "price": 1}), ("DELETE", None)):
            response = shared.request(method, f"/api/{version}/items/7070", json=body)
            problem = expect_error(response, 404, ITEM_NOT_FOUND, f"{method}: there is no item 7070")
            check("7070" in problem["detail"], response, 'a "detail" that names the missing id, e.g. "No item has the id 7070."')


@pytest.mark.task("errors")
@pytest.mark.promise("P13")
def test_conflict_is_a_problem(shared):
    create(shared, "glue")
    item_id = id_of(create(shared, "paste"))
    for version in ("v1", "v2"):
        response = shared.post(f"/api/{version}/items", json={"name": "GLUE", "price": 1})
        expect_error(response, 409, DUPLICATE_NAME, f"POST {version}: the name is taken (ignoring case)")
        response = shared.put(f"/api/{version}/items/{item_id}", json={"name": "Glue", "price": 1})
        expect_error(response, 409, DUPLICATE_NAME, f"PUT {version}: renaming 'paste' to the name of another item")


@pytest.mark.task("errors")
@pytest.mark.promise("P13", "P14")
def test_validation_errors_are_problems_with_errors(shared):
    # An invalid body, path and query parameter: all validation errors, in one shape. The query
    # string is not part of "instance" (it may carry what a client would not want in a log).
    for response, field, why in (
        (shared.post("/api/v1/items", json={"name": "cheap pen", "price": -1}), "price", "a negative price is invalid"),
        (shared.get("/api/v1/items", params={"limit": 0, "offset": 2}), "limit", "limit must be 1..100"),
        (shared.get("/api/v2/items", params={"offset": -5}), "offset", "offset must be 0 or more"),
        (shared.delete("/api/v2/items/0"), "item_id", "an item_id is 1 or more"),
    ):
        problem = expect_error(
            response, 422, ABOUT_BLANK, why,
            "handle RequestValidationError, and let the model, Path() and Query(ge=..., le=...) raise it",
        )
        errors = problem.get("errors")
        about = isinstance(errors, list) and any(
            isinstance(e, dict) and field in map(str, e.get("loc") or []) for e in errors
        )
        check(about, response, f'"errors": the list of validation errors (exc.errors()), one of them about {field!r}')
        shaped = all(
            isinstance(e, dict) and isinstance(e.get("loc"), list) and isinstance(e.get("msg"), str)
            and isinstance(e.get("type"), str) and not set(e) - {"loc", "msg", "type"}
            for e in errors
        )
        check(
            shaped, response,
            'each error with "loc", "msg" and "type" and nothing else: no "input" (the refused value may be infinity '
            'or NaN, which JSON cannot carry, or a secret) and no "ctx"',
        )


@pytest.mark.task("errors")
@pytest.mark.promise("P15")
def test_a_body_that_is_not_utf8_is_a_400_problem(shared):
    _, before = listing(shared)
    for method, url in (("POST", "/api/v1/items"), ("POST", "/api/v2/items"), ("PUT", "/api/v1/items/1")):
        response = shared.request(method, url, content=b'{"name": "caf\xe9", "price": 1}',
                                  headers={"content-type": "application/json"})
        expect_error(response, 400, ABOUT_BLANK,
                     f"{method} {url} with a body that is not UTF-8 (a Latin-1 'é'): it cannot even be decoded",
                     "FastAPI answers 400 itself; your handler for Starlette's HTTPException makes it a problem")
    response, after = listing(shared)
    check(after == before, response, "nothing was stored or changed by those requests")


@pytest.mark.task("errors")
@pytest.mark.promise("P16")
def test_framework_errors_are_problems(catalogue):
    fix = "the router raises Starlette's HTTPException for these: handle starlette.exceptions.HTTPException"
    for path in ("/api/v9/nothing-here", "/api/v1/items/1/more", "/api/v1?limit=1"):
        response = catalogue.client.get(path)
        expect_error(response, 404, ABOUT_BLANK, f"the framework's own 404 for the unknown path {path}", fix)
    for version in ("v1", "v2"):
        for path, allowed in ((f"/api/{version}/items", {"GET", "POST"}), (f"/api/{version}/items/1", {"GET", "PUT", "DELETE"})):
            response = catalogue.client.patch(path)
            expect_error(response, 405, ABOUT_BLANK, "the framework's own 405 for a method the path does not allow", fix)
            got = {method.strip() for method in response.headers.get("allow", "").split(",") if method.strip()}
            check(
                allowed <= got and "PATCH" not in got, response,
                f"an Allow header listing every method {path} accepts ({', '.join(sorted(allowed))}); Starlette's own "
                f"names only the first route it tried (README). Got Allow: {response.headers.get('allow')!r}",
            )


# --- paginate --------------------------------------------------------------------------


@pytest.mark.task("paginate")
@pytest.mark.promise("P10")
def test_list_defaults_to_the_first_ten(catalogue):
    response = catalogue.twelve().get("/api/v1/items")
    body = json_of(response)
    check(
        isinstance(body, list) and ids_of(body) == list(range(1, 11)),
        response,
        "a list of the first 10 items (ids 1..10): limit defaults to 10, offset to 0",
    )


@pytest.mark.task("paginate")
@pytest.mark.promise("P10")
def test_limit_and_offset_select_a_page(catalogue):
    twelve = catalogue.twelve()
    response = twelve.get("/api/v1/items", params={"limit": 3, "offset": 4})
    check(ids_of(json_of(response)) == [5, 6, 7], response, "items 5, 6, 7: skip 4, then take 3")
    response = twelve.get("/api/v1/items", params={"limit": 5, "offset": 10})
    check(ids_of(json_of(response)) == [11, 12], response, "items 11, 12: the last page is short")
    response = twelve.get("/api/v1/items", params={"offset": 50})
    expect_json(response, [], "an offset past the end is an empty page, not an error", exact=True)


PAST_THE_BOUNDS = ["inf", "-inf", "nan", "1e309", str(10**400), "1.5"]


@pytest.mark.task("paginate")
@pytest.mark.promise("P6", "P10")
def test_page_parameters_are_bounded(catalogue):
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "ten"}):
        response = catalogue.client.get("/api/v1/items", params=params)
        expect_status(response, 422, "limit must be 1..100 and offset 0 or more: Query(ge=..., le=...)")
    expect_status(catalogue.client.get("/api/v1/items", params={"limit": 100}), 200, "limit=100 is the largest page allowed")
    for version in ("v1", "v2"):
        for name in ("limit", "offset"):
            for raw in PAST_THE_BOUNDS + (["2147483648", "99999999999999999999"] if name == "offset" else []):
                response = catalogue.client.get(f"/api/{version}/items", params={name: raw})
                expect_error(
                    response, 422, ABOUT_BLANK,
                    f"{name}={raw} on /api/{version}/items: limit is 1..100 and offset 0..2147483647, integers only",
                )
        response = catalogue.client.get(f"/api/{version}/items", params={"offset": 2147483647})
        expect_status(response, 200, "offset=2147483647 is the largest offset allowed: an empty page")


@pytest.mark.task("paginate")
@pytest.mark.promise("P8", "P10")
def test_order_is_by_id_and_survives_updates(shared):
    ids = [id_of(create(shared, name)) for name in ("order c", "order a", "order b")]
    expect_status(shared.put(f"/api/v1/items/{ids[0]}", json={"name": "order z", "price": 1}), 200)
    response, items = listing(shared)
    mine = [item.get("id") for item in items if item.get("id") in ids]
    check(
        mine == sorted(ids),
        response,
        f"this test's items in the order {sorted(ids)}: a stable order (by id) that neither names nor updates can shuffle",
    )


# --- versions --------------------------------------------------------------------------


@pytest.mark.task("versions")
@pytest.mark.promise("P12")
def test_v2_lists_in_a_page_envelope(catalogue):
    twelve = catalogue.twelve()
    response = twelve.get("/api/v2/items", params={"limit": 4, "offset": 4})
    body = expect_json(response, {"total": 12, "limit": 4, "offset": 4}, "v2 wraps a page in an envelope")
    check(ids_of(body.get("items")) == [5, 6, 7, 8], response, '"items": the page itself, ids 5..8')
    link = body.get("next")
    parts = urlsplit(link) if isinstance(link, str) else None
    check(
        parts is not None and parts.path == "/api/v2/items" and not parts.scheme and not parts.netloc,
        response,
        '"next": the path (with its query) of the following page, e.g. "/api/v2/items?limit=4&offset=8", '
        "not an absolute URL (README: a client resolves it against the URL it called)",
    )
    followed = twelve.get(link)
    body = expect_json(followed, {"total": 12, "limit": 4, "offset": 8}, "next keeps the page size: limit=4&offset=8")
    check(ids_of(body.get("items")) == [9, 10, 11, 12], followed, "following next gives items 9..12")
    check(
        body.get("next", "(missing)") is None,
        followed,
        '"next": null, because items 9..12 end the catalogue (offset + limit == total): a full page can be the last',
    )


@pytest.mark.task("versions")
@pytest.mark.promise("P12")
def test_v2_envelope_on_an_empty_store(client):
    expect_json(
        client.get("/api/v2/items"),
        {"items": [], "total": 0, "limit": 10, "offset": 0, "next": None},
        "an empty store is an empty page with total 0",
        exact=True,
    )


@pytest.mark.task("versions")
@pytest.mark.promise("P10", "P11")
def test_v1_still_answers_a_plain_list(catalogue):
    response = catalogue.twelve().get("/api/v1/items", params={"limit": 2})
    body = json_of(response)
    check(
        isinstance(body, list) and ids_of(body) == [1, 2],
        response,
        "v1 keeps its contract (a plain list): clients built against v1 must not break when v2 ships",
    )


@pytest.mark.task("versions")
@pytest.mark.promise("P11")
def test_both_versions_serve_the_same_items(shared):
    response = create(shared, "notebook", version="v2")
    item_id = id_of(response)
    location = expect_header(response, "location", why="v2 answers 201 with a Location too")
    path = f"/api/v2/items/{item_id}"
    check(urlsplit(location).path == path, response, f"a v2 Location: {path}")
    expect_json(
        shared.get(f"/api/v1/items/{item_id}"), {"id": item_id, "name": "notebook"}, "the item created through v2 is visible in v1"
    )
    expect_status(shared.delete(f"/api/v2/items/{item_id}"), 204, "v2 deletes too")
    expect_status(shared.get(f"/api/v1/items/{item_id}"), 404, "deleted through v2, gone in v1")
    for params in ({"limit": 1000}, {"offset": -1}):
        expect_status(shared.get("/api/v2/items", params=params), 422, "v2's limit and offset are bounded like v1's")


# --- docs ------------------------------------------------------------------------------

SUMMARIES = {
    ("/items", "post"): "Create an item",
    ("/items/{item_id}", "get"): "Read an item",
    ("/items/{item_id}", "put"): "Replace an item",
    ("/items/{item_id}", "delete"): "Delete an item",
}
LIST_SUMMARY = {"v1": "List items", "v2": "List items in a page envelope"}
# The README's table: every error status each operation can answer.
DOCUMENTED_ERRORS = {
    ("/items", "post"): {"400", "409", "422"},
    ("/items", "get"): {"422"},
    ("/items/{item_id}", "get"): {"404", "422"},
    ("/items/{item_id}", "put"): {"400", "404", "409", "422"},
    ("/items/{item_id}", "delete"): {"404", "422"},
}


@pytest.mark.task("docs")
@pytest.mark.promise("P17")
def test_operations_have_tags_and_summaries(catalogue):
    response = catalogue.client.get("/openapi.json")
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


PROBLEM_MEMBERS = {"type", "title", "status", "detail", "instance"}


def _schema_of(document, answer):
    """The schema of a documented answer's application/problem+json body, its $ref followed."""
    schema = answer.get("content", {}).get("application/problem+json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        schema = document.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return schema


@pytest.mark.task("docs")
@pytest.mark.promise("P18")
def test_error_responses_are_documented(catalogue):
    response = catalogue.client.get("/openapi.json")
    document = json_of(response)
    paths = document.get("paths", {})
    problems = []
    for version in ("v1", "v2"):
        for (path, method), codes in DOCUMENTED_ERRORS.items():
            answers = paths.get(f"/api/{version}{path}", {}).get(method, {}).get("responses", {})
            for code in sorted(codes):
                where = f"{method.upper()} /api/{version}{path}"
                if code not in answers:
                    problems.append(f"{where} does not document {code}")
                elif not PROBLEM_MEMBERS <= set(_schema_of(document, answers[code]).get("properties", {})):
                    problems.append(f"{where} documents {code} without a problem's schema as application/problem+json")
    check(
        not problems, response,
        "every status each operation can answer, as application/problem+json with a problem's schema "
        "(responses={409: {'model': Problem, 'content': {'application/problem+json': ...}}}; 422 on the router "
        "replaces FastAPI's default):\n    "
        + "\n    ".join(problems),
    )
