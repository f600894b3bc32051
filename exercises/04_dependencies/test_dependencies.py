"""Graded tests for exercise 04. Run: pytest exercises/04_dependencies"""

import pytest
from fastapi.testclient import TestClient

from grader.bridge import process_clock
from grader.expect import expect_json, expect_problem, expect_status, explain, json_of

ADMIN = {"X-User": "ada", "X-API-Key": "dev-key"}
DUPLICATE_TITLE = "https://course.example/problems/duplicate-title"  # the README's problem type for a taken title


# Errors that a dependency with yield causes inside FastAPI, and what they mean.
SYMPTOMS = {
    "response already started": (
        "an exception was raised after the response had been sent: the code after `yield` (the commit) "
        "ran after the response, so it could not change it. Give the connection dependency "
        'scope="function" so that it finishes before the response is sent.'
    ),
    "Response not awaited": (
        "a dependency with yield caught the route's exception and did not re-raise it. "
        "After rolling back, `raise` again so that the error still decides the response."
    ),
    "local variable 'response'": (
        "a dependency with yield caught the route's exception and did not re-raise it (with "
        'scope="function" FastAPI then has no response at all). After rolling back, `raise` again.'
    ),
}


class TeachingClient(TestClient):
    """A TestClient that explains the errors a wrong dependency with yield causes."""

    def request(self, method, url, *args, **kwargs):
        try:
            return super().request(method, url, *args, **kwargs)
        except Exception as exc:
            advice = next((text for symptom, text in SYMPTOMS.items() if symptom in str(exc)), None)
            if advice is None:
                raise  # an error in your code: its traceback is the best explanation
            message = f"\nsent:     {method} {url}\ngot:      the app raised {type(exc).__name__}: {exc}\nmeaning:  {advice}"
        pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback to wade through


# Three apps per run, because a fresh app (running app.py again) is the largest cost of a test:
# - `client`/`db`: one app whose catalogue no test changes (reads, and requests that fail);
#   its tests may compare exact listings.
# - `scratch`: one app for the tests that add books or swap a dependency. Each uses titles of
#   its own and never assumes the ids or the catalogue another test left behind.
# - `fresh`: a new app, for the one test that needs the ids to start where the seed ends.
@pytest.fixture(scope="module")
def shared(load):
    module = load("app")
    with TeachingClient(module.app) as client:
        yield module, client


@pytest.fixture
def client(shared):
    client = shared[1]
    client.cookies.clear()  # a cookie set by one test (or by the app) never reaches the next
    yield client
    client.cookies.clear()


@pytest.fixture
def db(shared):
    return shared[0].app.state.db


@pytest.fixture(scope="module")
def shared_scratch(load):
    module = load("app")
    with TeachingClient(module.app) as client:
        yield module, client


@pytest.fixture
def scratch(shared_scratch):
    """(module, client, db) of the app whose catalogue tests may change."""
    module, client = shared_scratch
    client.cookies.clear()
    db = module.app.state.db
    yield module, client, db
    db.fail_next_commit = False  # a refused commit that never happened must not hit the next test


@pytest.fixture
def fresh(load):
    module = load("app")
    with TeachingClient(module.app) as client:
        yield module, client


def check(condition, response, expected):
    """Fail with the request, the response and what was expected (no traceback to read)."""
    if not condition:
        pytest.fail(explain(response, expected), pytrace=False)


def expect_challenge(response, scheme, why):
    """A 401 says which credentials it wants (RFC 9110): WWW-Authenticate, its first token the scheme."""
    value = response.headers.get("www-authenticate", "")
    got = value.strip().split(" ", 1)[0].split(",", 1)[0]
    assert got.casefold() == scheme.casefold(), explain(
        response, f"the 401 with WWW-Authenticate: {scheme} ({why}; RFC 9110: every 401 names the credentials it wants "
        f"in a challenge, and the problem handler keeps an HTTPException's headers); it carried "
        f"{repr(value) if value else 'none'}")


def ids(response):
    body = json_of(response)
    items = body.get("items") if isinstance(body, dict) else None
    return [item.get("id") for item in items] if isinstance(items, list) else items


def mark(db):
    """Where the database log stands before a request, and how many connections are open."""
    return len(db.log), db.open_connections


