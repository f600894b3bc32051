"""Find the course's exercises and read their metadata (``exercise.toml``).

The catalog is the only place that knows the on-disk layout. Everything else asks it
for an :class:`Exercise` and reads paths from there.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

METADATA_FILE = "exercise.toml"
_NAME = re.compile(r"^(\d{2})_([a-z0-9_]+)$")


class CatalogError(Exception):
    """The course tree or an exercise's metadata is not what the contract says."""


def course_root(start: Path | None = None) -> Path:
    """The course root: the nearest folder upwards holding ``exercises/`` and ``pyproject.toml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "exercises").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    # Installed in editable mode, the package sits inside the course.
    package_home = Path(__file__).resolve().parent.parent
    if (package_home / "exercises").is_dir():
        return package_home
    raise CatalogError(
        f"No course found at or above {here}. Run the grader from inside your copy of the course."
    )


@dataclass(frozen=True)
class Task:
    id: str
    title: str
    points: float
    section: str = ""  # heading anchor in the lesson, e.g. "status-codes"


@dataclass(frozen=True)
class Exercise:
    name: str  # "03_rest_resources"
    root: Path  # the course root
    title: str
    editable: tuple[str, ...]
    tasks: tuple[Task, ...]
    hints: tuple[str, ...]
    timeout: float = 60.0
    summary: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def number(self) -> str:
        return self.name[:2]

    @property
    def topic(self) -> str:
        return self.name[3:]

    @property
    def folder(self) -> Path:
        return self.root / "exercises" / self.name

    @property
    def solution_folder(self) -> Path:
        return self.root / "solutions" / self.name

    @property
    def mutants_folder(self) -> Path:
        return self.solution_folder / "mutants"

    @property
    def lesson(self) -> Path:
        return self.root / "lessons" / f"{self.name}.md"

    @property
    def notebook(self) -> Path:
        return self.root / "notebooks" / f"{self.name}.ipynb"

    @property
    def total_points(self) -> float:
        return sum(task.points for task in self.tasks)

    @cached_property
    def test_files(self) -> tuple[Path, ...]:
        return tuple(sorted(self.folder.glob("test_*.py")))

    @cached_property
    def given(self) -> tuple[str, ...]:
        """Files the learner is given beside the editable ones (04's `problems.py`, 08's Alembic
        environment): every file of the solution folder that is not editable, a mutant or the
        mutation record, as a path relative to the folder. A graded copy holding only the
        editable files (a mutant, a class-grading run) gets them from the exercise folder."""
        found = []
        for path in sorted(self.solution_folder.rglob("*")):
            relative = path.relative_to(self.solution_folder)
            if (not path.is_file() or relative.parts[0] in ("mutants", "__pycache__", ".hypothesis")
                    or "__pycache__" in relative.parts or path.name == "mutation.toml"
                    or relative.as_posix() in self.editable or not (self.folder / relative).is_file()):
                continue
            found.append(relative.as_posix())
        return tuple(found)

    def task(self, task_id: str) -> Task | None:
        return next((t for t in self.tasks if t.id == task_id), None)

    def lesson_link(self, section: str = "") -> str:
        link = f"lessons/{self.name}.md"
        return f"{link}#{section}" if section else link

    def mutants(self) -> list[Path]:
        """Each mutant is a unified diff against the solution: ``mutants/<mistake>.diff``."""
        if not self.mutants_folder.is_dir():
            return []
        return sorted(
            p for p in self.mutants_folder.iterdir()
            if p.suffix == ".diff" and not p.name.startswith((".", "_"))
        )


def load_exercise(folder: Path, root: Path | None = None) -> Exercise:
    folder = folder.resolve()
    root = root or folder.parent.parent
    if not _NAME.match(folder.name):
        raise CatalogError(f"{folder.name!r} is not an exercise name (NN_topic).")
    meta_path = folder / METADATA_FILE
    try:
        meta = tomllib.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{meta_path} is missing.") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{meta_path} is not valid TOML: {exc}") from None
    stray = [key for t in meta.get("tasks", []) if isinstance(t, dict) for key in t if key not in {"id", "title", "points", "section"}]
    if stray:
        raise CatalogError(
            f"{meta_path}: unknown task field(s) {sorted(set(stray))}. Top-level keys such as 'hints' must come "
            "before the first [[tasks]] header: TOML puts every key after a table header into that table."
        )
    try:
        tasks = tuple(
            Task(id=str(t["id"]), title=str(t["title"]), points=float(t["points"]), section=str(t.get("section", "")))
            for t in meta["tasks"]
        )
        exercise = Exercise(
            name=folder.name,
            root=root,
            title=str(meta["title"]),
            editable=tuple(str(p) for p in meta["editable"]),
            tasks=tasks,
            hints=tuple(str(h) for h in meta.get("hints", ())),
            timeout=float(meta.get("timeout", 60)),
            summary=str(meta.get("summary", "")),
            extra={k: v for k, v in meta.items() if k not in {"title", "editable", "tasks", "hints", "timeout", "summary"}},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"{meta_path}: missing or malformed field {exc}") from None
    if not exercise.editable or not exercise.tasks:
        raise CatalogError(f"{meta_path}: 'editable' and 'tasks' must not be empty.")
    return exercise


def all_exercises(root: Path | None = None) -> list[Exercise]:
    root = root or course_root()
    # A folder without metadata is not an exercise yet (the course's own suite flags it).
    folders = sorted(
        p for p in (root / "exercises").iterdir() if p.is_dir() and _NAME.match(p.name) and (p / METADATA_FILE).is_file()
    )
    return [load_exercise(folder, root) for folder in folders]


def find_exercise(key: str, root: Path | None = None) -> Exercise:
    """Accept ``3``, ``03``, ``03_rest_resources`` or ``rest_resources``, also as a path a shell
    completed (``exercises/03_rest_resources/``, ``.\\exercises\\03_rest_resources\\`` in PowerShell)."""
    exercises = all_exercises(root)
    key = key.strip().replace("\\", "/").removeprefix("./").strip("/").removeprefix("exercises/")
    for exercise in exercises:
        if key in (exercise.name, exercise.topic) or (key.isdigit() and int(key) == int(exercise.number)):
            return exercise
    known = ", ".join(e.name for e in exercises)
    raise CatalogError(f"There is no exercise {key!r}. The exercises are: {known}.")
