"""Course integrity checks: the reference passes, the stub fails (and earns nothing), every mutant is caught."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grader.catalog import Exercise
from grader.results import ExerciseResult
from grader.runner import run_suite
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
        return self.result.status == "failed"

    @property
    def summary(self) -> str:
        r = self.result
        if r.status in ("error", "timeout", "tampering"):
            first = r.message.strip().splitlines()[:1]
            return f"{r.status}: {first[0][:80] if first else ''}"
        earned = f", {r.points:g} points" if self.check.kind == "stub" and r.points > 0 else ""
        return f"{r.passed_count}/{r.total} pass{earned}"


def plan_checks(exercise: Exercise) -> list[Check]:
    return [
        Check(exercise, "solution"),
        Check(exercise, "stub"),
        *(Check(exercise, "mutant", mutant) for mutant in exercise.mutants()),
    ]


def run_check(check: Check) -> Outcome:
    exercise = check.exercise
    if check.kind == "solution":
        result, _ = run_suite(exercise, exercise.solution_folder)
    elif check.kind == "stub":
        result, _ = run_suite(exercise, exercise.folder)
    else:
        assert check.mutant is not None
        folder = mutant_target(exercise, check.mutant)
        try:
            result, _ = run_suite(exercise, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return Outcome(check, result)
