"""Where the machine allows fewer protections, grading still holds: the fallbacks, forced on.

Namespaces and the uid switch are turned off here (the cgroup stays, to bound the processes
of a run that has root's rights); every verdict must stay what it is with full isolation,
except that a run can now reach its supervisor, and killing it is reported as such.
"""

from __future__ import annotations


import pytest

from grader.grading import GradingOptions, grade

from .conftest import ROOT
from .grading_support import EXERCISE, HOSTILE, course_copy, with_prelude

KEPT = ["honest_solution", "honest_stub", "hang_at_import", "os_exit_at_import", "forged_channel",
        "monkeypatches_pytest", "syntax_error"]


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory):
    submissions = tmp_path_factory.mktemp("fallback") / "submissions"
    for name in KEPT:
        HOSTILE[name].build(submissions / name)
    # the run's supervisor (its warden): the parent of the tests' process, which is the parent of
    # the learner's own process where the exercise is bridged (grader.bridge)
    course_copy(submissions / "kills_its_supervisor", with_prelude(
        "import os, signal, sys\nsupervisor = os.getppid()\nif 'grader.recorder' not in sys.modules:\n"
        "    with open(f'/proc/{supervisor}/stat') as stat:\n        supervisor = int(stat.read().rsplit(')', 1)[1].split()[1])\n"
        "os.kill(supervisor, signal.SIGKILL)"))
    return grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["01"], jobs=2, timeout=8,
                                disable=["pid", "mount", "net", "ipc", "uid"]))


def test_the_report_says_which_protections_were_off(fallback):
    active = {p.name: p.active for p in fallback.protections}
    assert not active["pid namespace"] and not active["unprivileged uid"] and not active["network namespace"]
    assert any("protections not available" in warning for warning in fallback.warnings)


@pytest.mark.parametrize("name", KEPT)
def test_verdicts_hold_without_namespaces(fallback, name):
    exercise = next(l for l in fallback.learners if l.learner == name).exercise(EXERCISE)
    assert exercise.status == HOSTILE[name].status, exercise.message


def test_a_run_that_kills_its_supervisor_is_an_error_not_a_stall(fallback):
    exercise = next(l for l in fallback.learners if l.learner == "kills_its_supervisor").exercise(EXERCISE)
    assert exercise.status == "error" and exercise.points == 0
    assert "supervisor" in exercise.message
