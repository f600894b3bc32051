"""Instructor grading under attack: one class of honest, faulty and hostile submissions.

The whole class is graded once (exercise 01, with hidden tests) and every learner's verdict
is checked, which also shows that no submission disturbs another. Then every report format
is read back, its escaping checked, and the HTML overview opened in a real headless browser.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from grader.grading import GradingOptions, grade
from grader.reports import write_reports
from grader.reports.json_report import read, schema
from grader.results import ClassResult

from .conftest import ROOT
from .grading_support import EXERCISE, HOSTILE, SECRET, STUB, course_copy

NASTY_NAMES = ['=HYPERLINK("http:evil")', "<img src=x onerror=alert(1)>", "::error::pwned"]
HIDDEN_TEST = f'''
import pytest


@pytest.fixture
def client(load):
    from fastapi.testclient import TestClient

    with TestClient(load("app").app) as client:
        yield client


@pytest.mark.task("edge")
def test_add_handles_negative_numbers(client):
    assert client.get("/add", params={{"a": "-2", "b": "-3"}}).json() == {{"result": -5}}, "{SECRET}"


@pytest.mark.task("edge")
def test_unknown_item_says_so(client):
    assert client.get("/items/999").status_code == 404, "{SECRET}"


def test_health_is_json(client):
    assert client.get("/health").headers["content-type"].startswith("application/json"), "{SECRET}"
'''


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassResult, Path]:
    base = tmp_path_factory.mktemp("grading")
    submissions = base / "submissions"
    submissions.mkdir()
    for name, case in HOSTILE.items():
        case.build(submissions / name)
    for name in NASTY_NAMES:
        course_copy(submissions / name, STUB)
    hidden = base / "hidden" / EXERCISE
    hidden.mkdir(parents=True)
    (hidden / "test_hidden_edges.py").write_text(HIDDEN_TEST, encoding="utf-8")
    (hidden / "hidden.toml").write_text('default_points = 0.5\n\n[[tasks]]\nid = "edge"\ntitle = "Edges"\npoints = 2\n',
                                        encoding="utf-8")
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, hidden=hidden.parent,
                                  exercises=["01"], jobs=4, timeout=10))
    out = base / "report"
    assert write_reports(result, out) == []
    return result, out


def _learner(result: ClassResult, name: str):
    return next(learner for learner in result.learners if learner.learner == name)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_submission_gets_its_verdict(graded, name):
    result, _ = graded
    case = HOSTILE[name]
    exercise = _learner(result, name).exercise(EXERCISE)
    assert exercise is not None
    assert exercise.status == case.status, f"{name}: {exercise.status}: {exercise.message}"
    if case.points is not None:
        visible = sum(t.points for t in exercise.tests if not t.hidden)
        assert visible == pytest.approx(case.points), f"{name}: {exercise.message}"
    assert exercise.message or exercise.status == "passed", "every verdict but a pass says why"


def test_a_hang_keeps_the_points_of_the_tests_that_finished(graded):
    exercise = _learner(graded[0], "hang_in_a_test").exercise(EXERCISE)
    assert 0 < exercise.points < exercise.max_points
    assert any(t.outcome == "missing" for t in exercise.tests)


def test_hidden_tests_score_apart_and_never_show_their_source(graded):
    result, out = graded
    info = result.exercises[0]
    assert (info.hidden_tests, info.hidden_max_points) == (3, 2.5)  # 2 points of task "edge" + 0.5 by default
    assert info.max_points == pytest.approx(10 + 2.5)
    honest = _learner(result, "honest_solution").exercise(EXERCISE)
    hidden = [t for t in honest.tests if t.hidden]
    assert len(hidden) == 3 and all(t.nodeid.startswith(f"hidden/{EXERCISE}/") for t in hidden)
    assert honest.points == pytest.approx(12.5) and honest.status == "passed"
    stub = _learner(result, "honest_stub").exercise(EXERCISE)
    failed_hidden = [t for t in stub.tests if t.hidden and not t.passed]
    assert failed_hidden and all("hidden test failed" in t.message for t in failed_hidden)
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path


def test_nothing_a_run_leaves_in_shared_folders_outlives_it(graded):
    # the sandbox probe writes /run/lock/left-by-a-learner; every run has a /run/lock of its own
    assert not Path("/run/lock/left-by-a-learner").exists()


def test_the_class_run_reports_its_protections(graded):
    result, _ = graded
    names = {p.name: p.active for p in result.protections}
    assert names["resource limits"] and names["separate process tree"] and names["signed result channel"]
    assert "pid namespace" in names and "unprivileged uid" in names and "minimal file system view" in names


# --------------------------------------------------------------------------- reports


def test_json_report_round_trips_and_matches_the_committed_schema(graded):
    result, out = graded
    assert read(out / "report.json") == result
    committed = json.loads((ROOT / "docs" / "grading-report.schema.json").read_text(encoding="utf-8"))
    assert committed == schema(), "regenerate: python -m grader.reports.json_report > docs/grading-report.schema.json"


def test_csv_has_a_row_per_learner_and_no_formula(graded):
    result, out = graded
    with open(out / "grades.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["learner", EXERCISE, "total", "max_total"]
    assert len(rows) == 1 + len(result.learners)
    for row in rows[1:]:
        assert not row[0].startswith(("=", "+", "-", "@")), row
        assert float(row[-2]) <= float(row[-1])
    assert "'=HYPERLINK(\"http:evil\")" in [row[0] for row in rows]


def test_junit_xml_parses_with_a_suite_per_learner_and_exercise(graded):
    result, out = graded
    root = ET.parse(out / "junit.xml").getroot()
    suites = root.findall("testsuite")
    assert len(suites) == len(result.learners)
    assert int(root.get("tests")) == sum(int(s.get("tests")) for s in suites)
    flood = next(s for s in suites if s.get("name").startswith("output_flood"))
    assert flood.find("testcase/error") is not None


def test_markdown_summary_is_inert(graded):
    _, out = graded
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "<img" not in summary
    assert not any(line.lstrip().startswith(("::", "##[")) for line in summary.splitlines())
    assert "tampering" in summary


def test_classroom_results_add_up(graded):
    result, out = graded
    files = sorted((out / "classroom").glob("*.json"))
    assert len(files) == len(result.learners)
    for path in files:
        document = json.loads(path.read_text(encoding="utf-8"))
        assert json.loads(base64.b64decode(path.with_suffix(".b64").read_text())) == document
        assert document["version"] == 1 and document["status"] in ("pass", "fail", "error")
    honest = json.loads(next((out / "classroom").glob("honest_solution-*.json")).read_text())
    assert honest["status"] == "pass" and honest["max_score"] == pytest.approx(12.5)
    assert sum(test["score"] for test in honest["tests"]) == pytest.approx(12.5)
    # patching pytest earns no more than the untouched stub it rides on (which passes two hidden tests)
    stub = json.loads(next((out / "classroom").glob("error-pwned-*.json")).read_text())
    tampered = json.loads(next((out / "classroom").glob("monkeypatches_pytest-*.json")).read_text())
    assert tampered["status"] == "fail" and stub["status"] == "fail"
    assert sum(test["score"] for test in tampered["tests"]) == sum(test["score"] for test in stub["tests"])
    assert {test["name"]: test["score"] for test in tampered["tests"]} == {test["name"]: test["score"] for test in stub["tests"]}
    pwned = json.loads(next((out / "classroom").glob("error-pwned-*.json")).read_text())
    assert all(not t["message"].lstrip().startswith("::") for t in pwned["tests"])


def test_html_escapes_learner_text(graded):
    _, out = graded
    index = (out / "html" / "index.html").read_text(encoding="utf-8")
    assert "<img src=x" not in index and "&lt;img src=x onerror=alert(1)&gt;" in index
    pages = list((out / "html" / "learners").glob("*.html"))
    assert len(pages) == len(graded[0].learners)


def test_reports_replace_the_folder_whole(graded, tmp_path):
    result, _ = graded
    target = tmp_path / "report"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier run")
    assert write_reports(result, target) == []
    assert not (target / "stale.txt").exists() and (target / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report"], "no half-built or retired folder is left behind"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_overview_renders_in_a_headless_browser(graded, tmp_path):
    result, out = graded
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--dump-dom", (out / "html" / "index.html").as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    table = _Overview()
    table.feed(dom)
    assert len(table.rows) == len(result.learners), dom[:2000]
    by_learner = {row[0][0]: row for row in table.rows}
    assert "hsl(120" in by_learner["honest_solution"][1][0]
    assert int(by_learner["honest_stub"][1][0].split("hsl(")[1].split(",")[0]) < 30, "a stub's cell is red"
    assert "<img src=x onerror=alert(1)>" in by_learner, "the name is shown as text"
    assert "<img" not in dom, "and never becomes an element"


class _Overview(HTMLParser):
    """Rows of the overview table as [(style, text), …] per cell, from the browser's DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self.in_table = self.in_body = False
        self.cell: list[str] | None = None
        self.style = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "table" and attributes.get("id") == "overview":
            self.in_table = True
        elif self.in_table and tag == "tbody":
            self.in_body = True
        elif self.in_body and tag == "tr":
            self.rows.append([])
        elif self.in_body and tag == "td":
            self.cell, self.style = [], attributes.get("style") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None:
            text = "".join(self.cell).strip()
            self.rows[-1].append((self.style, text) if self.rows[-1] else (text.splitlines()[0], text))
            self.cell = None
        elif tag == "table" and self.in_table:
            self.in_table = self.in_body = False

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def test_a_broken_report_format_costs_only_itself(graded, tmp_path, monkeypatch):
    from grader.reports import junit

    def broken(result, folder):
        raise RuntimeError("boom")

    monkeypatch.setattr(junit, "write", broken)
    failures = write_reports(graded[0], tmp_path / "report")
    assert failures == ["junit: RuntimeError: boom"]
    assert (tmp_path / "report" / "report.json").is_file() and (tmp_path / "report" / "html" / "index.html").is_file()
    assert "boom" in (tmp_path / "report" / "REPORT-ERRORS.txt").read_text()