def events(db, since):
    """The connection events of one request: ["open", "commit", "close"] and their connection ids."""
    entries = [entry.split() for entry in db.log[since:]]
    return [entry[0] for entry in entries], {entry[1] for entry in entries if len(entry) > 1}


def expect_events(db, before, response, wanted, why):
    since, open_before = before
    kinds, connections = events(db, since)
    check(
        kinds == wanted and len(connections) == 1 and db.open_connections == open_before,
        response,
        f"database log {wanted} for ONE connection, and none left open ({why})\n"
        f"log:      {db.log[since:]}, connections left open: {db.open_connections - open_before}",
    )


def titles(response):
    body = json_of(response)
    items = body.get("items") if isinstance(body, dict) else None
    return [item.get("title") for item in items] if isinstance(items, list) else items


def catalogue(client):
    """The ids of every book, read before a test changes anything, to compare with afterwards."""
    listing = client.get("/books", params={"limit": 50})
    found = ids(listing)
    check(listing.status_code == 200 and isinstance(found, list), listing, '200 and "items": the whole catalogue (read before and after, to see what the request changed)')
    return found


# --- params: one parameter dependency shared by two routes -----------------------------


@pytest.mark.task("params")
@pytest.mark.promise("P1")
def test_books_page_defaults(client):
    response = client.get("/books")
    expect_json(response, {"search": None, "offset": 0, "limit": 10}, "offset defaults to 0, limit to 10, no search")
    check(ids(response) == [1, 2, 3, 4, 5, 6], response, '"items": the six books of the catalogue, ordered by id')


@pytest.mark.task("params")
@pytest.mark.promise("P1", "P4")
def test_books_offset_and_limit(client):
    response = client.get("/books", params={"offset": 1, "limit": 2})
    expect_json(response, {"offset": 1, "limit": 2})
    check(ids(response) == [2, 3], response, "books 2 and 3: skip one, take two")
    response = client.get("/books", params={"q": "o", "offset": 1, "limit": 2})
    check(
        ids(response) == [4, 5], response,
        'books 4 and 5: first the search (books 3, 4, 5 and 6 have an "o" in title or author), then the page of it',
    )


@pytest.mark.task("params")
@pytest.mark.promise("P4")
def test_search_filters_title_and_author(client):
    response = client.get("/books", params={"q": "AUSTEN"})
    expect_json(response, {"search": "AUSTEN"}, "the search term is echoed back")
    check(ids(response) == [2, 3], response, "the two Jane Austen books: q matches title or author, ignoring case")


@pytest.mark.task("params")
@pytest.mark.promise("P1", "P5")
def test_authors_use_the_same_parameters(client):
    response = client.get("/authors", params={"limit": 2})
    expect_json(
        response, {"items": ["Frank Herbert", "J. R. R. Tolkien"], "search": None, "offset": 0, "limit": 2},
        "the first two authors in alphabetical order, each once", exact=True,
    )
    expect_json(
        client.get("/authors", params={"q": "jane"}), {"items": ["Jane Austen"], "offset": 0, "limit": 10},
        "authors filtered by q, and the same defaults as /books: both routes use page_params",
    )
    expect_json(
        client.get("/authors", params={"q": "o", "offset": 1, "limit": 2}),
        {"items": ["Toni Morrison", "William Gibson"], "search": "o", "offset": 1, "limit": 2},
        'of the authors whose NAME has an "o" (J. R. R. Tolkien, Toni Morrison, William Gibson; titles do not count), '
        "skip one, take two", exact=True,
    )


@pytest.mark.task("params")
@pytest.mark.promise("P1")
@pytest.mark.parametrize("path", ["/books", "/authors"])
def test_page_parameters_are_bounded_on_every_route(client, path):
    for params in ({"limit": 0}, {"limit": 51}, {"offset": -1}):
        expect_status(client.get(path, params=params), 422, "offset >= 0 and limit 1..50, declared once in page_params")
    for params in ({"offset": 0, "limit": 1}, {"limit": 50}):
        expect_status(client.get(path, params=params), 200, "the bounds themselves are allowed: offset 0, limit 1 and limit 50 (ge/le, not gt/lt)")


# --- subdeps: the search comes from the query, else from a cookie ----------------------


