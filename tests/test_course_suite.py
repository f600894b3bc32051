"""The course suite's own configuration: bare `pytest` spreads over workers, a learner's run never does."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from .conftest import ROOT, SERIAL, _modules_with_own_fixtures, work_unit

SHARED = _modules_with_own_fixtures(ROOT / "tests")


def test_pytest_xdist_is_a_pinned_dependency():
    """The README's one install command installs what bare `pytest` runs on."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert any(re.fullmatch(r"pytest-xdist==[\d.]+", line) for line in dependencies), dependencies


def test_a_module_fixture_is_built_once_because_its_tests_share_a_worker():
    assert "tests/test_launcher.py" in SHARED, "its scenario runs once, in a module fixture"
    assert work_unit("tests/test_launcher.py::test_shutdown_ends_the_launcher", SHARED) == "tests/test_launcher.py"


def test_the_integrity_checks_of_one_exercise_share_a_worker():
    """tests/test_integrity.py grades an exercise's copies at once, on the worker that has them
    (the capstone's, the suite's costliest, in a few parts dealt to different workers)."""
    check = "tests/test_integrity.py::test_graded_suite_judges_each_copy_correctly"
    units = {work_unit(f"{check}[14_deployment-{label}]", SHARED) for label in ("solution", "stub")}
    assert len(units) == 1
    assert work_unit(f"{check}[01_async_routes-solution]", SHARED) not in units
    capstone = {work_unit(f"{check}[15_capstone-{label}]", SHARED) for label in ("solution", "stub", "mutant-no_deadline")}
    assert all(unit.startswith("integrity of 15, part ") for unit in capstone), capstone


def test_other_tests_go_to_any_free_worker():
    nodeid = "tests/test_lessons.py::test_python_blocks_run[03_rest_resources]"
    assert "tests/test_lessons.py" not in SHARED
    assert work_unit(nodeid, SHARED) == nodeid


def test_serial_entries_name_existing_modules():
    for entry in SERIAL:
        assert (ROOT / entry.split("::", 1)[0]).is_file(), entry


def test_a_learners_run_stays_in_one_process():
    """`pytest exercises/NN` is the learner's loop: no workers, no course-suite configuration."""
    done = subprocess.run([sys.executable, "-m", "pytest", "exercises/01_async_routes", "--solution", "-p",
                           "no:cacheprovider", "--co", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "workers" not in done.stdout and "gw0" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "pytest", "exercises/01_async_routes", "--solution", "-p",
                           "no:cacheprovider", "-q", "-k", "no_test_has_this_name"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "workers" not in done.stdout and "slowest" not in done.stdout, done.stdout[-2000:]
