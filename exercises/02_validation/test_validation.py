"""Graded tests for exercise 02. Run: pytest exercises/02_validation"""

import hashlib
import json
import textwrap
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from grader.expect import expect_json, expect_status, explain, json_of

PUBLIC_FIELDS = {"id", "username", "email", "age"}
PASSWORD = "analytical1"


def registration(**changes: object) -> dict[str, object]:
    """A valid registration body; keyword arguments change or add fields."""
    body: dict[str, object] = {
        "username": "ada_lovelace",
        "email": "ada@example.com",
        "age": 36,
        "password": PASSWORD,
        "password_confirm": PASSWORD,
    }
    body.update(changes)
    return body


class GradedClient:
    """A TestClient whose crashes fail the test with the request and the exception, not a traceback."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def request(self, method: str, url: str, **kwargs):
        try:
            return self._client.request(method, url, **kwargs)
        except Exception as exc:  # the learner's route raised: show what was sent and what broke
            crash = exc
        body = f"\n          body {json.dumps(kwargs['json'])}" if "json" in kwargs else ""
        pytest.fail(
            f"\nsent:     {method} {url}{body}\n"
            f"got:      your app raised {type(crash).__name__} (a client would see 500 Internal Server Error):\n"
            f"{textwrap.indent(str(crash), '          ')}\n"
            "expected: an answer, not a crash",
            pytrace=False,
        )

    def get(self, url: str, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs):
        return self.request("POST", url, **kwargs)


# Two apps per run instead of one per test (a fresh import of app.py is the largest cost):
# - `client`: one shared app for the tests that need no known state: requests that must be
#   refused with 422, registrations whose id nobody checks, the OpenAPI document;
# - `registered`: an app of its own in which exactly two users register, ada (id 1) then
#   grace (id 2); its tests only read it (the responses, USERS, GET), so ids stay known.
def quick_hash(password: str) -> str:
    """Stands in for the given hash_password in the shared app: scrypt is slow on purpose, and no
    test of that app reads a hash (`registered` keeps the real one, and checks it)."""
    return "scrypt$quick$" + hashlib.sha256(password.encode()).hexdigest()


@pytest.fixture(scope="module")
def client(load):
    module = load("app", fresh=False)
    if callable(getattr(module, "hash_password", None)):
        module.hash_password = quick_hash
    with TestClient(module.app) as client:  # `with` runs the app's startup and shutdown
        yield GradedClient(client)


ADA = registration()
GRACE = registration(username="grace", email="grace@example.com", age=None)


class Registered:
    """A fresh app where ada then grace register, each once, when a test first needs them.

    The registrations run inside a test (not in the fixture), so a crash fails that test with
    the usual message instead of erroring; a later test asking for it fails the same way.
    """

    def __init__(self, module, client: GradedClient) -> None:
        self.module = module
        self.client = client
        self._results: list = []

    def response(self, index: int):
        """The response to registration `index` (0: ada, 1: grace), sent in that order."""
        while len(self._results) <= index:
            body = (ADA, GRACE)[len(self._results)]
            try:
                self._results.append(self.client.post("/users", json=body))
            except pytest.fail.Exception as crash:
                self._results.append(crash)
        result = self._results[index]
        if isinstance(result, pytest.fail.Exception):
            pytest.fail(result.msg, pytrace=False)
        return result


@pytest.fixture(scope="module")
def registered(load):
    module = load("app")
    with TestClient(module.app) as client:
        yield Registered(module, GradedClient(client))


def check(condition: bool, response, expected: str) -> None:
    """Fail with the request, the response and what was expected, without a traceback."""
    if not condition:
        pytest.fail(explain(response, expected), pytrace=False)


def error_locs(response) -> list:
    body = json_of(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, list):
        return []
    return [error.get("loc") for error in detail if isinstance(error, dict)]


def expect_rejected(response, field: str, why: str) -> None:
    """422, with one of the errors located at ["body", field]."""
    expect_status(response, 422, why)
    check(["body", field] in error_locs(response), response, f"a validation error whose loc is ['body', '{field}'] ({why})")


# --- register -------------------------------------------------------------------------------


@pytest.mark.task("register")
@pytest.mark.promise("P1")
def test_register_answers_201_with_the_public_profile(registered):
    response = registered.response(0)
    expect_status(response, 201, "a successful registration creates a user: 201 Created")
    expect_json(response, {"id": 1, "username": "ada_lovelace", "email": "ada@example.com", "age": 36}, exact=True)


@pytest.mark.task("register")
@pytest.mark.promise("P5")
def test_age_is_optional(client):
    body = registration()
    del body["age"]
    response = client.post("/users", json=body)
    expect_status(response, 201, "age may be left out")
    expect_json(response, {"age": None}, "a missing age is shown as null")


@pytest.mark.task("register")
@pytest.mark.promise("P3")
def test_users_can_be_read_back_by_id(registered):
    expect_status(registered.response(0), 201, "the first registration succeeds")
    second = registered.response(1)
    expect_json(second, {"id": 2}, "the second user gets id 2")
    response = registered.client.get("/users/2")
    expect_status(response, 200, "GET /users/{user_id} finds the user that was registered")
    expect_json(response, {"id": 2, "username": "grace", "email": "grace@example.com", "age": None}, exact=True)


@pytest.mark.task("register")
@pytest.mark.promise("P2")
def test_the_store_keeps_a_hash_not_the_password(registered):
    response = registered.response(0)
    expect_status(response, 201, "the registration succeeds")
    users = getattr(registered.module, "USERS", None)
    record = users.get(1) if isinstance(users, dict) else None
    stored = getattr(record, "password_hash", None)
    check(record is not None, response, "USERS[1] holds the UserRecord of the user just registered")
    check(
        isinstance(stored, str) and stored.startswith("scrypt$") and PASSWORD not in stored,
        response,
        f"USERS[1].password_hash made by hash_password(...) (it starts with 'scrypt$'); found {stored!r}. "
        "Store the hash, never the password itself",
    )


@pytest.mark.task("register")
@pytest.mark.promise("P3")
def test_unknown_user_is_404(registered):
    response = registered.client.get("/users/9")  # at most two users exist in this app
    expect_status(response, 404, "there is no user 9")
    expect_json(response, {"detail": "User 9 not found"}, exact=True)


# --- constraints ----------------------------------------------------------------------------


@pytest.mark.task("constraints")
@pytest.mark.promise("P4")
def test_username_follows_the_pattern(client):
    for username, problem in [
        ("ab", "is too short"),
        ("a" * 21, "is too long"),
        ("1ada", "starts with a digit"),
        ("ada-l", "has a hyphen"),
        ("zoë", "has a letter outside a-z, which \\w would let in"),
    ]:
        response = client.post("/users", json=registration(username=username))
        expect_rejected(response, "username", f"the username {username!r} {problem}")


@pytest.mark.task("constraints")
@pytest.mark.promise("P5")
def test_age_bounds_are_inclusive(client):
    youngest = client.post("/users", json=registration(username="young", age=13))
    expect_status(youngest, 201, "13 is the lowest age allowed, and it is allowed")
    oldest = client.post("/users", json=registration(username="old", age=120))
    expect_status(oldest, 201, "120 is the highest age allowed, and it is allowed")


@pytest.mark.task("constraints")
@pytest.mark.promise("P5")
def test_age_outside_the_bounds_is_rejected(client):
    for age in (12, 121, -1):
        expect_rejected(client.post("/users", json=registration(age=age)), "age", f"age {age} is outside 13..120")


@pytest.mark.task("constraints")
@pytest.mark.promise("P6")
def test_password_length_is_bounded(client):
    for password, problem in [("abc1234", "7 characters, fewer than 8"), ("a1" * 64 + "a", "129 characters, more than 128")]:
        response = client.post("/users", json=registration(password=password, password_confirm=password))
        expect_rejected(response, "password", f"the password has {problem}")
    # Both ends are allowed: "8 to 128 characters" includes 8 and 128.
    for password, length in [("abcdefg1", 8), ("a1" * 64, 128)]:
        response = client.post("/users", json=registration(password=password, password_confirm=password))
        expect_status(response, 201, f"a password of exactly {length} characters is allowed: 8 to 128, both included")


@pytest.mark.task("constraints")
@pytest.mark.promise("P9")
def test_unknown_fields_are_refused(client):
    response = client.post("/users", json=registration(is_admin=True))
    expect_rejected(response, "is_admin", "a field the model does not declare is refused, not silently dropped")


# --- validators -----------------------------------------------------------------------------


@pytest.mark.task("validators")
@pytest.mark.promise("P4")
def test_username_is_trimmed_and_lowercased_before_the_pattern(client):
    response = client.post("/users", json=registration(username="  Ada_L "))
    expect_status(response, 201, "'  Ada_L ' is cleaned up to 'ada_l' before the pattern is checked")
    expect_json(response, {"username": "ada_l"}, "the stored username is trimmed and lower-case")
    # A before-validator sees the raw input, which need not be a str: leave that to the type check.
    response = client.post("/users", json=registration(username=42))
    expect_rejected(response, "username", "the username 42 is a number, not text")


@pytest.mark.task("validators")
@pytest.mark.promise("P6")
def test_password_needs_a_letter_and_a_digit(client):
    for password, problem in [
        ("abcdefghij", "has no digit"),
        ("1234567890", "has no letter"),
        ("analytical!", "has no digit (it is not all letters, yet no digit either)"),
        ("12345678-9", "has no letter (it is not all digits, yet no letter either)"),
    ]:
        response = client.post("/users", json=registration(password=password, password_confirm=password))
        expect_rejected(response, "password", f"the password {password!r} {problem}")
    # Where the letter and the digit sit, their case and any other characters do not matter.
    password = "2B-OR-NOT-2B"
    response = client.post("/users", json=registration(password=password, password_confirm=password))
    expect_status(response, 201, f"{password!r} has a letter (a capital is a letter too) and a digit, so it is allowed")


@pytest.mark.task("validators")
@pytest.mark.promise("P7")
def test_passwords_must_match(client):
    response = client.post("/users", json=registration(password_confirm="analytical2"))
    expect_status(response, 422, "password and password_confirm differ: a validation error, like any other bad input")
    body = json_of(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    mentions_match = isinstance(detail, list) and any(
        isinstance(error, dict) and "match" in str(error.get("msg", "")).lower() for error in detail
    )
    check(mentions_match, response, "an error in detail whose msg says the passwords do not match")


# --- email ----------------------------------------------------------------------------------


@pytest.mark.task("email")
@pytest.mark.promise("P8")
def test_email_must_be_an_email_address(client):
    for email in ("not-an-email", "ada@", "@example.com", "ada@exa mple.com"):
        expect_rejected(client.post("/users", json=registration(email=email)), "email", f"{email!r} is not an email address")


# --- no_leaks -------------------------------------------------------------------------------


@pytest.mark.task("no_leaks")
@pytest.mark.promise("P10")
def test_responses_never_contain_the_password(registered):
    created = registered.response(0)
    expect_status(created, 201, "the registration succeeds")
    fetched = registered.client.get("/users/1")
    expect_status(fetched, 200, "the user can be read back")
    for response in (created, fetched):
        body = json_of(response)
        keys = set(body) if isinstance(body, dict) else set()
        check(
            keys == PUBLIC_FIELDS,
            response,
            f"exactly the public fields {sorted(PUBLIC_FIELDS)}; extra: {sorted(keys - PUBLIC_FIELDS)} "
            "(return the output model, never the stored record or the input model)",
        )
        check(PASSWORD not in response.text, response, "a body that does not contain the password")


def _response_schema(document: dict, path: str, method: str, code: str) -> dict:
    operation = document.get("paths", {}).get(path, {}).get(method, {})
    schema = operation.get("responses", {}).get(code, {}).get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        schema = document.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return schema


@pytest.mark.task("no_leaks")
@pytest.mark.promise("P11")
def test_openapi_documents_the_output_model(client):
    response = client.get("/openapi.json")
    document = json_of(response)
    for path, method, code in [("/users", "post", "201"), ("/users/{user_id}", "get", "200")]:
        properties = set(_response_schema(document, path, method, code).get("properties", {}))
        check(
            properties == PUBLIC_FIELDS,
            response,
            f"the {code} response of {method.upper()} {path} documented with the output model, "
            f"properties {sorted(PUBLIC_FIELDS)}; found {sorted(properties) or 'no schema'} "
            "(declare the output model as the return annotation or response_model)",
        )


@pytest.mark.task("register")
@pytest.mark.promise("P11")
def test_openapi_documents_the_404_of_a_read(client):
    response = client.get("/openapi.json")
    document = json_of(response)
    responses = document.get("paths", {}).get("/users/{user_id}", {}).get("get", {}).get("responses", {})
    schema = responses.get("404", {}).get("content", {}).get("application/json", {}).get("schema", {})
    check(bool(schema), response, "GET /users/{user_id} documents its 404 with a model for the body "
          f"(`responses={{404: {{\"model\": ...}}}}`); documented: {sorted(responses)}")


# --- error_body -----------------------------------------------------------------------------


@pytest.mark.task("error_body")
@pytest.mark.promise("P11")
def test_openapi_documents_the_422_as_it_is_sent(client):
    response = client.get("/openapi.json")
    document = json_of(response)
    for path, method in [("/users", "post"), ("/users/{user_id}", "get")]:
        error_body = _response_schema(document, path, method, "422")
        detail = error_body.get("properties", {}).get("detail", {})
        item = detail.get("items", {})
        if "$ref" in item:
            item = document.get("components", {}).get("schemas", {}).get(item["$ref"].rsplit("/", 1)[1], {})
        fields = set(item.get("properties", {}))
        check(
            {"type", "loc", "msg"} <= fields and "input" not in fields,
            response,
            f"the 422 of {method.upper()} {path} documented as this service sends it: each error with `type`, "
            f"`loc` and `msg`, and no `input`; found {sorted(fields) or 'no schema'}. FastAPI's own description "
            "lists the `input` your handler removes: declare your error body with `responses={422: {\"model\": ...}}`",
        )


@pytest.mark.task("error_body")
@pytest.mark.promise("P12")
def test_422_body_lists_every_problem_with_type_loc_and_msg(client):
    response = client.post("/users", json=registration(age=12, email="nope", password_confirm="analytical2"))
    expect_status(response, 422, "two invalid fields (and passwords that differ)")
    body = json_of(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    well_formed = isinstance(detail, list) and all(
        isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("loc"), list)
        and isinstance(error.get("msg"), str)
        for error in detail
    )
    check(well_formed, response, '{"detail": [{"type": ..., "loc": [...], "msg": ...}, ...]}, FastAPI\'s shape')
    by_loc = {tuple(error["loc"]): error for error in detail}
    check(
        ("body", "age") in by_loc and ("body", "email") in by_loc,
        response,
        "one error for ['body', 'age'] and one for ['body', 'email']: every problem is reported at once, "
        "and checking that the passwords match must not hide the errors of the fields"
    )
    check(by_loc[("body", "age")]["type"] == "greater_than_equal", response, "the age error keeps Pydantic's type 'greater_than_equal'")
    empty = client.post("/users", json={})
    expect_status(empty, 422, "an empty body: every required field is missing")
    found = {tuple(loc) for loc in error_locs(empty) if isinstance(loc, list)}
    absent = [field for field in ("username", "email", "password", "password_confirm") if ("body", field) not in found]
    check(not absent, empty, f"one error per required field left out (only age is optional); none for {absent}")


@pytest.mark.task("error_body")
@pytest.mark.promise("P13")
def test_422_body_does_not_echo_the_input(client):
    cases = [
        ({"password_confirm": "analytical2"}, "passwords that do not match"),
        ({"password": "analyticalx", "password_confirm": "analyticalx"}, "a password without a digit"),
    ]
    for changes, why in cases:
        response = client.post("/users", json=registration(**changes))
        expect_status(response, 422, why)
        body = json_of(response)
        detail = body.get("detail") if isinstance(body, dict) else None
        echoed = [error for error in detail or [] if isinstance(error, dict) and "input" in error]
        check(
            not echoed and "analytical" not in response.text,
            response,
            "no 'input' in the errors and no password anywhere in the body: "
            "FastAPI's default 422 echoes what was sent, passwords included",
        )


# --- from_attributes ------------------------------------------------------------------------


@pytest.mark.task("from_attributes")
@pytest.mark.promise("P14")
def test_user_out_is_built_from_an_object_with_attributes(load):
    module = load("app", fresh=False)
    user_out = getattr(module, "UserOut", None)
    if user_out is None:
        pytest.fail("app.py must define the output model UserOut (see README.md).", pytrace=False)
    record = SimpleNamespace(id=7, username="grace", email="grace@example.com", age=45, password_hash="scrypt$secret")
    try:
        public = user_out.model_validate(record)
    except ValidationError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        pytest.fail(
            "UserOut.model_validate(<an object with attributes id, username, email, age, password_hash>) raised:\n"
            f"{error}\nexpected: a UserOut read from the object's attributes "
            "(model_config = ConfigDict(from_attributes=True))",
            pytrace=False,
        )
    dumped = public.model_dump(mode="json")
    if dumped != {"id": 7, "username": "grace", "email": "grace@example.com", "age": 45}:
        pytest.fail(
            f"UserOut.model_validate(record).model_dump(mode='json') gave {dumped}\n"
            "expected: exactly id, username, email and age; the password hash stays behind",
            pytrace=False,
        )