@pytest.mark.task("subdeps")
@pytest.mark.promise("P2")
def test_search_falls_back_to_the_cookie(client):
    client.cookies.set("last_search", "gibson")
    response = client.get("/books")
    expect_json(response, {"search": "gibson"}, "no q in the query, so the search comes from the last_search cookie")
    check(ids(response) == [4], response, "only Neuromancer (William Gibson)")
    expect_json(client.get("/authors"), {"items": ["William Gibson"]}, "/authors gets the cookie fallback too")


@pytest.mark.task("subdeps")
@pytest.mark.promise("P2")
def test_query_wins_over_the_cookie(client):
    client.cookies.set("last_search", "gibson")
    response = client.get("/books", params={"q": "dune"})
    expect_json(response, {"search": "dune"}, "q from the query takes precedence over the cookie")
    check(ids(response) == [1], response, "only Dune")


# --- session: one connection per request, committed, always closed ---------------------


@pytest.mark.task("session")
@pytest.mark.promise("P13")
def test_a_request_opens_one_connection_commits_and_closes_it(client, db):
    before = mark(db)
    response = client.get("/books")
    expect_status(response, 200)
    expect_events(db, before, response, ["open", "commit", "close"], "a request that succeeds commits")


@pytest.mark.task("session")
@pytest.mark.promise("P13")
def test_the_user_lookup_and_the_route_share_one_connection(scratch):
    _, client, db = scratch
    before = mark(db)
    response = client.post("/admin/books", headers=ADMIN, json={"title": "Dawn", "author": "Octavia E. Butler"})
    expect_status(response, 201, "ada adds a book with the API key")
    expect_events(
        db, before, response, ["open", "commit", "close"],
        "get_current_user and the route both ask for ConnectionDep; FastAPI caches it for the request",
    )


class BugInARoute(Exception):
    """Raised by a probe route: an error that is not an HTTPException."""


@pytest.mark.task("session")
@pytest.mark.promise("P13")
def test_a_failing_request_still_closes_its_connection(scratch):
    module, client, db = scratch
    before = mark(db)
    response = client.get("/me", headers={"X-User": "nobody"})
    expect_status(response, 401, "an unknown user is 401")
    expect_events(db, before, response, ["open", "rollback", "close"], "the code after yield runs even when the request fails")

    @module.app.get("/probe/bug")
    async def bug(connection: module.ConnectionDep) -> dict:
        raise BugInARoute("a bug in a route")

    since, open_before = mark(db)
    with pytest.raises(Exception, match="a bug in a route"):  # the app re-raises it after answering 500
        client.get("/probe/bug")
    kinds, connections = events(db, since)
    if kinds != ["open", "rollback", "close"] or len(connections) != 1 or db.open_connections != open_before:
        pytest.fail(
            "\nsent:     GET /probe/bug (a route that uses ConnectionDep and raises BugInARoute, not an HTTPException)"
            "\nexpected: database log ['open', 'rollback', 'close'] for ONE connection: ANY exception rolls back, "
            "so catch Exception after the yield, not only HTTPException"
            f"\nlog:      {db.log[since:]}, connections left open: {db.open_connections - open_before}",
            pytrace=False,
        )


# --- rollback: a failing request changes nothing ---------------------------------------


@pytest.mark.task("rollback")
@pytest.mark.promise("P10")
def test_an_import_commits_all_books(scratch):
    _, client, _ = scratch
    batch = [{"title": "Middlemarch", "author": "George Eliot"}, {"title": "Silas Marner", "author": "George Eliot"}]
    response = client.post("/admin/books/import", headers=ADMIN, json=batch)
    expect_status(response, 201)
    expect_json(response, {"imported": 2}, exact=True)
    listing = client.get("/books", params={"limit": 50})
    check(
        (titles(listing) or [])[-2:] == ["Middlemarch", "Silas Marner"], listing,
        "the two imported books (Middlemarch, Silas Marner) at the end of the catalogue",
    )


