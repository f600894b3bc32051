"""Course integrity checks: the reference passes, the stub fails (and earns nothing), every mutant is caught."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grader import patches
from grader.catalog import Exercise
from grader.results import ExerciseResult, TestResult
from grader.targets import mutant_description, mutant_target

Kind = Literal["solution", "stub", "mutant"]


@dataclass(frozen=True)
class Check:
    exercise: Exercise
    kind: Kind
    mutant: Path | None = None

    @property
    def label(self) -> str:
        return f"mutant {self.mutant.stem}" if self.mutant else self.kind

    @property
    def expectation(self) -> str:
        return "pass" if self.kind == "solution" else "fail"

    @property
    def description(self) -> str:
        return mutant_description(self.mutant) if self.mutant else ""

    @property
    def stops_at_first_failure(self) -> bool:
        """A mutant only has to be caught: its run ends at its first test that does not pass.

        The reference must pass every test and the stub must earn nothing (a stub passing a
        later test would earn its points), so both always run the whole suite.
        """
        return self.kind == "mutant"


@dataclass(frozen=True)
class Outcome:
    check: Check
    result: ExerciseResult

    @property
    def ok(self) -> bool:
        if self.check.kind == "solution":
            return self.result.status == "passed"
        # A stub or mutant must be *caught*: tests ran and at least one failed. An error or
        # timeout is not a catch — it means the suite, not the learner's code, is broken.
        # An untouched stub also earns nothing: its points would be a grade for no work.
        if self.check.kind == "stub" and self.result.points > 0:
            return False
        if self.check.stops_at_first_failure:
            # The run ended at its first test that did not pass: that test must have *failed*.
            # An error (in a fixture's setup or teardown) says the suite could not run the test,
            # and the tests after it, which might have caught the copy, never ran.
            first = self.first_not_passing
            return self.result.status == "failed" and first is not None and first.outcome == "failed"
        return self.result.status == "failed"

    @property
    def first_not_passing(self) -> TestResult | None:
        """The first test, in the suite's order, that neither passed nor was skipped."""
        return next((t for t in self.result.tests if t.outcome not in ("passed", "skipped", "xfailed")), None)

    @property
    def summary(self) -> str:
        r = self.result
        if r.status in ("error", "timeout", "tampering"):
            first = r.message.strip().splitlines()[:1]
            return f"{r.status}: {first[0][:80] if first else ''}"
        earned = f", {r.points:g} points" if self.check.kind == "stub" and r.points > 0 else ""
        first = self.first_not_passing if self.check.stops_at_first_failure else None
        if first is not None:
            name = first.nodeid.rsplit("::", 1)[-1]
            verb = "caught by" if first.outcome == "failed" else f"first non-pass is an {first.outcome} in"
            return f"{verb} {name} ({r.passed_count} passed before it)"
        return f"{r.passed_count}/{r.total} pass{earned}"


def plan_checks(exercise: Exercise) -> list[Check]:
    return [
        Check(exercise, "solution"),
        Check(exercise, "stub"),
        *(Check(exercise, "mutant", mutant) for mutant in exercise.mutants()),
    ]


def files_of(check: Check) -> dict[str, str]:
    """The editable files that ``check`` grades, by name (a file the stub lacks is left out)."""
    exercise = check.exercise
    if check.kind == "mutant":
        assert check.mutant is not None
        folder = mutant_target(exercise, check.mutant)
        try:
            return {name: (folder / name).read_text(encoding="utf-8") for name in exercise.editable}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    folder = exercise.solution_folder if check.kind == "solution" else exercise.folder
    return {name: (folder / name).read_text(encoding="utf-8") for name in exercise.editable if (folder / name).is_file()}


def run_checks(checks: list[Check], slots: int | None = None,
               on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every check at once through the warm engine (``grader.batch``), in the order given.

    One interpreter imports pytest, FastAPI and the graded suites once, then forks a run per
    check, cores + 1 at a time: the same runs as a fresh ``pytest`` each, without paying the
    start-up hundreds of times. A mutant's run stops at its first test that does not pass
    (``Check.stops_at_first_failure``); the reference's and the stub's run the whole suite.
    """
    from grader.batch import FileSet, grade_file_sets

    if not checks:
        return []
    labels = {f"{index}": check for index, check in enumerate(checks)}
    sets, results = [], {}
    for label, check in labels.items():
        try:
            sets.append(FileSet(label, check.exercise, files_of(check), check.stops_at_first_failure))
        except (OSError, patches.PatchError) as exc:  # a mutant that no longer fits: that check's error alone
            results[label] = ExerciseResult(exercise=check.exercise.name, status="error",
                                            max_points=check.exercise.total_points, message=str(exc))
            if on_outcome is not None:
                on_outcome(Outcome(check, results[label]))
    report = None if on_outcome is None else (lambda file_set, result: on_outcome(Outcome(labels[file_set.label], result)))
    if sets:
        results.update(grade_file_sets(checks[0].exercise.root, sets, slots, report))
    return [Outcome(check, results[label]) for label, check in labels.items()]
