"""Attacks on the reference solution of exercise 03 (REST resources): the defences hold.

Numbers no item may carry (infinity, NaN and huge integers, as JSON numbers, non-standard
literals and strings), numbers in the URL past their bounds, bodies that are not even text,
decoded-path tricks on the item routes: each is a 4xx problem (RFC 9457), nothing is
stored, and no answer is ever a 5xx or carries a `null` price. The OpenAPI document lists
every status the attacks produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from grader.live import http_only, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "03_rest_resources"
JSON = {"content-type": "application/json"}

NON_FINITE = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", '"inf"', '"-inf"', '"nan"', '"NaN"', '"Infinity"',
              '"1e309"', '"-1e309"', "1e400", '"1E309"', '" inf "']
HUGE = [str(10**400), str(2**63), str(2**64), "1000000.0001", "1e7", '"1e7"']
NOT_AN_ID = ["0", "-1", "2147483648", str(2**63), str(10**400), "1e309", "inf", "-inf", "nan", "NaN", "Infinity", "1.5",
             "1e3", "0x10", "%20inf"]


@pytest.fixture(scope="module")
def module():
    return load_module(Path(SOLUTION), "app")


@pytest.fixture
def client(module):
    with TestClient(module.create_app(), raise_server_exceptions=False) as client:
        yield client


PROBLEM_MEMBERS = {"type", "title", "status", "detail", "instance"}


def is_problem(response: httpx.Response, status: int | None = None) -> bool:
    """A problem of this status (any 4xx when None), its input never echoed."""
    body = response.json()
    return (response.headers.get("content-type") == "application/problem+json" and isinstance(body, dict)
            and PROBLEM_MEMBERS <= set(body) and body["status"] == response.status_code
            and (status is None and 400 <= response.status_code < 500 or response.status_code == status)
            and all(set(error) == {"loc", "msg", "type"} for error in body.get("errors", [])))


def every_item(client: TestClient) -> list[dict]:
    return client.get("/api/v1/items", params={"limit": 100}).json()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_non_finite_and_huge_prices_are_refused_and_never_stored(client, version):
    kept = client.post(f"/api/{version}/items", json={"name": "kept", "price": 2.5}).json()
    for raw in NON_FINITE + HUGE:
        created = client.post(f"/api/{version}/items", content=f'{{"name": "n {raw}", "price": {raw}}}', headers=JSON)
        replaced = client.put(f"/api/{version}/items/{kept['id']}", content=f'{{"name": "kept", "price": {raw}}}',
                              headers=JSON)
        for response in (created, replaced):
            assert response.status_code == 422, (raw, response.status_code, response.text)
            assert is_problem(response, 422), response.text
    assert every_item(client) == [kept], "no refused price was stored, and the kept item kept its price"


def test_every_answer_carries_finite_prices(client):
    for price in (5e-324, 1e-300, 0.1, 999_999.999999, 1_000_000):
        assert client.post("/api/v1/items", json={"name": f"p{price}", "price": price}).status_code == 201
    for url in ("/api/v1/items?limit=100", "/api/v2/items?limit=100"):
        raw = client.get(url).text
        items = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{url} wrote {name}"))
        items = items["items"] if isinstance(items, dict) else items
        assert all(isinstance(item["price"], float) and math.isfinite(item["price"]) for item in items), raw


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_numbers_in_the_url_past_their_bounds_are_422(client, version):
    for raw in NOT_AN_ID:
        for method, body in (("GET", None), ("PUT", {"name": "x", "price": 1}), ("DELETE", None)):
            response = client.request(method, f"/api/{version}/items/{raw}", json=body)
            assert response.status_code == 422, (method, raw, response.status_code, response.text)
            assert is_problem(response, 422), response.text
    for name, raws in (("limit", ["0", "101", "inf", "nan", "1e309", str(10**400)]),
                       ("offset", ["-1", "2147483648", "inf", "nan", "1e309", str(10**400)])):
        for raw in raws:
            response = client.get(f"/api/{version}/items", params={name: raw})
            assert response.status_code == 422, (name, raw, response.status_code, response.text)
    assert client.get(f"/api/{version}/items/2147483647").status_code == 404


def test_bodies_that_are_not_json_text_are_4xx_problems(client):
    item = client.post("/api/v1/items", json={"name": "target", "price": 1}).json()
    for content in (b"\xff\xfe{", b'{"name": "x", "price": 1', b"", b"[]", b"null", b'{"name": "x", "price": 1}' * 2,
                    b'{"name": "\xed\xa0\x80", "price": 1}'):
        for method, url in (("POST", "/api/v2/items"), ("PUT", f"/api/v2/items/{item['id']}")):
            response = client.request(method, url, content=content, headers=JSON)
            assert response.status_code in (400, 422), (method, content, response.status_code, response.text)
            assert is_problem(response), response.text
    assert every_item(client) == [item]


def test_the_schema_documents_every_status_the_attacks_produced(module):
    app = module.create_app()
    operations = app.openapi()["paths"]
    for version in ("v1", "v2"):
        for path, method, codes in (
            ("/items", "post", {"201", "400", "409", "422"}),
            ("/items", "get", {"200", "422"}),
            ("/items/{item_id}", "get", {"200", "404", "422"}),
            ("/items/{item_id}", "put", {"200", "400", "404", "409", "422"}),
            ("/items/{item_id}", "delete", {"204", "404", "422"}),
        ):
            documented = set(operations[f"/api/{version}{path}"][method]["responses"])
            assert codes <= documented, (version, path, method, sorted(documented))


def test_decoded_paths_on_a_real_server_never_reach_another_route(module):
    # Raw paths need a real server: TestClient would normalise them before the app saw them.
    with serve_in_thread(module.create_app(), ws="none") as base_url, \
            httpx.Client(base_url=base_url, verify=http_only(), timeout=5) as http:
        http.post("/api/v1/items", json={"name": "only", "price": 1})
        for raw in ("/api/v1/items/1%2F..", "/api/v1/items/%2e%2e", "/api/v1/items/..%2F1", "/api/v1/items/1%00",
                    "/api/v1/items/%31", "/api/v1/items/1/..", "/api/v1/items/%2F", "/api/v2/items/1e309",
                    "/api/v1/items/1%20", "/api/v1/items/%EF%BC%91"):
            response = http.send(http.build_request("GET", httpx.URL(base_url + raw)))
            assert response.status_code < 500, (raw, response.status_code, response.text)
            if 300 <= response.status_code < 400:  # Starlette's trailing-slash redirect, to this same server
                assert response.headers["location"].startswith(base_url + "/api/"), (raw, response.headers)
                continue
            body = response.json()
            if response.status_code >= 400:
                assert is_problem(response), (raw, response.text)
            else:  # the path decoded to item 1 itself, or was normalised to the collection
                assert body in ({"id": 1, "name": "only", "price": 1.0}, [{"id": 1, "name": "only", "price": 1.0}]), (
                    raw, response.text)
