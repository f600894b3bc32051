"""09's graded suite: the learner's tests on each variant, the likeliest catchers first, and
services that only their behaviour tells apart.

Only the order may change what the run costs, never what it finds: the integrity suite checks
that the reference tests still catch every variant and each mutant misses its own. These
tests check that the clues point where they should, and that a test cannot recognise the
correct service by anything but its behaviour.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
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


NOSY_TESTS = """
def test_the_service_is_the_correct_one(service):
    # Not a test of behaviour: it guesses from where the service was loaded. Outside grading,
    # the correct service is exercises/09_testing/service.py and each variant a copy elsewhere.
    assert service.__file__.endswith("09_testing/service.py")
"""


def test_a_test_that_looks_at_how_the_service_was_loaded_catches_nothing(tmp_path):
    (tmp_path / "service_tests.py").write_text(textwrap.dedent(NOSY_TESTS), encoding="utf-8")
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pytest", str(FOLDER), "-q", "-p", "no:cacheprovider",
                    "--grader-target", str(tmp_path), "--grader-report", str(report)],
                   cwd=ROOT, capture_output=True, timeout=300)
    outcomes = {test["nodeid"].rsplit("::", 1)[-1]: test["outcome"] for test in json.loads(report.read_text())["tests"]}
    assert outcomes["test_your_tests_pass_on_the_correct_service"] == "failed", (
        "while grading, the correct service is a copy loaded like the variants")
    assert not [name for name, outcome in outcomes.items() if outcome == "passed"], outcomes


WHERE_TESTS = """
import os
from pathlib import Path


def test_where_am_i(service):
    with Path(os.environ["NOTES_TEST_CWD_LOG"]).open("a") as log:
        log.write(os.getcwd() + "\\n")
"""


def test_the_correct_run_has_a_working_folder_of_its_own(tmp_path):
    # The variants' processes run while the correct run does: a test that writes `notes.db` in
    # its working folder must not meet one written on a variant, or the gate could fail at random.
    (tmp_path / "service_tests.py").write_text(textwrap.dedent(WHERE_TESTS), encoding="utf-8")
    log = tmp_path / "cwds.txt"
    subprocess.run([sys.executable, "-m", "pytest", str(FOLDER), "-q", "-p", "no:cacheprovider",
                    "--grader-target", str(tmp_path), "--grader-report", str(tmp_path / "report.json")],
                   cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "NOTES_TEST_CWD_LOG": str(log)})
    folders = Counter(log.read_text(encoding="utf-8").split())
    # The test passes on every service, so it ran on each: once in the correct run, and once per
    # variant in the variants' processes (each runs several variants, one after the other).
    assert sum(folders.values()) == 9, folders
    alone = [folder for folder, count in folders.items() if count == 1]
    assert len(alone) == 1, f"the correct run shares its working folder: {folders}"
    assert str(ROOT) not in folders


ORDER_TESTS = """
import os
from pathlib import Path

import pytest


@pytest.fixture
def noted(request):
    with Path(os.environ["NOTES_TEST_ORDER_LOG"]).open("a") as log:
        log.write(request.node.name + "\\n")


def test_create_answers_201(service, noted):
    pass


def test_empty_title_is_422(service, noted):
    pass


def test_audit_is_flushed(service, noted):
    pass


def test_feed_refuses_a_wrong_key(service, noted):
    pass
"""


def test_each_variant_starts_with_the_tests_its_words_suggest_and_the_order_never_changes(graded, tmp_path):
    (tmp_path / "service_tests.py").write_text(textwrap.dedent(ORDER_TESTS), encoding="utf-8")
    runs = []
    for attempt in range(2):
        log = tmp_path / f"order-{attempt}.txt"
        subprocess.run([sys.executable, "-m", "pytest", str(FOLDER), "-q", "-p", "no:cacheprovider",
                        "--grader-target", str(tmp_path), "--grader-report", str(tmp_path / "report.json")],
                       cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "NOTES_TEST_ORDER_LOG": str(log)})
        sequences: dict[str, list[str]] = {}
        for line in log.read_text(encoding="utf-8").split():
            name, _, variant = line.rstrip("]").partition("[")
            sequences.setdefault(variant, []).append(name)
        runs.append(sequences)
    names = ["test_create_answers_201", "test_empty_title_is_422", "test_audit_is_flushed", "test_feed_refuses_a_wrong_key"]
    by_words = graded._orders({name: [] for name in names}, FOLDER)
    assert runs[0]["correct"] == names, "the correct run keeps the file's order"
    for variant in graded.VARIANTS:
        # these tests pass everywhere, so each variant runs all of them
        assert sorted(runs[0][variant]) == sorted(names), variant
        assert runs[0][variant][:2] == by_words[variant][:2], f"{variant}: first the tests whose names share its words"
    assert runs[0] == runs[1], "the same tests run in the same order every time"


def test_the_children_leave_out_the_plugins_that_the_learners_own_run_leaves_out(graded):
    # `pytest exercises/09_testing/service_tests.py` runs with pyproject.toml's addopts; the
    # children that grade the same file must load the same plugins (and not pay for the others).
    import tomllib

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]["addopts"]
    left_out = {addopts[i + 1] for i, option in enumerate(addopts[:-1]) if option == "-p" and addopts[i + 1].startswith("no:")}
    assert left_out, "pyproject.toml leaves out no plugin: this test has nothing to compare"
    line = next(line for line in graded.PYTEST_INI.splitlines() if line.startswith("addopts"))
    words = line.partition("=")[2].split()
    children = {words[i + 1] for i, word in enumerate(words[:-1]) if word == "-p"}
    assert left_out <= children, f"the children's pytest.ini loads {sorted(left_out - children)}"