def test_exercise_09_grades_the_learners_own_tests_inside_the_sandbox(tmp_path):
    # 09's graded suite runs the learner's tests in child pytest processes forked from the
    # sandboxed run: the reference earns every point, the stub only what its tests catch.
    submissions = tmp_path / "submissions"
    for name, source in (("reference", ROOT / "solutions" / "09_testing"), ("stub", ROOT / "exercises" / "09_testing")):
        folder = submissions / name / "exercises" / "09_testing"
        folder.mkdir(parents=True)
        shutil.copyfile(source / "service_tests.py", folder / "service_tests.py")
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["09"], jobs=2))
    reference = _learner(result, "reference").exercise("09_testing")
    assert reference is not None and reference.status == "passed", reference and reference.message
    stub = _learner(result, "stub").exercise("09_testing")
    assert stub is not None and stub.status == "failed", stub and stub.message
    assert stub.points < stub.max_points
    assert not any("could not run your tests" in t.message for t in stub.tests), [t.message for t in stub.tests]


def test_exercise_10_starts_its_real_servers_inside_the_sandbox(tmp_path):
    # 10's end-to-end test starts both services as uvicorn processes; in a graded run they are
    # forked by the run's own launcher, inside the run's sandbox, and must answer there.
    submissions = tmp_path / "submissions"
    exercise = ROOT / "exercises" / "10_service_communication"
    for name, source in (("reference", ROOT / "solutions" / "10_service_communication"), ("stub", exercise)):
        folder = submissions / name / "exercises" / exercise.name
        folder.mkdir(parents=True)
        for path in source.glob("*.py"):
            if not path.name.startswith(("test_", "conftest")):
                shutil.copyfile(path, folder / path.name)
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["10"], jobs=2))
    assert not result.warnings, result.warnings
    reference = _learner(result, "reference").exercise(exercise.name)
    assert reference is not None and reference.status == "passed", reference and reference.message
    end_to_end = [t for t in reference.tests if t.nodeid.endswith("test_end_to_end_with_real_processes")]
    assert len(end_to_end) == 1 and end_to_end[0].outcome == "passed", end_to_end
    stub = _learner(result, "stub").exercise(exercise.name)
    assert stub is not None and stub.status in ("failed", "error") and stub.points < stub.max_points
