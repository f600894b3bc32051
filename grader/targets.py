"""Assemble the folder of editable files that one graded run exercises.

A target is a folder holding every editable file of an exercise: the learner's exercise
folder, the reference solution, or a temporary folder built for a mutant (the solution's
files with the mutant's diff applied, and the files the learner is given beside them).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from grader import patches
from grader.catalog import Exercise


def copy_editable(exercise: Exercise, source: Path, into: Path) -> Path:
    """Copy the editable files that ``source`` holds into ``into``."""
    for name in exercise.editable:
        if (source / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, into / name)
    return into


def copy_given(exercise: Exercise, into: Path) -> Path:
    """Copy the files the learner is given (``Exercise.given``) from the exercise folder into ``into``."""
    for name in exercise.given:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exercise.folder / name, into / name)
    return into


def mutant_target(exercise: Exercise, mutant: str | Path) -> Path:
    """A fresh temporary folder holding the solution with one mutant applied."""
    path = Path(mutant) if Path(mutant).is_absolute() else exercise.mutants_folder / str(mutant)
    if path.suffix != ".diff":
        path = path.with_name(path.name + ".diff")
    if not path.exists():
        known = ", ".join(p.stem for p in exercise.mutants()) or "none"
        raise FileNotFoundError(f"{exercise.name} has no mutant {Path(mutant).stem!r} (known: {known}).")
    into = Path(tempfile.mkdtemp(prefix=f"mutant-{exercise.number}-{path.stem}-"))
    copy_editable(exercise, exercise.solution_folder, into)
    copy_given(exercise, into)
    _, file_patches = patches.parse(path.read_text(encoding="utf-8"))
    for file_patch in file_patches:
        if file_patch.path not in exercise.editable:
            raise patches.PatchError(f"{path.name} changes {file_patch.path}, which is not an editable file")
        target = into / file_patch.path
        target.write_text(patches.apply(target.read_text(encoding="utf-8"), file_patch), encoding="utf-8")
    return into


def mutant_description(diff: Path) -> str:
    """The first line of the mutant's description: the mistake it makes."""
    return patches.description(diff)
