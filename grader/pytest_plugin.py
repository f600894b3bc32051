"""The pytest side of the grader, loaded for every run in this course (see ``addopts``).

It decides *which copy* of an exercise a graded suite exercises (the learner's, the
reference solution, or a folder the grader points at), gives tests a ``load`` fixture
that imports that copy fresh, tags tests with the task they grade, points failures at the
lesson section that explains them, and can write a machine-readable report.

Keep imports light: this module loads in every learner's ``pytest`` run.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from grader.catalog import CatalogError, Exercise, load_exercise
from grader.loader import load_module
from grader.scoring import DEFAULT_WEIGHT, weight_of
from grader.text import bounded

MESSAGE_LIMIT = 4000  # characters of a failure kept in a report


def defer_httpx_cli() -> None:
    """Keep ``import httpx`` from importing httpx's command-line client until it is called.

    httpx's ``__init__`` imports ``httpx._main``, its CLI, whenever click, rich and pygments are
    installed, and this course installs them for the ``grader`` command. That costs 50-90 ms in
    every run whose tests or code import httpx (01, 09, 10, 13, 14, 15), for a command no test
    runs. A stand-in takes the CLI module's place; its ``main`` imports the real one when called,
    so ``httpx.main()`` still works. Nothing changes once httpx is imported already.
    """
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    stand_in = types.ModuleType("httpx._main", "httpx's command-line client, imported on first call")

    def main(*args: object, **kwargs: object) -> object:
        if sys.modules.get("httpx._main") is stand_in:
            del sys.modules["httpx._main"]
        return importlib.import_module("httpx._main").main(*args, **kwargs)

    stand_in.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stand_in


defer_httpx_cli()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("grader", "course grader")
    group.addoption("--solution", action="store_true", help="grade the reference solution instead of your copy")
    group.addoption("--grader-target", metavar="DIR", help="grade the editable files found in DIR")
    group.addoption("--grader-mutant", metavar="NAME", help="grade the reference solution with mutant NAME applied")
    group.addoption("--grader-exercise", metavar="NAME", help="exercise these tests grade (default: their folder)")
    group.addoption("--grader-report", metavar="PATH", help="write a JSON report of every test to PATH")
    group.addoption("--grader-reference", metavar="DIR",
                    help="the reference solution that differential tests compare with (default: solutions/NN_topic)")
    group.addoption("--grader-time-limit", metavar="SECONDS", type=float,
                    help="seconds for the whole graded suite (default: the exercise's timeout)")
    group.addoption("--grader-test-limit", metavar="SECONDS", type=float,
                    help="seconds for one graded test (default: exercise.toml's test_timeout, else a third of "
                         "the suite's, at least 10)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "task(id, weight=1): the exercise task (from exercise.toml) that this test grades; "
                            "the task's points are shared by its tests in proportion to their weights")
    config.addinivalue_line("markers", "promise(*ids): the promises of the exercise README (P1, P2, …) this test checks")
    config.addinivalue_line("markers", "slow: starts real servers or processes; still part of the graded suite")
    config.addinivalue_line("markers", "servers: starts the graded code as real server processes "
                                       "(grader.live.serve_in_process, forked from a warm launcher)")
    config._grader_outcomes = {}  # type: ignore[attr-defined]
    config._grader_started = time.monotonic()  # type: ignore[attr-defined]
    register_feedback(config)


def register_feedback(config: pytest.Config) -> None:
    """Failures that speak about the learner's code, and the per-test time limit (grader.feedback)."""
    from grader.feedback import FeedbackPlugin

    config._grader_feedback = FeedbackPlugin(config, write_report, _exercise_for)  # type: ignore[attr-defined]
    config.pluginmanager.register(config._grader_feedback, "grader-feedback")  # type: ignore[attr-defined]


def _exercise_for(config: pytest.Config, path: Path) -> Exercise | None:
    cache: dict[Path, Exercise | None] = config.__dict__.setdefault("_grader_exercises", {})
    folder = path.parent
    if folder not in cache:
        name = config.getoption("--grader-exercise")
        candidate = folder if name is None else Path(config.rootpath) / "exercises" / name
        try:
            cache[folder] = load_exercise(candidate, Path(config.rootpath))
        except CatalogError as exc:
            config.__dict__.setdefault("_grader_catalog_errors", {})[folder] = str(exc)
            cache[folder] = None
    return cache[folder]


def target_folder(config: pytest.Config, exercise: Exercise) -> Path:
    explicit = config.getoption("--grader-target")
    if explicit:
        return Path(explicit).resolve()
    mutant = config.getoption("--grader-mutant")
    if mutant:
        built: dict[str, Path] = config.__dict__.setdefault("_grader_mutants", {})
        if exercise.name not in built:
            from grader.targets import mutant_target

            built[exercise.name] = mutant_target(exercise, mutant)
        return built[exercise.name]
    if config.getoption("--solution"):
        return exercise.solution_folder
    return exercise.folder


