"""Files the learner is given beside the editable ones (04's problems.py, 08's Alembic environment)
are in every folder a graded suite runs on: a mutant's, and a class-grading run's with its reference.
Without them, code that imports a given module fails to import, and every mutant looks caught."""

from __future__ import annotations

import shutil

from grader.catalog import find_exercise
from grader.targets import mutant_target
from grader.zygote import given_files

from .conftest import ROOT


def test_given_files_are_the_solution_files_that_are_not_editable():
    exercise = find_exercise("08", ROOT)
    assert "alembic.ini" in exercise.given
    assert "migrations/env.py" in exercise.given
    for name in exercise.given:
        assert name not in exercise.editable and not name.startswith("mutants/")
        assert (exercise.folder / name).is_file()


def test_a_mutant_folder_holds_the_given_files():
    exercise = find_exercise("08", ROOT)
    folder = mutant_target(exercise, exercise.mutants()[0])
    try:
        for name in exercise.given:
            assert (folder / name).read_bytes() == (exercise.folder / name).read_bytes(), name
    finally:
        shutil.rmtree(folder)


def test_a_class_grading_run_gets_the_given_files_from_the_course():
    exercise = find_exercise("08", ROOT)
    files = given_files(str(ROOT), exercise.name)
    assert set(files) == set(exercise.given)
    assert files["alembic.ini"] == (exercise.folder / "alembic.ini").read_text(encoding="utf-8")


def test_a_module_run_top_level_in_production_imports_its_siblings_by_name(tmp_path):
    # 14's app.py runs as `uvicorn app:app` in the image's WORKDIR: `from problems import ...`.
    import sys

    from grader.loader import load_module

    loaded = []
    for value in ("one", "two"):
        folder = tmp_path / value
        folder.mkdir()
        (folder / "given_beside.py").write_text(f"VALUE = {value!r}\n", encoding="utf-8")
        (folder / "app.py").write_text("from given_beside import VALUE\n", encoding="utf-8")
        loaded.append(load_module(folder, "app").VALUE)
        assert "given_beside" not in sys.modules  # forgotten: the next load imports its own
        assert str(folder) not in sys.path
    assert loaded == ["one", "two"]
