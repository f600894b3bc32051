"""Attacks on the reference solution of exercise 06 (background tasks): the defences hold.

Bodies whose values JSON cannot write back (1e309 reads as infinity, NaN), huge numbers, the
fields in the query string instead of the body, and names that look like paths: each is a 4xx
(or, for the odd name, a 201 whose message lands at `<outbox>/<id>.json` and nowhere else), no
answer is a 5xx, and a refused signup sends no welcome. One check runs over a real uvicorn socket.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from grader.live import http_only, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "06_background_tasks"
JSON = {"content-type": "application/json"}
NOT_TEXT = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", str(10**400), str(2**63), "true", "null", "[]", "{}"]


@pytest.fixture(scope="module")
def module():
    return load_module(Path(SOLUTION), "app")


@pytest.fixture
def outbox(tmp_path):
    return tmp_path / "outbox"


@pytest.fixture
def client(module, outbox):
    with TestClient(module.create_app(outbox), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("field", ["email", "name"])
def test_values_json_cannot_write_back_are_a_422_not_a_500(client, outbox, field):
    for raw in NOT_TEXT:
        body = {"email": '"ada@example.com"', "name": '"Ada"', field: raw}
        response = client.post("/signup", content="{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}",
                               headers=JSON)
        assert response.status_code == 422, (field, raw, response.status_code, response.text)
        assert "input" not in response.text, response.text  # the rejected value is not echoed
    assert sorted(outbox.iterdir()) == []
    assert client.get("/events").json() == []


def test_the_fields_in_the_query_string_are_refused(client, outbox):
    response = client.post("/signup", params={"email": "ada@example.com", "name": "Ada"})
    assert response.status_code == 422
    assert sorted(outbox.iterdir()) == []


def test_a_name_that_looks_like_a_path_stays_in_the_message(client, outbox):
    response = client.post("/signup", json={"email": "ada@example.com", "name": "../../etc/passwd"})
    assert response.status_code == 201
    assert sorted(path.name for path in outbox.iterdir()) == ["1.json"]


def test_a_non_finite_value_over_a_real_socket_is_a_422(module, tmp_path):
    with serve_in_thread(module.create_app(tmp_path / "outbox")) as base_url:
        with httpx.Client(base_url=base_url, verify=http_only()) as client:
            response = client.post("/signup", content='{"email": 1e309, "name": NaN}', headers=JSON)
            documented = client.get("/openapi.json").json()["paths"]["/signup"]["post"]["responses"]
    assert response.status_code == 422, response.text
    assert {"201", "400", "409", "422"} <= set(documented)
