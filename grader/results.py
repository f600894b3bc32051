"""The result model: defined once, written by the runner, read by every report and the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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

    @property
    def passed_count(self) -> int:
        return sum(test.passed for test in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def passed(self) -> bool:
        return self.status == "passed"