@pytest.fixture(scope="module")
def exercise(request: pytest.FixtureRequest) -> Exercise:
    """The exercise that the requesting test file grades."""
    found = _exercise_for(request.config, Path(request.node.path))
    if found is None:
        folder = request.node.path.parent
        why = request.config.__dict__.get("_grader_catalog_errors", {}).get(folder, "")
        pytest.fail(why or f"{folder} is not an exercise folder with an exercise.toml.", pytrace=False)
    return found


@pytest.fixture(scope="module")
def target_dir(request: pytest.FixtureRequest, exercise: Exercise) -> Path:
    """The folder holding the copy of the editable files being graded."""
    folder = target_folder(request.config, exercise)
    learners_files(request.config, folder, exercise)
    return folder


def learners_files(config: pytest.Config, folder: Path, exercise: Exercise) -> None:
    """Tell grader.feedback whose code is in ``folder``: everything but the graded tests."""
    feedback = config._grader_feedback.feedback  # type: ignore[attr-defined]
    feedback.add_folder(folder, {path.name for path in exercise.test_files})


@pytest.fixture(scope="module")
def load(request: pytest.FixtureRequest, target_dir: Path, exercise: Exercise) -> Callable[..., types.ModuleType]:
    """``load("app")`` imports the graded copy of ``app.py``, fresh on every call.

    ``load("app", fresh=False)`` imports it once per test file and hands back that module on
    later calls: for exercises whose task promises a factory (``create_app()``) that builds
    all state, so every test can still start from a new app while the module's own cost
    (its models, its imports) is paid once.

    In a class grading run of a bridged exercise (``bridge = true`` in exercise.toml), the
    learner's files run in a process of their own: ``load`` returns a stand-in for the module
    there (``grader.bridge``), and this process never imports them.
    """
    bridge = getattr(request.config, "_grader_bridge", None)
    if bridge is not None:
        from grader.bridge import remote_loader

        return remote_loader(request.config, target_dir, exercise, bridge)
    cached: dict[str, types.ModuleType] = {}

    def _load(module: str | None = None, *, fresh: bool = True) -> types.ModuleType:
        name = (module or exercise.editable[0]).removesuffix(".py")
        if not fresh and name in cached:
            return cached[name]
        shown = target_dir / f"{name.replace('.', '/')}.py"
        from grader.hangs import Hung

        problem = import_problem(request.config, shown)
        if problem is None:
            try:
                loaded = load_module(target_dir, name)
            except (Exception, Hung) as exc:  # noqa: BLE001 - the learner's module failed while importing
                problem = import_problem(request.config, shown, exc)
        if problem is not None:  # raised outside the except block: no "During handling of…" chain
            pytest.fail(problem, pytrace=False)
        if not fresh:
            cached[name] = loaded
        return loaded

    return _load


def import_problem(config: pytest.Config, shown: Path, exc: BaseException | None = None) -> str | None:
    """Why the learner's module does not import: in full the first time, in one line after (grader.feedback).

    Without ``exc``: what an earlier load of the same file found, if anything, so that a file
    that does not import (or hangs at import) is not run again for every test.
    """
    from grader.hangs import Hung, HungThread

    feedback = config._grader_feedback.feedback  # type: ignore[attr-defined]
    if exc is None:
        return feedback.known_import_problem(shown) if shown.is_file() else (
            f"{feedback.shown(shown)} is missing. This exercise expects you to edit it.")
    if isinstance(exc, FileNotFoundError) and not shown.is_file():
        return f"{feedback.shown(shown)} is missing. This exercise expects you to edit it."
    if isinstance(exc, (Hung, HungThread)):
        return feedback.import_hung(shown)
    return feedback.import_failed(shown, exc)


# grader watch's helper imports the reference once, before it forks the runs (grader.warm):
# (folder, module) -> that module. In a run (a fork) the first reference() takes it; later ones import anew.
_primed: dict[tuple[str, str], types.ModuleType] = {}


def prime_reference(folder: Path, module: str) -> types.ModuleType:
    """Import the reference's ``module`` now, for the first ``reference(module)`` of each forked run.

    The process that primes it must never use it: each run gets its own copy with the fork,
    untouched, so the first ``reference()`` of a run is as fresh as an import made there.
    """
    name = module.removesuffix(".py")
    loaded = load_module(folder, name)
    _primed[(str(Path(folder).resolve()), name)] = loaded
    return loaded


