"""A mutant's run stops at its first test that does not pass (issue 19); nothing else's does.

A mutant only has to be caught, so its run ends there (pytest's ``--maxfail=1`` in the grader's
engine, ``grader.batch.FileSet.stop_at_first_failure``). It counts as caught only when that test
*failed*: an error means the suite could not run the test, and the tests after it never ran.
The reference, the stub (its points are summed over every test) and every learner's run in
class grading always run the whole suite.
"""

from __future__ import annotations

import pytest

from grader.batch import FileSet, grade_file_sets
from grader.catalog import find_exercise
from grader.grading import GradingOptions, grade
from grader.integrity import Check, Outcome, files_of
from grader import results

from .conftest import ROOT
from .grading_support import EXERCISE, STUB, course_copy

EXERCISE_01 = find_exercise("01", ROOT)


def result_of(*outcomes: str, status: str = "failed") -> results.ExerciseResult:
    tests = [results.TestResult(nodeid=f"test_x.py::test_{index}", task="health", outcome=outcome,  # type: ignore[arg-type]
                        points=1.0 if outcome == "passed" else 0.0, max_points=1.0)
             for index, outcome in enumerate(outcomes)]
    return results.ExerciseResult(exercise=EXERCISE_01.name, status=status, tests=tests,  # type: ignore[arg-type]
                          points=sum(t.points for t in tests), max_points=len(tests))


def mutant_check() -> Check:
    return Check(EXERCISE_01, "mutant", EXERCISE_01.mutants()[0])


def test_only_a_mutant_stops_at_its_first_failure():
    assert mutant_check().stops_at_first_failure
    assert not Check(EXERCISE_01, "solution").stops_at_first_failure
    assert not Check(EXERCISE_01, "stub").stops_at_first_failure  # its points need every test


@pytest.mark.parametrize(("outcomes", "caught"), [
    (("passed", "failed", "missing", "missing"), True),
    (("skipped", "passed", "xfailed", "failed", "missing"), True),
    (("passed", "error", "missing", "missing"), False),  # the suite broke: the rest never ran
    (("error", "failed", "missing"), False),
])
def test_a_stopped_mutant_is_caught_only_by_a_failed_test(outcomes, caught):
    outcome = Outcome(mutant_check(), result_of(*outcomes))
    assert outcome.ok is caught
    assert outcome.summary.startswith("caught by" if caught else "first non-pass is an error")


@pytest.mark.parametrize("status", ["error", "timeout", "tampering", "passed"])
def test_a_stopped_mutant_whose_run_went_wrong_is_not_caught(status):
    assert not Outcome(mutant_check(), result_of("passed", "failed", "missing", status=status)).ok


@pytest.fixture(scope="module")
def graded_01() -> dict[str, results.ExerciseResult]:
    """A mutant of 01 with and without the stop, and a copy whose first non-pass is a fixture's error."""
    mutant = files_of(mutant_check())
    no_app = "# app.py without the `app` the tests' fixture takes: their setup fails\nvalue = 1\n"
    sets = [FileSet("mutant stopped", EXERCISE_01, mutant, stop_at_first_failure=True),
            FileSet("mutant whole", EXERCISE_01, mutant),
            FileSet("no app stopped", EXERCISE_01, {"app.py": no_app}, stop_at_first_failure=True)]
    return grade_file_sets(ROOT, sets, slots=2)


def test_a_run_told_to_stop_ends_at_its_first_failure(graded_01):
    stopped, whole = graded_01["mutant stopped"], graded_01["mutant whole"]
    assert whole.status == "failed", whole.message
    assert not [t.nodeid for t in whole.tests if t.outcome == "missing"], "without the stop every test runs"
    outcomes = [(t.nodeid, t.outcome) for t in stopped.tests]
    first = next(i for i, (_, o) in enumerate(outcomes) if o not in ("passed", "skipped", "xfailed"))
    assert outcomes[first][1] == "failed", outcomes
    assert first + 1 < len(outcomes) and {o for _, o in outcomes[first + 1:]} == {"missing"}, (
        f"no test runs after the first failure: {outcomes}")
    assert stopped.status == "failed", stopped.message
    assert Outcome(mutant_check(), stopped).ok


def test_a_run_whose_first_non_pass_is_an_error_is_not_caught(graded_01):
    result = graded_01["no app stopped"]
    first = next(t for t in result.tests if t.outcome not in ("passed", "skipped", "xfailed"))
    assert first.outcome == "error", [(t.nodeid, t.outcome) for t in result.tests]
    assert not Outcome(mutant_check(), result).ok


def test_class_grading_never_stops_early(tmp_path):
    submissions = tmp_path / "subs"
    course_copy(submissions / "ann", STUB)
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["01"], jobs=1))
    graded = result.learners[0].exercise(EXERCISE)
    assert graded is not None
    assert graded.status == "failed" and graded.tests
    assert not [t.nodeid for t in graded.tests if t.outcome == "missing"], "every test of a learner's run runs"


def test_a_costly_exercise_s_checks_are_dealt_into_balanced_parts():
    from grader.integrity import plan_checks

    from .conftest import INTEGRITY, INTEGRITY_PARTS, integrity_id, work_unit

    for key, parts in INTEGRITY_PARTS.items():
        ids = [integrity_id(check) for check in plan_checks(find_exercise(key, ROOT))]
        units = [work_unit(f"{INTEGRITY}[{check_id}]", set()) for check_id in ids]
        sizes = sorted(units.count(unit) for unit in set(units))
        assert len(sizes) == parts and sizes[-1] - sizes[0] <= 1, sizes