@pytest.mark.task("rollback")
@pytest.mark.promise("P11", "P13")
def test_a_duplicate_title_is_409_and_rolled_back(scratch):
    _, client, db = scratch
    books = catalogue(client)
    before = mark(db)
    response = client.post("/admin/books", headers=ADMIN, json={"title": "DUNE", "author": "Someone Else"})
    expect_problem(response, 409, "a book titled Dune already exists (titles compare ignoring case): "
                   "raise ProblemError(409, ..., type=DUPLICATE_TITLE, title='Title taken')", type=DUPLICATE_TITLE)
    check(json_of(response).get("title") == "Title taken", response, '"title": "Title taken", the README\'s title of that type')
    expect_events(db, before, response, ["open", "rollback", "close"], "the route raised, so the dependency rolls back")
    batch = [
        {"title": "Wild Seed", "author": "Octavia E. Butler"},
        {"title": "Adam Bede", "author": "George Eliot"},
        {"title": "dune", "author": "Someone Else"},  # a duplicate of book 1, ignoring case
    ]
    before = mark(db)
    response = client.post("/admin/books/import", headers=ADMIN, json=batch)
    expect_problem(response, 409, "the third title already exists", type=DUPLICATE_TITLE)
    expect_events(db, before, response, ["open", "rollback", "close"], "the route raised, so the dependency rolls back")
    # A title may also clash with one earlier in the same list, which is not in the catalogue yet.
    twins = [{"title": "Lilith's Brood", "author": "Octavia E. Butler"}, {"title": "LILITH'S BROOD", "author": "O. Butler"}]
    response = client.post("/admin/books/import", headers=ADMIN, json=twins)
    expect_problem(
        response, 409,
        "the second title repeats the first (ignoring case): check each title against the connection's books, "
        "which include the ones this import added before it", type=DUPLICATE_TITLE,
    )
    listing = client.get("/books", params={"limit": 50})
    check(
        ids(listing) == books, listing,
        f"the catalogue unchanged, ids {books}: all or nothing, so Wild Seed, Adam Bede and Lilith's Brood were rolled back too",
    )


@pytest.mark.task("rollback")
@pytest.mark.promise("P14")
def test_a_failed_commit_answers_503_not_201(scratch):
    _, client, db = scratch
    books = catalogue(client)
    db.fail_next_commit = True  # the fake database will refuse the next commit
    before = mark(db)
    response = client.post("/admin/books", headers=ADMIN, json={"title": "Fledgling", "author": "Octavia E. Butler"})
    expect_problem(
        response, 503,
        "the commit failed, so the client must not be told 201: commit before the response is sent "
        '(Depends(get_connection, scope="function")) and map CommitFailed to a 503 problem (problem_response)',
    )
    expect_events(db, before, response, ["open", "rollback", "close"], "a failed commit is rolled back")
    listing = client.get("/books", params={"limit": 50})
    check(ids(listing) == books, listing, f"the book was not saved: the catalogue still has ids {books}")


# --- bulk: an import is linear and bounded --------------------------------------------


def timed_import(client, clock, first, count):
    """CPU seconds the app's process spends importing `count` new books (titles of their own), answered 201.

    CPU time, not the wall clock: on a busy machine the wall clock also counts the time other
    processes had the CPU. The clock is the process's that runs the app (process_clock): this
    one with the TestClient, or the process of its own that class grading gives your code."""
    batch = [{"title": f"Volume {first + n}", "author": "A. Prolific Writer"} for n in range(count)]
    started = clock()
    response = client.post("/admin/books/import", headers=ADMIN, json=batch)
    seconds = clock() - started
    expect_status(response, 201, f"an import of {count} new, distinct titles")
    return seconds


@pytest.mark.task("bulk")
@pytest.mark.promise("P15")
def test_an_import_takes_linear_time(fresh):
    # The import runs on the event loop: while it works, no other request of this process is
    # served. Checking each title by reading the whole catalogue again (or scanning a list)
    # costs n * (catalogue + n): 4 times the books then cost about 16 times the time.
    # The same test compares 400 books with 1,600, so the machine's speed cancels out; the
    # small import runs before and after the large one and the faster run counts, which irons
    # out a busy moment.
    module, client = fresh
    clock = process_clock(module)
    small = [timed_import(client, clock, 0, 400)]
    large = [timed_import(client, clock, 400, 1600)]
    small.append(timed_import(client, clock, 2000, 400))
    ratio = min(large) / min(small)
    assert ratio < 5, (
        "\nsent:     POST /admin/books/import with 400 new books, 1,600, then 400 again"
        "\nexpected: at most about 4 times the time for 4 times the books (linear; the fixed cost of a request makes it less), under 5 times"
        f"\ngot:      {min(small) * 1000:.0f} ms for 400 and {min(large) * 1000:.0f} ms for 1,600: {ratio:.1f} times."
        "\n          Each title is checked against every title before it: read the taken titles once into a set"
        " (casefolded), then check and add each new title in O(1)."
    )