def reference_module(folder: Path, module: str) -> types.ModuleType:
    """The reference's ``module``: the primed copy the first time (if there is one), else a fresh import."""
    name = module.removesuffix(".py")
    primed = _primed.pop((str(Path(folder).resolve()), name), None)
    if primed is not None:  # imported before this run was forked, and used by no one: as fresh as a new import
        return primed
    return load_module(folder, name)


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, exercise: Exercise) -> Callable[..., types.ModuleType]:
    """``reference("app")`` imports the reference solution's ``app.py``, fresh on every call.

    The other side of a differential test (``grader.differential``): the same loader as ``load``,
    a new package each time, so the learner's copy and the reference never share module state.
    Self-grading reads ``solutions/NN_topic``; a class grading run reads the instructor's copy
    (``--grader-reference``, set by the grader). In ``grader watch`` the first call of a run takes
    the copy imported before the run was forked (:func:`prime_reference`): used by no one, as fresh.
    """
    folder = Path(request.config.getoption("--grader-reference") or exercise.solution_folder)

    def _reference(module: str | None = None) -> types.ModuleType:
        name = (module or exercise.editable[0]).removesuffix(".py")
        try:
            return reference_module(folder, name)
        except FileNotFoundError:
            pytest.fail(f"The reference solution ({folder / name}.py) is not here, and the differential tests "
                        "compare your app with it: restore the course's solutions/ folder.", pytrace=False)

    return _reference


@pytest.fixture
def nats_server() -> Iterator[Any]:
    """A real NATS server with JetStream for one test (``grader.broker.NatsServer``), on a free port
    of 127.0.0.1 with its own storage; stopped, and its files removed, after the test."""
    from grader.broker import NatsServer  # only the tests that ask for a broker pay for it

    with NatsServer() as server:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        exercise = _exercise_for(config, Path(item.path))
        marker = item.get_closest_marker("task")
        if exercise is None or marker is None:
            continue
        task = exercise.task(str(marker.args[0]))
        item.user_properties.append(("task", str(marker.args[0])))
        item.user_properties.append(("weight", weight_of(marker)))
        if task is not None and task.section:
            item.user_properties.append(("lesson", exercise.lesson_link(task.section)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and not getattr(report, "grader_no_lesson", False):  # set by grader.feedback
        lesson = dict(item.user_properties).get("lesson")
        if lesson:
            report.sections.append(("Where to read", f"This is explained in {lesson}"))
    _record(item.config, report)
    return report


def _record(config: pytest.Config, report: pytest.TestReport) -> None:
    outcomes: dict[str, dict] = config._grader_outcomes  # type: ignore[attr-defined]
    entry = outcomes.setdefault(
        report.nodeid,
        {"nodeid": report.nodeid, "task": dict(report.user_properties).get("task"),
         "weight": dict(report.user_properties).get("weight", DEFAULT_WEIGHT), "outcome": "passed",
         "duration": 0.0, "message": "", "phases": []},
    )
    entry["phases"].append(report.when)
    entry["duration"] += report.duration
    if report.failed or report.skipped:
        # a failure in setup or teardown counts as much as one in the test itself
        if entry["outcome"] == "passed" or report.failed:
            entry["outcome"] = "skipped" if report.skipped else ("error" if report.when != "call" else "failed")
            text = report.longreprtext or ""
            entry["message"] = bounded(text, MESSAGE_LIMIT)
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xfailed" if report.skipped else "xpassed"


_collection_errors: list[dict] = []  # one pytest session per process


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _collection_errors.append({"nodeid": report.nodeid, "message": bounded(report.longreprtext or "", MESSAGE_LIMIT)})


def pytest_unconfigure(config: pytest.Config) -> None:
    launcher = sys.modules.get("grader.launcher")
    if launcher is not None:
        launcher.shutdown()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    write_report(session.config, exitstatus, timed_out=getattr(session.config, "_grader_timed_out", False))


def write_report(config: pytest.Config, exitstatus: int, *, timed_out: bool = False) -> None:
    """The JSON report for ``--grader-report``; also written by a run that must end early (grader.feedback)."""
    path = config.getoption("--grader-report")
    if not path:
        return
    payload = {
        "exitstatus": int(exitstatus),
        "finished": True,
        "timed_out": timed_out,
        "duration": time.monotonic() - config._grader_started,  # type: ignore[attr-defined]
        "tests": list(config._grader_outcomes.values()),  # type: ignore[attr-defined]
        "collection_errors": _collection_errors,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Everything imported so far (pytest, FastAPI, pydantic, the test modules) lives until the
    # process ends. Freezing it takes those objects out of the garbage collector's view, so the
    # collections that building apps triggers scan only new objects: 5-20 % less CPU per suite.
    gc.freeze()
    start_launcher(session)


def start_launcher(session: pytest.Session) -> None:
    """If a selected test starts real servers, fork the launcher that starts them warm.

    Now, because this process still runs a single thread (see ``grader.launcher``).
    """
    item = next((item for item in session.items if item.get_closest_marker("servers")), None)
    if item is None:
        return
    from grader import launcher

    exercise = _exercise_for(session.config, Path(str(item.path)))
    folder = None
    if exercise is not None:
        try:
            folder = target_folder(session.config, exercise)
        except Exception:  # noqa: BLE001 - without a folder the launcher only imports uvicorn
            folder = None
    launcher.start(folder)
