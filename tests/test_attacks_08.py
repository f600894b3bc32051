"""Attacks on the reference solution of exercise 08 (the async database): the defences hold.

Integers no column can hold, in every place the API reads one (path, query, body), sent to a
real uvicorn server as raw request lines and in process as JSON: each is a 4xx before any SQL
runs, never the driver's OverflowError as a 500. A filter that names nobody is an empty page.
"""

from __future__ import annotations

import http.client
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from grader.live import serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "08_database"
HUGE = ["9223372036854775808", "9223372036854775807", "18446744073709551616", "2147483648",
        "-9223372036854775809", "1" + "0" * 40, "1" * 4400, "1e3", "1.5", "0x10", "inf", "nan"]


@pytest.fixture
def app(tmp_path: Path):
    module = load_module(Path(SOLUTION), "app")
    return module.create_app(module.Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'attack.db'}"))


@pytest.fixture
def server(app) -> Iterator[str]:
    with serve_in_thread(app) as base_url:
        yield base_url


def raw(base_url: str, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request with this exact request target: no client library re-encodes it."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_08_database_huge_integers_on_a_real_server_are_4xx(server):
    status, body = raw(server, "POST", "/authors", json.dumps({"name": "Ada"}).encode())
    assert status == 201, body
    book = json.dumps({"title": "T", "isbn": "9780000000001", "year": 2000}).encode()
    for number in HUGE:
        for method, target, payload in (
            ("GET", f"/authors/{number}", None),
            ("POST", f"/authors/{number}/books", book),
            ("GET", f"/books?offset={number}", None),
            ("GET", f"/books?limit={number}", None),
            ("GET", f"/books?author_id={number}", None),
            ("GET", f"/books?offset=0&author_id=1&offset={number}", None),  # the last repeat wins
        ):
            status, answer = raw(server, method, target, payload)
            assert 400 <= status < 500, (method, target[:80], status, answer[:200])


def test_08_database_huge_numbers_in_json_bodies_are_4xx(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        author = client.post("/authors", json={"name": "Grace"}).json()
        for year in ("9223372036854775808", "1e309", "-1e309", "1" * 5000, "2100.5", "true", "null", '"2000"'):
            body = '{"title": "T", "isbn": "9780000000002", "year": ' + year + "}"
            for url, payload in (
                (f"/authors/{author['id']}/books", body),
                ("/authors", '{"name": "N' + year[:20] + '", "books": [' + body + "]}"),
            ):
                response = client.post(url, content=payload, headers={"Content-Type": "application/json"})
                # "2000" as a string is coerced by pydantic's lax mode: a valid year, a 201. A number
                # of 5,000 digits is past what Python's JSON reader parses: 400, before validation.
                assert response.status_code in (201, 400, 422), (url, year[:30], response.status_code, response.text[:200])
                assert response.status_code == 201 or response.json()["detail"], response.text
        for raw_body in (b"NaN", b'{"name": NaN}', b"\xff\xfe", b"[" * 100_000):
            response = client.post("/authors", content=raw_body, headers={"Content-Type": "application/json"})
            assert response.status_code in (400, 422), (raw_body[:20], response.status_code)


def test_08_database_a_filter_naming_nobody_is_an_empty_page(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/authors", json={"name": "Ursula", "books": [{"title": "T", "isbn": "9780000000003", "year": 1974}]})
        for author_id in (2, 12345, 2**31 - 1):
            response = client.get("/books", params={"author_id": author_id})
            assert response.status_code == 200, response.text
            assert response.json()["items"] == [] and response.json()["total"] == 0
        assert client.get(f"/authors/{2**31 - 1}").status_code == 404
        assert client.get("/books", params={"offset": 2**31 - 1}).json()["items"] == []


def test_08_database_an_isbn_has_one_spelling_on_a_real_server(server):
    # Every script whose digits Unicode calls decimal: `\d` would take each of them, and the same
    # ISBN in another script would be a second row that the unique constraint cannot see.
    status, body = raw(server, "POST", "/authors", json.dumps({"name": "Ada"}).encode())
    assert status == 201, body
    ascii_isbn = "9780060512750"
    status, body = raw(server, "POST", "/authors/1/books",
                       json.dumps({"title": "T", "isbn": ascii_isbn, "year": 1974}).encode())
    assert status == 201, body
    zeros = [code for code in range(0x110000) if unicodedata.category(chr(code)) == "Nd" and unicodedata.digit(chr(code)) == 0]
    assert len(zeros) > 50
    for zero in zeros[1:]:   # zeros[0] is the ASCII 0
        spelled = "".join(chr(zero + int(c)) for c in ascii_isbn)
        for target, payload in (("/authors/1/books", {"title": "T", "isbn": spelled, "year": 1974}),
                                ("/authors", {"name": f"N{zero}", "books": [{"title": "T", "isbn": spelled, "year": 1974}]})):
            status, answer = raw(server, "POST", target, json.dumps(payload).encode())
            assert status == 422, (hex(zero), target, status, answer[:200])
    status, body = raw(server, "GET", "/books")
    assert json.loads(body)["total"] == 1
