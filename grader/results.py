"""The result model: defined once, written by the runner, read by every report and the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from grader.text import bounded, one_line  # noqa: F401 - re-exported

TestOutcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed", "missing"]
ExerciseStatus = Literal["passed", "failed", "error", "timeout", "tampering", "not_started", "missing"]


class TestResult(BaseModel):
    """One graded test: what happened and what it was worth."""

    nodeid: str
    task: str | None = None
    outcome: TestOutcome
    points: float = 0.0
    max_points: float = 0.0
    duration: float = 0.0
    message: str = Field("", description="why it did not pass, bounded in size")
    hidden: bool = False

    @property
    def name(self) -> str:
        return self.nodeid.rsplit("::", 1)[-1]

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


class ExerciseResult(BaseModel):
    """One run of one exercise's graded suite against one copy of the editable files."""

    exercise: str
    status: ExerciseStatus
    points: float = 0.0
    max_points: float = 0.0
    duration: float = 0.0
    tests: list[TestResult] = Field(default_factory=list)
    message: str = Field("", description="for error, timeout and tampering: what went wrong")
    digest: str = Field("", description="SHA-256 of the submitted editable files (names and contents); equal "
                                        "digests are byte-identical submissions, which are graded by one run")

    @property
    def passed_count(self) -> int:
        return sum(test.passed for test in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- a graded class
# Written by `grader grade`, joined by `grader merge`, read by every report in grader/reports/.
# docs/grading-report.schema.json is generated from ClassResult (see docs/GRADING.md).

SCHEMA_VERSION = 1


class ExerciseInfo(BaseModel):
    """One exercise as it was graded: its points and the tests every submission had to run."""

    name: str
    title: str
    max_points: float = Field(description="visible and hidden points together")
    visible_max_points: float
    hidden_max_points: float = 0.0
    tests: int = Field(0, description="graded tests expected in every run, visible and hidden")
    hidden_tests: int = 0


class Protection(BaseModel):
    """One isolation measure of the test runs, and whether this machine allowed it."""

    name: str
    active: bool
    detail: str = ""


class LearnerResult(BaseModel):
    """Every graded exercise of one learner's submission."""

    learner: str = Field(description="the submission's name (folder or archive name); learner-controlled text")
    points: float = 0.0
    max_points: float = 0.0
    exercises: list[ExerciseResult] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list, description="what was wrong with the submission as a whole")

    def exercise(self, name: str) -> ExerciseResult | None:
        return next((result for result in self.exercises if result.exercise == name), None)


class ClassResult(BaseModel):
    """A whole grading run (or a merge of shards): the one input of every report."""

    schema_version: int = SCHEMA_VERSION
    grader_version: str
    generated_at: str = Field(description="ISO 8601, UTC")
    duration: float = Field(0.0, description="seconds of wall-clock time spent grading (summed over merged shards)")
    shards: list[str] = Field(default_factory=list, description="the shards ('i/n') this result joins; empty when unsharded")
    runs: int = Field(0, description="test runs of learners' submissions (summed over merged shards); fewer than the "
                                     "graded exercises when identical submissions shared one run")
    exercises: list[ExerciseInfo] = Field(default_factory=list)
    learners: list[LearnerResult] = Field(default_factory=list)
    protections: list[Protection] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="problems of the course or the machine, not of a learner")

    @property
    def max_points(self) -> float:
        return round(sum(exercise.max_points for exercise in self.exercises), 2)
