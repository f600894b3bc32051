"""The course is sound: every solution passes, every stub fails and earns nothing, every mutant is caught,
and every exercise follows the contract in docs/AUTHORING.md."""

from __future__ import annotations

import ast
import os
import shutil
import tomllib

import pytest

from grader.batch import default_slots
from grader.catalog import all_exercises, load_exercise
from grader.integrity import plan_checks, run_checks
from grader import patches
from grader.targets import mutant_description, mutant_target

from .conftest import CURRICULUM, ROOT, heading_anchors, integrity_id, integrity_unit

EXERCISES = all_exercises(ROOT)
CHECKS = [check for exercise in EXERCISES for check in plan_checks(exercise)]


_id = integrity_id


@pytest.fixture(scope="module")
def outcomes(request):
    """The outcome of a selected check, graded by the warm engine (``grader.integrity.run_checks``).

    In one process every selected check is graded at once, cores + 1 runs at a time. On the
    course suite's workers (tests/conftest.py hands each worker whole exercises, or parts of a
    costly one: ``integrity_unit``) a worker grades a unit's checks at once when it reaches the
    first, with its share of the cores + 1 runs (at least two: a run waits on its servers as
    much as it computes).
    """
    selected = [item.callspec.params["check"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_graded_suite_judges_each_copy_correctly"]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) if os.environ.get("PYTEST_XDIST_WORKER") else 0
    graded: dict = {}

    def outcome(check):
        if check not in graded:
            batch = [c for c in selected if integrity_unit(_id(c)) == integrity_unit(_id(check))] if workers else selected
            slots = max(2, -(-default_slots() // workers)) if workers else None
            graded.update({o.check: o for o in run_checks(batch, slots)})
        return graded[check]

    return outcome


# The first test of a batch grades the batch in its setup (each run is bounded by its exercise's
# own time limit inside the engine), so this test's limit is the batch's, not one run's.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("check", CHECKS, ids=_id)
def test_graded_suite_judges_each_copy_correctly(check, outcomes):
    outcome = outcomes(check)
    result = outcome.result
    if check.kind == "solution":
        failures = "\n\n".join(f"{t.name}: {t.message}" for t in result.tests if not t.passed)
        assert outcome.ok, f"the reference solution must pass: {result.status} {result.message}\n{failures}"
        untagged = [t.name for t in result.tests if t.task is None]
        assert not untagged, f"every graded test needs @pytest.mark.task(...): {untagged}"
        unknown = {t.task for t in result.tests} - {task.id for task in check.exercise.tasks}
        assert not unknown, f"tests name tasks that exercise.toml does not define: {unknown}"
        empty = {task.id for task in check.exercise.tasks} - {t.task for t in result.tests}
        assert not empty, f"tasks without a test: {empty}"
        assert result.points == pytest.approx(check.exercise.total_points)
    else:
        assert outcome.ok, (
            f"the {check.label} of {check.exercise.name} must be caught by the graded suite "
            f"({'its run stops at its first test that does not pass, which must fail, not error' if check.stops_at_first_failure else 'some test fails, none errors'}"
            f"{'; it earns no points' if check.kind == 'stub' else ''}): "
            f"got {outcome.summary}\n{result.message}"
        )


@pytest.mark.parametrize("name", CURRICULUM)
def test_each_lesson_has_its_four_parts(name):
    parts = [ROOT / "lessons" / f"{name}.md", ROOT / "notebooks" / f"{name}.ipynb",
             ROOT / "exercises" / name / "exercise.toml", ROOT / "exercises" / name / "README.md",
             ROOT / "solutions" / name]
    missing = [str(p.relative_to(ROOT)) for p in parts if not p.exists()]
    assert not missing, f"{name} is incomplete: {missing}"


def test_no_stray_names_across_the_four_folders():
    names = set(CURRICULUM)
    found = {p.stem for p in (ROOT / "lessons").glob("*.md")}
    found |= {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    found |= {p.name for p in (ROOT / "exercises").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    found |= {p.name for p in (ROOT / "solutions").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert found <= names, f"names outside the curriculum: {sorted(found - names)}"


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
class TestContract:
    def test_metadata_is_complete(self, exercise):
        assert exercise.title and exercise.summary, "title and summary"
        assert len(exercise.hints) >= 3, "at least three hints, from a nudge to a near-answer"
        # A gate (a condition for the other tasks, such as 09's) may have no points of its own.
        assert all(task.points >= 0 for task in exercise.tasks) and exercise.total_points > 0
        assert len({task.id for task in exercise.tasks}) == len(exercise.tasks), "task ids are unique"
        assert exercise.test_files, "a graded test_*.py"
        assert (exercise.folder / "README.md").is_file()

    def test_editable_files_exist_as_stub_and_reference(self, exercise):
        for name in exercise.editable:
            assert (exercise.folder / name).is_file(), f"stub {name}"
            assert (exercise.solution_folder / name).is_file(), f"reference {name}"
            assert (exercise.folder / name).read_bytes() != (exercise.solution_folder / name).read_bytes(), (
                f"the stub {name} is the reference"
            )

    def test_stub_python_files_parse(self, exercise):
        for name in exercise.editable:
            if name.endswith(".py"):
                ast.parse((exercise.folder / name).read_text(encoding="utf-8"))

    def test_task_sections_exist_in_the_lesson(self, exercise):
        if not exercise.lesson.is_file():
            pytest.fail(f"{exercise.lesson.relative_to(ROOT)} is missing")
        anchors = heading_anchors(exercise.lesson.read_text(encoding="utf-8"))
        missing = [task.section for task in exercise.tasks if task.section and task.section not in anchors]
        assert not missing, f"exercise.toml points at sections the lesson does not have: {missing}"

    def test_at_least_three_mutants_each_naming_its_mistake(self, exercise):
        mutants = exercise.mutants()
        assert len(mutants) >= 3
        for mutant in mutants:
            assert mutant.suffix == ".diff" and mutant.is_file(), f"{mutant.name}: a mutant is a diff against the solution"
            _, changes = patches.parse(mutant.read_text(encoding="utf-8"))
            changed = {change.path for change in changes}
            assert changed <= set(exercise.editable), f"{mutant.name} changes only editable files: {changed}"
            assert mutant_description(mutant), f"{mutant.name} must open with a line naming the mistake"
            folder = mutant_target(exercise, mutant)  # applies exactly, or raises PatchError
            shutil.rmtree(folder)

    def test_metadata_has_no_unknown_keys(self, exercise):
        meta = tomllib.loads((exercise.folder / "exercise.toml").read_text(encoding="utf-8"))
        assert set(meta) <= {"title", "summary", "editable", "timeout", "tasks", "hints", "differential", "bridge"}
        assert meta.get("bridge", True) is True, "bridge = true, or no bridge key (grader.bridge; AUTHORING)"

    def test_loads_the_same_as_the_catalog(self, exercise):
        assert load_exercise(exercise.folder, ROOT) == exercise


def test_every_exercise_folder_has_metadata():
    folders = [p for p in (ROOT / "exercises").iterdir() if p.is_dir() and p.name[:2].isdigit()]
    assert all((p / "exercise.toml").is_file() for p in folders if any(p.glob("test_*.py")))


def test_no_course_module_shadows_a_library():
    """A file or folder named like a library (websockets.py, jwt/, logging.py) breaks imports."""
    import sys
    from importlib.metadata import packages_distributions

    taken = (set(sys.stdlib_module_names) | set(packages_distributions())) - {"grader"}
    offenders = []
    # grader/ is a package: grader/notebook.py is imported as grader.notebook and shadows nothing.
    # node_modules holds the diagram renderer's JavaScript (tests/diagrams), never imported by Python.
    for top in ("exercises", "solutions", "tests", "bench"):
        for path in (ROOT / top).rglob("*"):
            if "__pycache__" in path.parts or "node_modules" in path.parts or path.name.startswith("."):
                continue
            name = path.stem if path.suffix == ".py" else (path.name if path.is_dir() else None)
            if name in taken:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these names shadow a library or a standard module: {offenders}"


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_files_given_beside_the_solution_are_the_learners_copies(exercise):
    """A file the learner is given (not editable, not a test) and the reference also has, such as
    08's Alembic environment, is the same file in both places: the reference is graded with what
    the learner has."""
    solution = exercise.solution_folder
    drifted = []
    for path in solution.rglob("*"):
        relative = path.relative_to(solution)
        if (not path.is_file() or relative.parts[0] in ("mutants", "__pycache__", ".hypothesis")
                or "__pycache__" in relative.parts or path.name == "mutation.toml"
                or relative.as_posix() in exercise.editable):
            continue
        given = exercise.folder / relative
        if not given.is_file() or given.read_bytes() != path.read_bytes():
            drifted.append(relative.as_posix())
    assert not drifted, f"{exercise.name}: not the same in exercises/ and solutions/: {drifted}"
