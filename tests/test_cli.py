"""The grader CLI as a learner meets it, in a throwaway git clone of a one-exercise course."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

EXERCISE = "01_async_routes"


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A minimal course: pyproject, one exercise, its solution and lesson, committed to git."""
    root = tmp_path / "course"
    for part in (f"exercises/{EXERCISE}", f"solutions/{EXERCISE}"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lessons").mkdir()
    shutil.copy(ROOT / "lessons" / f"{EXERCISE}.md", root / "lessons")
    shutil.copy(ROOT / "pyproject.toml", root)
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "course")
    return root


def grader(course: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "grader", *args], cwd=course, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def stub(course: Path) -> Path:
    return course / "exercises" / EXERCISE / "app.py"


def solve(course: Path) -> None:
    shutil.copy(course / "solutions" / EXERCISE / "app.py", stub(course))


def assert_clean_failure(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_status_on_a_fresh_clone_needs_no_test_run(course):
    done = grader(course)
    assert done.returncode == 0, done.stderr
    assert "not started" in done.stdout
    assert f"Next: {EXERCISE}" in done.stdout
    assert not (course / ".grader" / "state.json").exists(), "a pristine course runs nothing"


def test_check_on_the_stub_fails_and_teaches(course):
    done = grader(course, "check", "01")
    assert done.returncode == 1
    assert re.search(r"\b0 of \d+ tests pass", done.stdout), done.stdout
    assert "sent:" in done.stdout and "expected:" in done.stdout and "got:" in done.stdout
    assert f"read: lessons/{EXERCISE}.md#" in done.stdout


def test_check_passes_once_solved_and_status_reuses_the_result(course):
    solve(course)
    done = grader(course, "check", "1")
    assert done.returncode == 0, done.stdout
    assert re.search(r"(\d+) of \1 tests pass — 10 of 10 points", done.stdout), done.stdout
    state = course / ".grader" / "state.json"
    before = state.stat().st_mtime_ns
    status = grader(course, "status")
    assert "passed" in status.stdout and "Every exercise passes" in status.stdout
    assert state.stat().st_mtime_ns == before, "an unchanged exercise is not run again"


def test_status_checks_an_exercise_changed_since_its_last_check(course):
    solve(course)
    done = grader(course)
    assert "passed" in done.stdout and "10 / 10" in done.stdout


@pytest.mark.parametrize("key", ["99", "nonsense", "00"])
def test_unknown_exercise_is_a_clear_error(course, key):
    for command in (["check", key], ["hint", key], ["reset", key, "--yes"]):
        done = grader(course, *command)
        assert done.returncode == 2
        assert "There is no exercise" in done.stdout
        assert_clean_failure(done)


def test_syntax_error_in_the_learners_file(course):
    stub(course).write_text("from fastapi import FastAPI\napp = FastAPI(\n", encoding="utf-8")
    done = grader(course, "check", "01")
    assert done.returncode == 1
    assert "app.py does not import: line 2:" in done.stdout
    assert "grader/" not in done.stdout, "no traceback into the grader's own code"


def test_exception_at_import_is_explained(course):
    stub(course).write_text("raise RuntimeError('boom at import')\n", encoding="utf-8")
    done = grader(course, "check", "01")
    assert done.returncode == 1
    assert "RuntimeError: boom at import" in done.stdout


def test_a_file_that_hangs_at_import_times_out(course):
    stub(course).write_text("import time\ntime.sleep(600)\n", encoding="utf-8")
    done = grader(course, "check", "01", "--timeout", "4", timeout=60)
    assert done.returncode == 1
    assert "timeout" in done.stdout and "app.py does not import: it was still running line 2" in done.stdout
    assert_clean_failure(done)


def test_a_missing_file_is_reported(course):
    stub(course).unlink()
    done = grader(course, "check", "01")
    assert done.returncode == 1
    assert "app.py is missing" in done.stdout
    assert "file missing" in grader(course).stdout


def test_hints_come_one_level_at_a_time_and_are_remembered(course):
    first = grader(course, "hint", "01")
    second = grader(course, "hint", "01")
    assert "hint 1 of 3" in first.stdout and "hint 2 of 3" not in first.stdout
    assert "hint 2 of 3" in second.stdout and "hint 1 of 3" not in second.stdout
    again = grader(course, "hint", "01", "--again")
    assert "hint 1 of 3" in again.stdout and "hint 2 of 3" in again.stdout and "hint 3 of 3" not in again.stdout
    grader(course, "hint", "01")
    last = grader(course, "hint", "01")
    assert "hint 3 of 3" in last.stdout and "last hint" in last.stdout


def test_reset_restores_the_stub_and_keeps_a_backup(course):
    original = stub(course).read_text(encoding="utf-8")
    solve(course)
    done = grader(course, "reset", "01", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert stub(course).read_text(encoding="utf-8") == original
    backups = list((course / ".grader" / "backups" / EXERCISE).glob("*/app.py"))
    assert len(backups) == 1
    assert backups[0].read_bytes() == (course / "solutions" / EXERCISE / "app.py").read_bytes()


def test_reset_uses_the_upstream_stub_even_after_the_learner_commits(course):
    original = stub(course).read_text(encoding="utf-8")
    clone = course.parent / "clone"
    git(course.parent, "clone", "-q", str(course), str(clone))
    shutil.copy(course / "solutions" / EXERCISE / "app.py", clone / "exercises" / EXERCISE / "app.py")
    git(clone, "-c", "user.name=l", "-c", "user.email=l@example.com", "commit", "-qam", "my work")
    assert grader(clone, "reset", "01", "--yes").returncode == 0
    assert (clone / "exercises" / EXERCISE / "app.py").read_text(encoding="utf-8") == original


def test_verify_passes_on_a_sound_course(course):
    done = grader(course, "verify")
    assert done.returncode == 0, done.stdout
    mutants = len(list((course / "solutions" / EXERCISE / "mutants").glob("*.diff")))
    assert f"All {2 + mutants} checks hold" in done.stdout  # the solution, the stub, each mutant


def test_verify_catches_a_mutant_the_suite_misses(course):
    from grader import patches

    solution = (course / "solutions" / EXERCISE / "app.py").read_text()
    harmless = solution.replace('"""Lesson 01 reference', '"""Lesson 01 reference (with a harmless edit)', 1)
    assert harmless != solution
    mutant = course / "solutions" / EXERCISE / "mutants" / "not_really_a_mutant.diff"
    mutant.write_text(patches.make("Mutant: changes only a docstring.", {"app.py": (solution, harmless)}))
    done = grader(course, "verify", "01")
    assert done.returncode == 1
    assert "WRONG" in done.stdout and "not_really_a_mutant" in done.stdout


def test_watch_runs_the_current_exercise_and_moves_on_when_it_passes(course):
    solve(course)
    done = grader(course, "watch", "--poll", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passes — moving on" in done.stdout and "Every exercise passes" in done.stdout


def test_watch_does_not_move_on_when_the_tests_were_edited(course, tmp_path):
    solve(course)
    tests = course / "exercises" / EXERCISE / "test_async_routes.py"
    tests.write_text(tests.read_text() + "\n# edited\n")
    process = subprocess.Popen([sys.executable, "-m", "grader", "watch", "--poll"], cwd=course,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    try:
        output = ""
        for line in process.stdout:  # type: ignore[union-attr]
            output += line
            if "were changed" in line:
                break
        assert "graded tests of this exercise were changed" in output
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def test_file_event_probe_answers(tmp_path):
    from grader.watching import file_events_arrive

    assert file_events_arrive(tmp_path) in (True, False)


def test_outside_a_course_the_installed_course_is_used(tmp_path):
    # Run from a folder that holds no course: the editable install points back to this one.
    done = subprocess.run([sys.executable, "-c", "from grader.catalog import course_root; print(course_root())"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT)


def test_help_is_grouped_with_examples_and_h_works(course):
    done = grader(course, "-h")
    assert done.returncode == 0
    out = done.stdout
    for group in ("Learner", "Instructor", "Maintainer"):
        assert group in out, out
    assert out.index("Learner") < out.index("Instructor") < out.index("Maintainer")
    assert "Example" in out and "grader watch" in out
    assert grader(course, "check", "-h").returncode == 0


def test_version(course):
    from grader import __version__

    done = grader(course, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"grader {__version__}"


def test_hint_without_an_exercise_is_for_the_current_one(course):
    done = grader(course, "hint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert EXERCISE in done.stdout and "hint 1 of 3" in done.stdout


def test_reset_of_a_deleted_file_names_no_backup_it_did_not_make(course):
    stub(course).unlink()
    done = grader(course, "reset", "01", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backups" not in done.stdout and "nothing of yours to back up" in done.stdout
    assert not (course / ".grader" / "backups").exists()


def test_the_default_report_folder_is_ignored_by_git():
    from grader.cli_grade import grade_command
    import inspect

    default = inspect.signature(grade_command).parameters["out"].default
    done = subprocess.run(["git", "check-ignore", "-q", f"{default}/report.json"], cwd=ROOT)
    assert done.returncode == 0, f"{default}/ is not in .gitignore"
