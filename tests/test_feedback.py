"""What a learner reads when their code breaks: named exceptions, no hangs, one message per cause.

Each test runs exercise 01's graded suite (plain ``pytest``, as a learner does, or
``grader check``) against a copy of the reference solution with one realistic breakage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_cli import EXERCISE, course, grader, stub  # noqa: F401 - `course` is a fixture

SOLUTION = ROOT / "solutions" / EXERCISE / "app.py"
SUITE = ROOT / "exercises" / EXERCISE / "test_async_routes.py"


def broken(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the reference app.py with ``old`` replaced by ``new``."""
    source = SOLUTION.read_text(encoding="utf-8")
    assert old in source, old
    folder = tmp_path / "graded"
    folder.mkdir()
    (folder / "app.py").write_text(source.replace(old, new, 1), encoding="utf-8")
    return folder


def pytest_run(target: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["COLUMNS"] = "120"
    # As on CI, where pytest would print every failure's whole message again in its short summary.
    env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITE), "--grader-target", str(target), "-p", "no:cacheprovider",
         "--color=no", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


HEALTH_LINE = "    return {\"status\": \"ok\"}"


def test_the_learners_exception_is_named_with_their_line(tmp_path):
    target = broken(tmp_path, "    item = ITEMS.get(item_id)\n", "    return ITEMS[item_id]\n    item = ITEMS.get(item_id)\n")
    done = pytest_run(target, "-k", "missing_item")
    out = done.stdout
    assert done.returncode == 1, out
    assert re.search(r"your app raised KeyError: 7 at \S*app\.py:\d+ in read_item", out), out
    assert "return ITEMS[item_id]" in out
    failure = out[out.index("= FAILURES ="):out.index("short test summary")]
    for framework in ("starlette", "fastapi/routing", "anyio", "httpx"):
        assert framework not in failure, f"{framework} frames are shown:\n{failure}"
    assert len(failure.splitlines()) < 25, failure


def test_a_route_that_loops_forever_is_stopped_and_named(tmp_path):
    target = broken(tmp_path, HEALTH_LINE, "    while True:\n        pass\n" + HEALTH_LINE)
    started = time.monotonic()
    done = pytest_run(target, "--grader-test-limit", "2", "-k", "health or read_item", timeout=90)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout
    assert "did not finish within 2 s" in done.stdout
    assert re.search(r"still running \S*app\.py:\d+ in health", done.stdout), done.stdout
    assert "while True:" in done.stdout
    assert "1 failed, 1 passed" in done.stdout, "the test after the hung one still runs"
    assert elapsed < 60, elapsed


def test_a_sync_route_that_loops_forever_is_stopped_too(tmp_path):
    target = broken(tmp_path, "async def health()", "def health()")
    source = (target / "app.py").read_text()
    (target / "app.py").write_text(source.replace(HEALTH_LINE, "    while True:\n        pass\n" + HEALTH_LINE, 1))
    done = pytest_run(target, "--grader-test-limit", "2", "-k", "health", timeout=90)
    assert re.search(r"still running \S*app\.py:\d+ in health", done.stdout), done.stdout


def test_a_call_that_cannot_be_interrupted_ends_the_run_with_a_report(tmp_path):
    target = broken(tmp_path, HEALTH_LINE, "    import time\n    time.sleep(3600)\n" + HEALTH_LINE)
    report = tmp_path / "report.json"
    done = pytest_run(target, "--grader-test-limit", "2", "--grader-report", str(report), timeout=90)
    assert done.returncode == 1
    assert "time.sleep(3600)" in done.stdout + done.stderr
    payload = json.loads(report.read_text())
    assert payload["timed_out"] is True
    outcomes = {test["nodeid"].rsplit("::", 1)[1]: test for test in payload["tests"]}
    assert "did not finish within 2 s" in outcomes["test_health_says_ok"]["message"]
    assert any(test["message"].startswith("not run:") for test in payload["tests"]), "the rest is listed as not run"


def test_a_loop_at_import_is_stopped_once_and_named(tmp_path):
    target = tmp_path / "graded"
    target.mkdir()
    (target / "app.py").write_text("from fastapi import FastAPI\n\napp = FastAPI()\nwhile True:\n    pass\n")
    started = time.monotonic()
    done = pytest_run(target, "--grader-test-limit", "2", timeout=90)
    elapsed = time.monotonic() - started
    out = done.stdout
    assert "app.py does not import: it was still running line 4 after 2 s" in out, out
    assert out.count("Everything at the top level of a module runs") == 1, "the explanation comes once"
    assert elapsed < 45, f"one stop, not one per test: {elapsed:.0f} s"
    assert len(out.splitlines()) < 120


def test_a_syntax_error_is_reported_once_with_its_line(tmp_path):
    target = broken(tmp_path, "async def health() -> dict[str, str]:", "async def health() -> dict[str, str]")
    done = pytest_run(target)
    out = done.stdout
    assert re.search(r"app\.py does not import: line \d+: expected ':'", out), out
    assert out.count("Python stops at a syntax error") == 1
    assert "During handling of the above exception" not in out
    assert len(out.splitlines()) < 90, len(out.splitlines())


def test_a_missing_module_names_its_line_and_nothing_else(tmp_path):
    target = broken(tmp_path, "import asyncio\n", "import asyncio\nimport fastapi_extras\n")
    done = pytest_run(target)
    out = done.stdout
    assert re.search(r"app\.py does not import: line \d+: ModuleNotFoundError: No module named 'fastapi_extras'", out), out
    assert "DeprecationWarning" not in out
    assert "During handling of the above exception" not in out


