"""Points follow the weights of the tests: the main mistake of a task costs most of that task."""

from __future__ import annotations

import shutil

import pytest

from grader.catalog import Task, all_exercises
from grader.hidden import HiddenSuite
from grader.runner import run_suite, score
from grader.scoring import weight_of, worths
from grader.targets import mutant_target

from .conftest import ROOT

EXERCISE = next(e for e in all_exercises(ROOT) if e.name == "01_async_routes")


def _tests(*rows: tuple[str, str, float | None], hidden: bool = False) -> list[dict]:
    return [{"nodeid": nodeid, "task": task, "hidden": hidden, **({} if weight is None else {"weight": weight})}
            for nodeid, task, weight in rows]


def test_a_task_is_shared_equally_when_no_test_has_a_weight():
    worth = worths(EXERCISE, None, _tests(("a", "parameters", None), ("b", "parameters", None), ("c", "parameters", None)), set())
    assert worth == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})  # 3 points, 3 tests


def test_points_follow_the_weights_within_a_task():
    tests = _tests(("main", "concurrency", 4.0), ("x", "concurrency", None), ("y", "concurrency", 1), ("h", "health", None))
    worth = worths(EXERCISE, None, tests, set())
    assert worth["main"] == pytest.approx(3 * 4 / 6) and worth["x"] == worth["y"] == pytest.approx(3 / 6)
    assert worth["h"] == pytest.approx(1.0)  # a weight moves points inside its own task only
    assert sum(worth.values()) == pytest.approx(3 + 1)


def test_a_test_that_cannot_be_graded_gives_its_share_to_the_others():
    tests = _tests(("main", "concurrency", 4.0), ("x", "concurrency", None), ("y", "concurrency", None))
    assert worths(EXERCISE, None, tests, {"main"}) == pytest.approx({"main": 0.0, "x": 1.5, "y": 1.5})


def test_hidden_tests_follow_their_own_weights():
    hidden = HiddenSuite(folder=ROOT, files=(), tasks=(Task(id="edge", title="Edges", points=2.0),), default_points=0.5)
    tests = [*_tests(("v", "health", None)),
             *_tests(("h1", "edge", 3.0), ("h2", "edge", None), ("h3", None, 5.0), hidden=True)]
    worth = worths(EXERCISE, hidden, tests, set())
    assert worth == pytest.approx({"v": 1.0, "h1": 1.5, "h2": 0.5, "h3": 0.5})


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), True, "3", None])
def test_a_report_with_a_weight_that_is_no_positive_number_counts_it_as_one(weight):
    tests = [{"nodeid": "a", "task": "parameters", "hidden": False, "weight": weight},
             {"nodeid": "b", "task": "parameters", "hidden": False, "weight": 2}]
    assert worths(EXERCISE, None, tests, set()) == pytest.approx({"a": 1.0, "b": 2.0})


def test_the_marker_gives_the_weight_and_refuses_nonsense():
    assert weight_of(None) == 1.0
    assert weight_of(pytest.mark.task("x").mark) == 1.0
    assert weight_of(pytest.mark.task("x", weight=3).mark) == 3.0
    for bad in (0, -2, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="positive number"):
            weight_of(pytest.mark.task("x", weight=bad).mark)
    with pytest.raises(ValueError, match="only weight="):
        weight_of(pytest.mark.task("x", wieght=3).mark)


def test_a_local_run_scores_with_the_weights_it_reported():
    raw = [{"nodeid": "main", "task": "concurrency", "weight": 4.0, "outcome": "failed"},
           {"nodeid": "x", "task": "concurrency", "weight": 1.0, "outcome": "passed"},
           {"nodeid": "y", "task": "concurrency", "weight": 1.0, "outcome": "passed"}]
    results = {t.nodeid: t for t in score(EXERCISE, raw)}
    assert results["main"].max_points == pytest.approx(2.0) and results["main"].points == 0
    assert results["x"].points == pytest.approx(0.5)


@pytest.mark.slow
def test_a_blocking_wait_loses_most_of_the_concurrency_task():
    # 01's main mistake: time.sleep inside `async def` (solutions/01_async_routes/mutants/blocking_sleep.diff)
    folder = mutant_target(EXERCISE, "blocking_sleep")
    try:
        result, output = run_suite(EXERCISE, folder)
    finally:
        shutil.rmtree(folder)
    task = EXERCISE.task("concurrency")
    tests = [t for t in result.tests if t.task == "concurrency"]
    assert tests and sum(t.max_points for t in tests) == pytest.approx(task.points), output
    earned = sum(t.points for t in tests)
    assert earned < task.points / 2, f"the blocking wait keeps {earned:g} of {task.points:g} points\n{output}"
    assert any(t.passed for t in tests), "the tests of the rest of the task still pass: it is a partial credit"
    assert sum(t.points for t in result.tests if t.task == "health") == pytest.approx(1.0)


@pytest.mark.slow
def test_class_grading_collects_the_weights():
    from grader.engine import Engine

    with Engine(ROOT, 1, [ROOT / "solutions"]) as engine:
        prepared = engine.prepare([(EXERCISE, None)])[EXERCISE.name]
    assert not prepared.error, prepared.error
    weights = {t["nodeid"].rsplit("::", 1)[-1]: t["weight"] for t in prepared.tests}
    assert weights["test_waiting_requests_do_not_block_each_other"] == 12.0
    assert weights["test_health_says_ok"] == 1.0
    worth = worths(EXERCISE, None, prepared.tests, set())
    blocking = next(t["nodeid"] for t in prepared.tests if t["nodeid"].endswith("test_waiting_requests_do_not_block_each_other"))
    assert worth[blocking] > EXERCISE.task("concurrency").points / 2
    assert sum(worth.values()) == pytest.approx(EXERCISE.total_points)
