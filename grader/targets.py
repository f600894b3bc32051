"""Assemble the folder of editable files that one graded run exercises.

A target is a folder holding every editable file of an exercise: the learner's exercise
folder, the reference solution, or a temporary folder built for a mutant (solution files
overlaid with the mutant's) or for a submission.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from grader.catalog import Exercise


def overlay(exercise: Exercise, base: Path, changes: Path, into: Path) -> Path:
    """Copy the editable files of ``base`` into ``into``, then those that ``changes`` holds on top."""
    for name in exercise.editable:
        for source in (changes / name, base / name):
            if source.is_file():
                destination = into / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)
                break
    return into


def mutant_target(exercise: Exercise, mutant: str | Path) -> Path:
    """A fresh temporary folder holding the solution with one mutant applied."""
    folder = Path(mutant) if Path(mutant).is_absolute() else exercise.mutants_folder / str(mutant)
    if not folder.is_dir():
        known = ", ".join(p.name for p in exercise.mutants()) or "none"
        raise FileNotFoundError(f"{exercise.name} has no mutant {folder.name!r} (known: {known}).")
    into = Path(tempfile.mkdtemp(prefix=f"mutant-{exercise.number}-{folder.name}-"))
    return overlay(exercise, exercise.solution_folder, folder, into)


def mutant_description(folder: Path) -> str:
    """The first line of the mutant's docstring or leading comment: the mistake it makes."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace").lstrip()
        if text.startswith(('"""', "'''")):
            line = text[3:].strip().splitlines()[0] if text[3:].strip() else ""
        elif text.startswith(("#", "//")):
            line = text.lstrip("#/ ").splitlines()[0]
        else:
            continue
        line = line.strip().strip('"').strip()
        if line:
            return line.removeprefix("Mutant:").strip()
    return ""