def test_grader_check_keeps_the_table_and_the_points_when_a_route_hangs(course):  # noqa: F811
    source = (ROOT / "solutions" / EXERCISE / "app.py").read_text()
    stub(course).write_text(source.replace(HEALTH_LINE, "    while True:\n        pass\n" + HEALTH_LINE, 1))
    toml = course / "exercises" / EXERCISE / "exercise.toml"
    toml.write_text(toml.read_text().replace("timeout = 60\n", "timeout = 60\ntest_timeout = 2\n", 1))
    done = grader(course, "check", "01", timeout=120)
    out = done.stdout
    assert done.returncode == 1, out
    assert "A health route" in out and "Typed path and query parameters" in out, "the task table is there"
    assert re.search(r"still running exercises/01_async_routes/app\.py:\d+ in health", out), out
    points = re.search(r"\d+ of \d+ tests pass — ([\d.]+) of 10 points", out)
    assert points and float(points.group(1)) >= 5, out  # everything but the health task still counts


def test_a_message_is_never_cut_in_the_middle_of_a_line():
    from grader.results import bounded

    text = "\n".join(f"/a/very/long/path/number/{n}/app.py:{n}" for n in range(400))
    cut = bounded(text, 500)
    assert len(cut) < 700
    kept = cut.splitlines()
    assert all(line in text.splitlines() for line in kept[:-1])
    assert kept[-1].startswith("… (") and "more lines" in kept[-1]


@pytest.mark.parametrize("name", ["app.py"])
def test_learners_files_exclude_the_graded_tests(tmp_path, name):
    from grader.feedback import Feedback

    feedback = Feedback(config=None)  # type: ignore[arg-type]
    feedback.add_folder(tmp_path, {"test_async_routes.py"})
    assert feedback.is_learners(tmp_path / name)
    assert not feedback.is_learners(tmp_path / "test_async_routes.py")
    assert not feedback.is_learners(tmp_path / "conftest.py")
    assert not feedback.is_learners(Path(shutil.__file__))


# --------------------------------------------------------------------------- edited graded tests


def _gut_the_health_test(course: Path) -> None:
    tests = course / "exercises" / EXERCISE / "test_async_routes.py"
    source = tests.read_text()
    marker = "def test_health_says_ok(client):\n"
    assert marker in source
    tests.write_text(source.replace(marker, marker + "    return\n", 1))


def test_check_says_plainly_when_a_graded_test_was_edited(course):  # noqa: F811
    shutil.copy(course / "solutions" / EXERCISE / "app.py", stub(course))
    (course / "solutions" / EXERCISE / "app.py").read_text()
    _gut_the_health_test(course)
    done = grader(course, "check", "01")
    assert done.returncode == 1, done.stdout
    assert "You edited the graded files exercises/01_async_routes/test_async_routes.py" in done.stdout
    assert "the instructor grades with their own copy" in done.stdout
    assert "passes" not in done.stdout.splitlines()[-1]
    assert "graded tests edited" in grader(course).stdout


def test_a_zip_download_notices_an_edited_test_through_the_manifest(course):  # noqa: F811
    from grader.progress import MANIFEST, write_manifest

    # a zip download holds the grader package too, with its manifest
    shutil.copytree(ROOT / "grader", course / "grader", ignore=shutil.ignore_patterns("__pycache__"))
    write_manifest(course)
    assert (course / MANIFEST).is_file()
    shutil.rmtree(course / ".git")
    _gut_the_health_test(course)
    done = grader(course, "check", "01")
    assert "You edited the graded files exercises/01_async_routes/test_async_routes.py" in done.stdout, done.stdout


def test_the_manifest_matches_the_committed_graded_files():
    """grader/pristine.json is what a zip download compares with: refresh it with
    `python -m grader.progress` whenever a graded test, conftest.py or exercise.toml changes."""
    from grader.progress import MANIFEST, Pristine, graded_files
    from grader.catalog import all_exercises

    committed = Pristine(ROOT, use_manifest=False)
    committed.__dict__["revision"] = "HEAD"
    manifest = json.loads((ROOT / MANIFEST).read_text())
    expected = {path.relative_to(ROOT).as_posix(): committed.blobs[path.relative_to(ROOT).as_posix()]
                for exercise in all_exercises(ROOT) for path in graded_files(exercise)
                if path.relative_to(ROOT).as_posix() in committed.blobs}
    stale = sorted(key for key in expected.keys() | manifest.keys() if expected.get(key) != manifest.get(key))
    assert not stale, f"grader/pristine.json is stale for {stale}: run python -m grader.progress"


def test_a_plain_assert_prints_its_message_once_and_names_the_failing_line(tmp_path):
    target = broken(tmp_path, 'title="Hello Microservices"', 'title="Hello"')
    done = pytest_run(target, "-k", "openapi")
    out = done.stdout
    assert done.returncode == 1, out
    assert out.count("expected: info.title 'Hello Microservices'") == 1, out
    assert "At index 0 diff" not in out and "assert (" not in out.split("failed at")[0], "no value dump"
    assert re.search(r"failed at exercises/01_async_routes/test_async_routes\.py:\d+ in "
                     r"test_openapi_document_describes_the_service", out), out
