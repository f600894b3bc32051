"""Shared pieces of the course's own suite."""

from __future__ import annotations

import functools
import os
import re
import unicodedata
import zlib
from pathlib import Path

import pytest

from grader.catalog import all_exercises

ROOT = Path(__file__).resolve().parent.parent
CURRICULUM = [
    "01_async_routes", "02_validation", "03_rest_resources", "04_dependencies", "05_auth",
    "06_background_tasks", "07_websockets", "08_database", "09_testing", "10_service_communication",
    "11_messaging", "12_observability", "13_hardening", "14_deployment", "15_capstone",
]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    anchors, in_fence = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def present(names: list[str]) -> list[str]:
    """The curriculum entries that have been written so far (a lesson in progress has no exercise.toml)."""
    return [name for name in names if (ROOT / "exercises" / name / "exercise.toml").is_file()]


@pytest.fixture(scope="session")
def exercises():
    return {exercise.name: exercise for exercise in all_exercises(ROOT)}


def pytest_configure(config: pytest.Config) -> None:
    """The course suite names its ten slowest tests at the end (issue: keep the slow ones honest);
    ``--durations`` given on the command line wins."""
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 10
        config.option.durations_min = 1.0


# --------------------------------------------------------------------------- running in parallel
#
# Bare `pytest` (the README's command: the whole course suite) runs on pytest-xdist's workers,
# one per core plus one: most of the suite waits on other processes (kernels, servers, pytest
# runs, the grader's engine), so a spare worker keeps the cores busy. Only the bare command does:
# `pytest tests/test_x.py -k 03` stays in one process (`-n 3` spreads it too), and a learner's
# `pytest exercises/NN` never loads this file. `-n 0` runs the whole suite in one process.
#
# Which tests share a worker is decided here, from test ids alone (the controller that hands out
# the work never collects), so a test never has to know:
# - the tests of a module that defines a module- or class-scoped fixture run on one worker, one
#   after another, so the fixture is built once (an attack module starts its servers once);
# - the integrity checks of one exercise run on one worker (INTEGRITY below);
# - the tests in SERIAL run on one worker, one after another: never two of them at once;
# - every other test goes to whichever worker is free.
# (xdist's own `xdist_group` marks do nothing with pytest 9.2: xdist renames a marked test through
# an attribute that pytest no longer reads, so the grouping is done by the scheduler instead.)

SERIAL: dict[str, str] = {
    # "tests/test_x.py" or "tests/test_x.py::test_name": why it must not overlap the others here
    "tests/test_feedback.py": "stops looping routes after 2 s and bounds how long that takes",
    "tests/test_watch.py": "a learner's terminal: saves, cancels and keys, each waited for with a time limit",
    "tests/test_portable.py": "kills and cancels runs, and waits for them, without the POSIX mechanisms",
    "tests/test_live.py": "a readiness wait that must give up within its time limit",
    "tests/test_hostile_submissions.py": "runs that fill memory and memfds up to their cgroup's cap",
}
# The integrity batch is the suite's largest part: its checks are handed out an exercise at a time
# (tests/test_integrity.py grades each exercise's copies at once, on the worker that has them).
INTEGRITY = "tests/test_integrity.py::test_graded_suite_judges_each_copy_correctly"
# An exercise whose checks cost far more than the others' is handed out in parts, so that several
# workers share it: each run of the capstone starts four services, a broker and real processes
# (its 65 checks took 226 s of CPU with each mutant stopping at its first failure, 11's 16 took 20 s).
INTEGRITY_PARTS = {"15": 3}
_COURSE_SCHEDULING = pytest.StashKey[bool]()
_OWN_FIXTURE = re.compile(r"""@pytest\.fixture\([^)]*scope\s*=\s*["'](?:module|class|package)["']""")


def course_workers() -> int:
    return (os.cpu_count() or 1) + 1


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    option = config.option
    if not hasattr(config, "workerinput") and config.pluginmanager.has_plugin("xdist"):
        if (config.args_source == pytest.Config.ArgsSource.TESTPATHS and option.numprocesses is None
                and not option.collectonly and not option.usepdb):
            option.numprocesses = course_workers()
        if option.numprocesses and option.dist == "no":
            option.dist = "loadscope"  # scheduled by CourseScheduling below
            config.stash[_COURSE_SCHEDULING] = True
    return (yield)


def _modules_with_own_fixtures(root: Path) -> set[str]:
    found = set()
    for path in root.glob("test_*.py"):
        if _OWN_FIXTURE.search(path.read_text(encoding="utf-8")):
            found.add(path.relative_to(ROOT).as_posix())
    return found


def integrity_id(check) -> str:
    """A check's test id in tests/test_integrity.py: ``15_capstone-mutant-no_msg_id``."""
    return f"{check.exercise.name}-{check.label.replace(' ', '-')}"


@functools.cache
def _integrity_ids(key: str) -> list[str]:
    from grader.catalog import find_exercise
    from grader.integrity import plan_checks

    return [integrity_id(check) for check in plan_checks(find_exercise(key, ROOT))]


def integrity_unit(check_id: str) -> str:
    """The unit of an integrity check, by its id: its exercise, or for an exercise in
    INTEGRITY_PARTS one of its parts (its checks dealt out in turn)."""
    key = check_id[:2]
    parts = INTEGRITY_PARTS.get(key, 1)
    if parts == 1:
        return f"integrity of {key}"
    ids = _integrity_ids(key)
    index = ids.index(check_id) if check_id in ids else zlib.crc32(check_id.encode())
    return f"integrity of {key}, part {index % parts + 1}"


def work_unit(nodeid: str, shared: set[str]) -> str:
    """The unit of work ``nodeid`` belongs to: tests of one unit run on one worker, in order."""
    module = nodeid.split("::", 1)[0]
    if nodeid.startswith(INTEGRITY + "["):
        return integrity_unit(nodeid[len(INTEGRITY) + 1:].removesuffix("]"))
    if any(nodeid == prefix or nodeid.startswith(prefix + "::") or module == prefix for prefix in SERIAL):
        return "serial"
    return module if module in shared else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if not config.stash.get(_COURSE_SCHEDULING, False):
        return None
    from xdist.scheduler import LoadScopeScheduling

    shared = _modules_with_own_fixtures(Path(__file__).resolve().parent)

    class CourseScheduling(LoadScopeScheduling):
        """xdist's loadscope, with the units above; the biggest units are handed out first."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid, shared)

    return CourseScheduling(config, log)
