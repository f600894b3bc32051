"""Assemble the folder of editable files that one graded run exercises.

A target is a folder holding every editable file of an exercise: the learner's exercise
folder, the reference solution, or a temporary folder built for a mutant (solution files
overlaid with the mutant's) or for a submission.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from grader import patches
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
    path = Path(mutant) if Path(mutant).is_absolute() else exercise.mutants_folder / str(mutant)
    if path.suffix != ".diff" and not path.is_dir():
        path = path.with_name(path.name + ".diff")
    if not path.exists():
        known = ", ".join(p.stem for p in exercise.mutants()) or "none"
        raise FileNotFoundError(f"{exercise.name} has no mutant {Path(mutant).stem!r} (known: {known}).")
    into = Path(tempfile.mkdtemp(prefix=f"mutant-{exercise.number}-{path.stem}-"))
    if path.is_dir():
        return overlay(exercise, exercise.solution_folder, path, into)
    overlay(exercise, exercise.solution_folder, exercise.solution_folder, into)
    _, file_patches = patches.parse(path.read_text(encoding="utf-8"))
    for file_patch in file_patches:
        if file_patch.path not in exercise.editable:
            raise patches.PatchError(f"{path.name} changes {file_patch.path}, which is not an editable file")
        target = into / file_patch.path
        target.write_text(patches.apply(target.read_text(encoding="utf-8"), file_patch), encoding="utf-8")
    return into


def mutant_description(folder: Path) -> str:
    """The first line of the mutant's description: the mistake it makes."""
    if folder.suffix == ".diff":
        return patches.description(folder)
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