@pytest.mark.task("bulk")
@pytest.mark.promise("P10")
def test_an_import_is_bounded(scratch):
    _, client, _ = scratch
    books = catalogue(client)
    batch = [{"title": f"Pamphlet {n}", "author": "Anonymous"} for n in range(5001)]
    response = client.post("/admin/books/import", headers=ADMIN, json=batch)
    expect_status(response, 422, "an import carries at most 5,000 books: a longer list is refused before any work")
    listing = client.get("/books", params={"limit": 50})
    check(ids(listing) == books, listing, f"nothing saved: the catalogue still has ids {books}")
    response = client.post("/admin/books/import", headers=ADMIN, json=[])
    expect_status(response, 201, "an empty list imports nothing, and that is fine")
    expect_json(response, {"imported": 0}, exact=True)
    response = client.post("/admin/books/import", headers=ADMIN, json=batch[:5000])
    expect_status(response, 201, "5,000 books is the largest import allowed (MAX_IMPORT = 5000): it is accepted whole")
    expect_json(response, {"imported": 5000}, exact=True)


# --- api_key: one router guarded, the rest public --------------------------------------


@pytest.mark.task("api_key")
@pytest.mark.promise("P7")
@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"X-User": "ada"}, "no X-API-Key header"),
        ({"X-User": "ada", "X-API-Key": "wrong"}, "X-API-Key: wrong"),
        ({"X-User": "ada", "X-API-Key": "DEV-KEY"}, "X-API-Key: DEV-KEY; header NAMES ignore case, their values do not"),
    ],
    ids=["missing", "wrong", "other-case"],
)
def test_admin_routes_need_the_api_key(scratch, headers, why):
    _, client, _ = scratch
    book = {"title": "Kindred", "author": "Octavia E. Butler"}
    response = client.post("/admin/books", headers=headers, json=book)
    expect_problem(response, 401, f"the admin router requires exactly X-API-Key: dev-key, and was sent {why}")
    expect_challenge(response, "ApiKey", f"POST /admin/books, sent {why}")
    response = client.post("/admin/books/import", headers=headers, json=[book])
    expect_problem(response, 401, f"every route of the admin router; sent {why}")
    expect_challenge(response, "ApiKey", f"POST /admin/books/import, sent {why}")


@pytest.mark.task("api_key")
@pytest.mark.promise("P7")
def test_public_routes_need_no_api_key(client):
    for path in ("/books", "/authors"):
        expect_status(client.get(path), 200, "the API key guards the admin router only, not the whole app")
    expect_status(client.get("/me", headers={"X-User": "linus"}), 200, "/me needs a user, not the API key")


@pytest.mark.task("api_key")
@pytest.mark.promise("P7")
def test_the_api_key_comes_from_get_settings(scratch):
    module, client, _ = scratch
    overrides = module.app.dependency_overrides
    overrides[module.get_settings] = lambda: module.Settings(api_key="another-key")
    try:
        book = {"title": "Bloodchild", "author": "Octavia E. Butler"}
        response = client.post("/admin/books", headers={**ADMIN, "X-API-Key": "another-key"}, json=book)
        expect_status(response, 201, "with get_settings overridden, the key from the overriding Settings is the valid one")
        response = client.post("/admin/books", headers=ADMIN, json={"title": "Bloodchild 2", "author": "x"})
        expect_status(response, 401, "and dev-key is no longer accepted: read the key from SettingsDep, not a constant")
    finally:
        overrides.pop(module.get_settings, None)


# --- user: CurrentUser, a sub-dependency on the connection -----------------------------


@pytest.mark.task("user")
@pytest.mark.promise("P6")
def test_me_returns_the_user(client):
    expect_json(client.get("/me", headers={"X-User": "ada"}), {"name": "ada", "role": "admin"}, exact=True)


@pytest.mark.task("user")
@pytest.mark.promise("P6")
@pytest.mark.parametrize("headers", [{}, {"X-User": "mallory"}])
def test_missing_or_unknown_user_is_401(client, headers):
    response = client.get("/me", headers=headers)
    expect_problem(response, 401, "no X-User header, or a name the database does not know")
    expect_challenge(response, "User", "the credentials /me wants are an X-User header naming a known user")


