"""Attacks on the reference solution of exercise 04 (dependencies): the defences hold.

A bulk import as large as the route allows stays linear, so its time on the event loop stays
short; a longer one is refused before any work; duplicates in every spelling are caught and roll the whole import back; hostile page
parameters, headers and cookies never cause a 5xx.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "04_dependencies"
ADMIN = {"X-User": "ada", "X-API-Key": "dev-key"}


@pytest.fixture
def module():
    return load_module(Path(SOLUTION), "app")


def batch(first: int, count: int) -> list[dict[str, str]]:
    return [{"title": f"Tome {first + n}", "author": "A. Writer"} for n in range(count)]


def test_04_dependencies_the_largest_import_is_linear(module):
    with TestClient(module.app) as client:
        def timed(first: int, count: int) -> float:
            # CPU seconds of this process (the app runs in TestClient's thread): a busy machine
            # stretches the wall clock of one import, not the work it does
            started = time.process_time()
            response = client.post("/admin/books/import", headers=ADMIN, json=batch(first, count))
            assert response.status_code == 201, response.text[:200]
            return time.process_time() - started

        small = min(timed(0, 1250), timed(10_000, 1250))
        large = min(timed(20_000, module.MAX_IMPORT), timed(30_000, module.MAX_IMPORT))
    # 4 times the books: about 4 times the time; a quadratic import would take about 16 times.
    assert large / small < 8, f"1,250 books in {small * 1000:.0f} ms, 5,000 in {large * 1000:.0f} ms"


def test_04_dependencies_an_oversized_import_is_refused_and_saves_nothing(module):
    with TestClient(module.app) as client:
        before = client.get("/books", params={"limit": 50}).json()["items"]
        for count in (module.MAX_IMPORT + 1,):
            response = client.post("/admin/books/import", headers=ADMIN, json=batch(0, count))
            assert response.status_code == 422, (count, response.status_code)
        assert client.get("/books", params={"limit": 50}).json()["items"] == before


@pytest.mark.parametrize(
    "duplicate",
    ["Dune", "DUNE", "dUnE", "Tome 3", "TOME 3"],
)
def test_04_dependencies_a_duplicate_anywhere_rolls_the_whole_import_back(module, duplicate):
    with TestClient(module.app) as client:
        before = client.get("/books", params={"limit": 50}).json()["items"]
        books = batch(0, 1000)
        books.insert(999, {"title": duplicate, "author": "Someone"})  # near the end, after 999 were added
        response = client.post("/admin/books/import", headers=ADMIN, json=books)
        assert response.status_code == 409, (duplicate, response.status_code, response.text[:200])
        assert client.get("/books", params={"limit": 50}).json()["items"] == before
        # ß casefolds to ss: the same title for a reader, and for the duplicate check.
        twins = [{"title": "Die Straße", "author": "x"}, {"title": "DIE STRASSE", "author": "y"}]
        assert client.post("/admin/books/import", headers=ADMIN, json=twins).status_code == 409


HOSTILE_QUERIES = [
    {"offset": str(2**63)}, {"offset": str(10**100)}, {"offset": "1" * 5000}, {"offset": "-1"},
    {"offset": "1e309"}, {"offset": "nan"}, {"offset": "inf"}, {"offset": "0x10"}, {"limit": "50.0"},
    {"limit": str(2**64)}, {"limit": "-0"}, {"q": "x" * 51}, {"q": "\x00"}, {"q": "%"}, {"q": "../../etc"},
]


@pytest.mark.parametrize("path", ["/books", "/authors"])
def test_04_dependencies_hostile_page_parameters_are_never_a_5xx(module, path):
    with TestClient(module.app, raise_server_exceptions=False) as client:
        for params in HOSTILE_QUERIES:
            response = client.get(path, params=params)
            assert response.status_code in (200, 422), (params, response.status_code, response.text[:200])
        client.cookies.set("last_search", "y" * 4000)
        assert client.get(path).status_code in (200, 422)


def test_04_dependencies_hostile_headers_are_401_not_500(module):
    with TestClient(module.app, raise_server_exceptions=False) as client:
        for headers in (
            {"X-User": "ada", "X-API-Key": "dev-keyé".encode()},
            {"X-User": "ada", "X-API-Key": "x" * 10_000},
            {"X-User": "ada", "X-API-Key": ""},
            {"X-User": "adá".encode(), "X-API-Key": "dev-key"},
            {"X-User": "", "X-API-Key": "dev-key"},
        ):
            response = client.post("/admin/books", headers=headers, json={"title": "Kindred", "author": "O. E. Butler"})
            assert response.status_code == 401, (headers, response.status_code)


@pytest.mark.parametrize("number", ["1e309", "-1e309", "NaN", "Infinity", "1" * 5000])
def test_04_dependencies_numbers_json_cannot_write_back_are_4xx(module, number):
    with TestClient(module.app, raise_server_exceptions=False) as client:
        headers = {**ADMIN, "Content-Type": "application/json"}
        for url, body in (("/admin/books", f'{{"title": {number}, "author": "A"}}'),
                          ("/admin/books/import", f'[{{"title": "T", "author": {number}}}]'),
                          ("/admin/books/import", f"[{number}]"), ("/admin/books/import", number)):
            response = client.post(url, content=body, headers=headers)
            assert response.status_code in (400, 422), (url, body[:40], response.status_code, response.text[:200])
