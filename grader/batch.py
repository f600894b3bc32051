"""Grade many sets of editable files at once through the class grader's pre-warmed engine.

Maintainer commands (``grader mutate``) grade hundreds of variants of one reference solution.
A fresh ``pytest`` per variant pays the interpreter, pytest and FastAPI start-up every time
(about a second); the engine (``grader.engine``) pays it once, then forks one run per variant,
cores + 1 at a time, each in the same sandbox a learner's run gets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from grader.catalog import Exercise
from grader.engine import Engine, Job
from grader.grading import score_run
from grader.results import ExerciseResult
from grader.warmup import imports_of, with_lazy_imports


@dataclass(frozen=True)
class FileSet:
    """One variant to grade: ``files`` maps each editable file's name to its whole text.

    ``stop_at_first_failure``: the run ends after its first test that does not pass (pytest's
    ``--maxfail=1``; the tests after it are reported missing). For a variant that only has to
    be caught (a mutant): one failing test is the answer, and the rest of the suite costs time.
    Never for a copy whose points or whose every test matter (a reference, a stub).
    """

    label: str
    exercise: Exercise
    files: dict[str, str]
    stop_at_first_failure: bool = False


def default_slots() -> int:
    return (os.cpu_count() or 1) + 1


def reference_files(exercise: Exercise) -> dict[str, str]:
    return {name: (exercise.solution_folder / name).read_text(encoding="utf-8") for name in exercise.editable}


def grade_file_sets(root: Path, sets: Iterable[FileSet], slots: int | None = None,
                    on_result: Callable[[FileSet, ExerciseResult], None] | None = None) -> dict[str, ExerciseResult]:
    """Grade every file set with its exercise's graded suite; results by label.

    Nothing is hidden from the runs: these are the course's own files, graded for the
    maintainers (a differential suite, for one, reads the reference solution).
    """
    sets = list(sets)
    exercises = {s.exercise.name: s.exercise for s in sets}
    modules = imports_of([path for exercise in exercises.values() for path in (
        *exercise.test_files, *(exercise.solution_folder / n for n in exercise.editable if n.endswith(".py")))])
    results: dict[str, ExerciseResult] = {}
    by_id = {f"set-{index}": file_set for index, file_set in enumerate(sets)}
    with Engine(root, slots or default_slots(), hide=(), modules=with_lazy_imports(modules)) as engine:
        prepared = engine.prepare([(exercise, None) for exercise in exercises.values()])
        jobs = []
        for job_id, file_set in by_id.items():
            exercise = file_set.exercise
            if prepared[exercise.name].error:
                results[file_set.label] = ExerciseResult(
                    exercise=exercise.name, status="error", max_points=exercise.total_points,
                    message=f"the graded suite could not be collected:\n{prepared[exercise.name].error[:2000]}")
                continue
            jobs.append(Job(job_id, exercise.name, file_set.label, file_set.files, exercise.timeout,
                            stop_at_first_failure=file_set.stop_at_first_failure))

        def done(job: Job, outcome: dict) -> None:
            file_set = by_id[job.id]
            result = score_run(file_set.exercise, None, prepared[file_set.exercise.name], set(), outcome, job.timeout)
            results[file_set.label] = result
            if on_result is not None:
                on_result(file_set, result)

        engine.run(jobs, done)
    return results