@pytest.mark.task("user")
@pytest.mark.promise("P8")
def test_a_new_book_records_who_added_it(fresh):
    _, client = fresh
    response = client.post("/admin/books", headers={**ADMIN, "X-User": "linus"}, json={"title": "Kindred", "author": "O. Butler"})
    expect_json(response, {"id": 7, "title": "Kindred", "added_by": "linus"}, "201 and the book, added_by the current user")


@pytest.mark.task("user")
@pytest.mark.promise("P16")
def test_the_aliases_compose_on_a_new_route(scratch):
    module, client, db = scratch
    for name in ("CurrentUser", "ConnectionDep"):
        if not hasattr(module, name):
            pytest.fail(f"app.py must define the Annotated alias {name} (see the README).", pytrace=False)

    @module.app.get("/probe")
    async def probe(user: module.CurrentUser, first: module.ConnectionDep, second: module.ConnectionDep) -> dict:
        return {"user": user.name, "same": first == second}  # the same object (no __eq__ of its own)

    before = mark(db)
    response = client.get("/probe", headers={"X-User": "linus"})
    expect_json(response, {"user": "linus", "same": True}, "a route written with the aliases gets the user and ONE connection")
    expect_events(db, before, response, ["open", "commit", "close"], "the aliases share one cached connection")


# --- overrides: swapping dependencies in tests, without leaks --------------------------


@pytest.mark.task("overrides")
@pytest.mark.promise("P16")
def test_get_current_user_can_be_overridden(scratch):
    module, client, _ = scratch
    overrides = module.app.dependency_overrides
    overrides[module.get_current_user] = lambda: module.User(name="tester", role="admin")
    try:
        expect_json(client.get("/me"), {"name": "tester"}, "/me depends on get_current_user, so overriding it replaces the user")
        response = client.post("/admin/books", headers={"X-API-Key": "dev-key"}, json={"title": "Mind of My Mind", "author": "x"})
        expect_json(response, {"added_by": "tester"}, "the admin routes use the same get_current_user")
    finally:
        overrides.pop(module.get_current_user, None)


@pytest.fixture
def override_dependency(load):
    helpers = load("testing", fresh=False)  # testing.py holds no state: one copy per run
    if not hasattr(helpers, "override_dependency"):
        pytest.fail("testing.py must define override_dependency(app, dependency, replacement).", pytrace=False)
    return helpers.override_dependency


def shown(value):
    """What a probe shows of a dependency: a replacement's text, else "real" (an object of app.py)."""
    return value if isinstance(value, str) else "real"


@pytest.fixture(scope="module")
def tiny_app(shared_scratch):
    """A probe route on the scratch app that shows what two dependencies of app.py's given part
    (get_settings and get_db) returned, so that testing.py is graded without your routes."""
    module, client = shared_scratch

    async def source(value: module.SettingsDep, other: module.DatabaseDep) -> dict:
        return {"value": shown(value), "other": shown(other)}

    module.app.get("/source")(source)
    return module, client


@pytest.fixture
def tiny(tiny_app):
    module, client = tiny_app
    module.app.dependency_overrides.clear()  # whatever a wrong helper left behind in another test
    yield module, client
    module.app.dependency_overrides.clear()


def expect_source(client, value, why):
    return expect_json(client.get("/source"), {"value": value}, why)


@pytest.mark.task("overrides")
@pytest.mark.promise("P17")
def test_override_dependency_swaps_then_restores(tiny, override_dependency):
    module, client = tiny
    app, real_source = module.app, module.get_settings
    with override_dependency(app, real_source, lambda: "fake"):
        expect_source(client, "fake", "inside the with block, the replacement is called instead of the dependency")
    expect_source(client, "real", "after the block, the real dependency is back")
    check(app.dependency_overrides == {}, client.get("/source"), f"no override left behind, got {app.dependency_overrides}")


@pytest.mark.task("overrides")
@pytest.mark.promise("P17")
def test_override_dependency_restores_even_when_the_block_raises(tiny, override_dependency):
    module, client = tiny
    app, real_source = module.app, module.get_settings
    with pytest.raises(ZeroDivisionError):
        with override_dependency(app, real_source, lambda: "fake"):
            expect_source(client, "fake", "inside the with block, the replacement is called")
            1 / 0  # a test body that fails
    expect_source(client, "real", "a failing test must not leak its override into the next one: restore in a finally")
    check(app.dependency_overrides == {}, client.get("/source"), f"no override left behind, got {app.dependency_overrides}")


