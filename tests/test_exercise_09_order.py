"""09's graded suite orders the learner's tests on each variant: the likeliest catchers first.

Only the order may change what the run costs, never what it finds: the integrity suite checks
that the reference tests still catch every variant and each mutant misses its own. These
tests check that the clues point where they should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from grader.loader import load_module

from .conftest import ROOT

FOLDER = ROOT / "exercises" / "09_testing"
SERVICE = FOLDER / "service.py"


@pytest.fixture(scope="module")
def graded():
    return load_module(FOLDER, "test_testing")


def first_line(name: str) -> int:
    for node in ast.walk(ast.parse(SERVICE.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return min([node.lineno, *(d.lineno for d in node.decorator_list)])
    raise LookupError(name)


def diff(variant: str) -> Path:
    return FOLDER / "variants" / f"{variant}.diff"


def test_a_changed_decorator_points_at_its_function(graded):
    lines, text = graded._changes(diff("created_returns_200"))
    inside, _ = graded._bug_sites(SERVICE, lines)
    assert first_line("create_note") in inside
    assert "status_code" in text


def test_a_changed_model_field_points_at_the_routes_that_take_the_model(graded):
    lines, _ = graded._changes(diff("empty_title_accepted"))
    inside, users = graded._bug_sites(SERVICE, lines)
    assert first_line("create_note") in users
    assert first_line("create_note") not in inside


def test_each_variant_starts_with_the_test_that_reaches_or_names_its_bug(graded):
    lifespan, create, health = first_line("lifespan"), first_line("create_note"), first_line("health")
    calls = {  # as the correct run would note them, in the learner's order
        "test_health_needs_no_key": [lifespan, health],
        "test_create_answers_201_with_location": [lifespan, create],
        "test_creating_a_note_sends_one_notification": [lifespan, create],
        "test_the_audit_is_written_when_the_app_stops": [lifespan, create],
    }
    orders = graded._orders(calls, FOLDER)
    assert orders["created_returns_200"][0] == "test_create_answers_201_with_location"
    assert orders["notification_never_sent"][0] == "test_creating_a_note_sends_one_notification"
    assert orders["audit_lost_at_shutdown"][0] == "test_the_audit_is_written_when_the_app_stops"
    for variant, order in orders.items():
        assert sorted(order) == sorted(calls), f"{variant}: every test still runs, only the order changes"


def test_an_unreadable_variant_keeps_the_learners_order(graded, tmp_path):
    (tmp_path / "variants").mkdir()
    (tmp_path / "service.py").write_text(SERVICE.read_text(encoding="utf-8"), encoding="utf-8")
    calls = {"test_b": [1], "test_a": [2]}
    orders = graded._orders(calls, tmp_path)  # no diff files at all
    assert all(order == ["test_b", "test_a"] for order in orders.values())
