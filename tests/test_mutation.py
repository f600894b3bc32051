"""grader.mutation: which mutants it makes, how a record is kept honest, and the course's records."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from grader.catalog import all_exercises, load_exercise
from grader.mutation import (
    Record,
    Survivor,
    carried_reasons,
    check_record,
    mutants,
    read_record,
    solution_digest,
    write_record,
)

ROOT = Path(__file__).resolve().parents[1]


def exercise_with(tmp_path: Path, source: str):
    """A one-file exercise whose reference is ``source``."""
    (tmp_path / "exercises" / "01_demo").mkdir(parents=True)
    (tmp_path / "solutions" / "01_demo").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    (tmp_path / "exercises" / "01_demo" / "exercise.toml").write_text(
        'title = "Demo"\neditable = ["app.py"]\n\n[[tasks]]\nid = "t"\ntitle = "T"\npoints = 1\n', encoding="utf-8")
    (tmp_path / "solutions" / "01_demo" / "app.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return load_exercise(tmp_path / "exercises" / "01_demo", tmp_path)


def changes(exercise) -> dict[str, str]:
    return {m.id.split(" ", 1)[1]: m.change for m in mutants(exercise)}


def test_a_learner_s_slips_are_made(tmp_path):
    exercise = exercise_with(tmp_path, """
        from fastapi import FastAPI, Query

        app = FastAPI()


        @app.get("/wait", summary="Wait a while")
        async def wait(seconds: float = Query(ge=0, le=2)) -> dict:
            if seconds < 1:
                seconds = seconds + 1
            return {"waited": seconds}
    """)
    found = "\n".join(changes(exercise).values())
    assert "Query(ge=None, le=2)" in found  # a bound dropped
    assert "if seconds <= 1:" in found  # a boundary moved
    assert "seconds = seconds - 1" in found  # arithmetic confused
    assert "+        pass" in found  # a statement forgotten
    assert "summary=None" not in found, "prose in the OpenAPI document is no promise to mutate"
    for text in changes(exercise).values():
        assert "- 1" not in text or "seconds" in text


def test_type_annotations_are_not_mutated_into_import_errors(tmp_path):
    exercise = exercise_with(tmp_path, """
        def pick(value: int | None = None) -> int | None:
            return value or 1
    """)
    assert not any("&" in change for change in changes(exercise).values())


def test_every_mutant_compiles_and_differs(tmp_path):
    exercise = exercise_with(tmp_path, """
        def f(x):
            if x == 1:
                return x is None
            return [x * 2, x // 3, -x]
    """)
    found = mutants(exercise)
    original = (exercise.solution_folder / "app.py").read_text(encoding="utf-8")
    assert found
    assert len({m.source for m in found}) == len(found)
    for mutant in found:
        assert mutant.source != original
        compile(mutant.source, "app.py", "exec")
        assert mutant.change.startswith("-")


def test_a_record_is_stale_when_the_solution_changes_and_needs_reasons(tmp_path):
    exercise = exercise_with(tmp_path, "def f(x):\n    return x + 1\n")
    record = Record(solution_digest(exercise), mutants=20, killed=19,
                    survivors=[Survivor("app.py:2 core/X#0", "-    return x + 1\n+    return x - 1")])
    write_record(exercise, record)
    problems = list(check_record(exercise))
    assert any("has no reason" in p for p in problems)
    assert read_record(exercise) == record

    write_record(exercise, replace(record, survivors=[replace(record.survivors[0], reason="equivalent: x is 0")]))
    assert list(check_record(exercise)) == []  # 19 of 19 meaningful mutants killed

    (exercise.solution_folder / "app.py").write_text("def f(x):\n    return x + 2\n", encoding="utf-8")
    assert any("changed since" in p for p in check_record(exercise))


def test_a_survivor_outside_the_readme_still_counts_against_the_score(tmp_path):
    exercise = exercise_with(tmp_path, "def f(x):\n    return x + 1\n")
    survivors = [Survivor(f"s{i}", f"-a{i}\n+b{i}", "not promised by the README") for i in range(2)]
    write_record(exercise, Record(solution_digest(exercise), mutants=20, killed=18, survivors=survivors))
    assert any("below the target" in p for p in check_record(exercise))


def test_a_reason_is_carried_to_the_same_change_in_the_same_file_only():
    same = "-    timeout=0.5\n+    timeout=1.5"
    previous = Record("x", mutants=3, killed=1, survivors=[Survivor("a.py:3 core/N#1", same, "equivalent: in a"),
                                                          Survivor("b.py:9 core/N#4", same, "not promised in b")])
    reasons = carried_reasons(previous)
    assert reasons[("a.py", same)] == "equivalent: in a" and reasons[("b.py", same)] == "not promised in b"
    assert carried_reasons(None) == {}


MEASURED = sorted(e.name for e in all_exercises(ROOT) if e.solution_folder.is_dir())

# Exercises whose record is missing or below the target, said here so that every run shows them
# (as xfail, with why) rather than skipping them in silence; issue #14 tracks each. Only a missing
# record or a low score is excused: a stale record or an unexplained survivor fails all the same,
# and an exercise that reaches the target must leave this list (the test says so).
SHORT_OF_TARGET = {
    "09_testing": "not measured yet: 353 mutants, each through child pytest runs of the learner's tests",
    "10_service_communication": "not measured yet: about 800 mutants through a suite of about a minute",
    "11_messaging": "below 95 %: the relay's idle loop, retry pacing while the broker is down and shutdown races "
                    "are not observable without timing upper bounds (reasoned survivors in mutation.toml)",
    "15_capstone": "not measured yet: the capstone's mutants through its whole suite take hours on 2 cores",
}


def test_the_list_of_exercises_short_of_target_names_real_exercises():
    assert set(SHORT_OF_TARGET) <= set(MEASURED)


@pytest.mark.parametrize("name", MEASURED)
def test_the_course_s_mutation_records_are_fresh_explained_and_on_target(name):
    exercise = next(e for e in all_exercises(ROOT) if e.name == name)
    problems = list(check_record(exercise))
    if name in SHORT_OF_TARGET:
        excused = ("no mutation record", "is below the target")
        assert not [p for p in problems if not any(text in p for text in excused)], "\n".join(problems)
        if problems:
            pytest.xfail(f"{name}: {SHORT_OF_TARGET[name]}")
        pytest.fail(f"{name} has a fresh record on target now: take it off SHORT_OF_TARGET")
    assert not problems, "\n".join(problems)