@pytest.mark.task("overrides")
@pytest.mark.promise("P17")
def test_override_dependency_leaves_other_and_outer_overrides_alone(tiny, override_dependency):
    module, client = tiny
    app, real_source, other_dependency = module.app, module.get_settings, module.get_db
    elsewhere = lambda: "overridden elsewhere"  # noqa: E731
    app.dependency_overrides[other_dependency] = elsewhere
    with override_dependency(app, real_source, lambda: "outer"):
        with override_dependency(app, real_source, lambda: "inner"):
            expect_source(client, "inner", "the inner override is active inside the inner block")
        expect_source(client, "outer", "leaving the inner block brings back the OUTER override, not the real function")
    expect_json(
        client.get("/source"), {"value": "real", "other": "overridden elsewhere"},
        "the real dependency after both blocks, and the override of another dependency untouched (never clear() them all)",
        exact=True,
    )


# --- contract: the OpenAPI schema lists every answer ------------------------------------

DOCUMENTED = {
    ("get", "/books"): {"200", "422"},
    ("get", "/authors"): {"200", "422"},
    ("get", "/me"): {"200", "401", "422"},
    ("post", "/admin/books"): {"201", "400", "401", "409", "422", "503"},
    ("post", "/admin/books/import"): {"201", "400", "401", "409", "422", "503"},
}


@pytest.mark.task("contract")
@pytest.mark.promise("P18")
def test_the_openapi_schema_lists_every_status_each_route_answers(client):
    response = client.get("/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI schema")
    paths = json_of(response).get("paths", {})
    for (method, path), wanted in DOCUMENTED.items():
        operation = paths.get(path, {}).get(method)
        check(operation is not None, response, f"the route {method.upper()} {path} in the schema's paths")
        documented = operation.get("responses", {})
        missing = sorted(wanted - set(documented))
        check(
            not missing, response,
            f"{method.upper()} {path} documents every status it answers: {sorted(wanted)}\n"
            f"got:      {sorted(documented)}; missing {missing}. Declare them with responses="
            "problem_responses(401, 409, ...) on the route or its router, and FastAPI(responses=problem_responses(422))",
        )
        for code in wanted - {"200", "201"}:
            content = documented[code].get("content", {}).get("application/problem+json", {})
            check(
                "schema" in content, response,
                f"{method.upper()} {path}'s {code} answer documented as application/problem+json with the Problem "
                f"schema (problem_responses({code}))\ngot:      {documented[code]}",
            )


NOT_JSON_NUMBERS = ["1e309", "-1e309", "NaN", "Infinity"]


def expect_422_without_input(client, url, body, **kwargs):
    try:
        response = client.post(url, content=body, headers={"Content-Type": "application/json", **kwargs.get("headers", {})})
    except Exception as exc:  # the TestClient re-raises what the app raised
        pytest.fail(f"\nsent:     POST {url}\n          body {body}\ngot:      the app raised {type(exc).__name__}: {exc}"
                    f"\nexpected: 422, " + "the 422 of an invalid body, whatever the body holds. 1e309 reads as infinity (and NaN as NaN), which JSON cannot write back: FastAPI's default 422 echoes each refused input and so becomes a 500. Register a RequestValidationError handler that answers the errors without their input", pytrace=False)
    problem = expect_problem(response, 422, "the 422 of an invalid body, whatever the body holds. 1e309 reads as infinity (and NaN as NaN), which JSON cannot write back: FastAPI's default 422 echoes each refused input and so becomes a 500. install_problem_details(app) answers the errors without their input")
    errors = problem.get("errors")
    check(isinstance(errors, list) and errors and all(isinstance(e, dict) and set(e) == {"type", "loc", "msg"} for e in errors),
          response, '"errors": [{"type": ..., "loc": [...], "msg": ...}, ...]: where and why, never the refused "input"')


@pytest.mark.task("contract")
@pytest.mark.promise("P12")
def test_an_invalid_body_is_422_whatever_it_holds(scratch):
    _, client, _ = scratch
    for number in NOT_JSON_NUMBERS:
        expect_422_without_input(client, "/admin/books", f'{{"title": {number}, "author": "A"}}', headers=ADMIN)
        expect_422_without_input(client, "/admin/books/import", f'[{{"title": "T", "author": {number}}}]', headers=ADMIN)
