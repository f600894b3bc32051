"""Instructor-only hidden tests: where they live and what they are worth.

    HIDDEN/
    └── 03_rest_resources/
        ├── hidden.toml            optional: tasks and points of the hidden tests
        └── test_edge_cases.py     collected with the exercise's own suite

``hidden.toml``::

    default_points = 1.0           # a hidden test with no task below is worth this much

    [[tasks]]
    id = "robustness"              # @pytest.mark.task("robustness") in a hidden test
    title = "Survives odd input"
    points = 4                     # shared by the hidden tests of this task (by their weights)

Hidden points come on top of the exercise's own (visible) points and are reported apart.
A hidden test marked with a task of ``exercise.toml`` that ``hidden.toml`` does not list is
worth ``default_points``: hidden tests never change what the visible tests are worth.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from grader.catalog import CatalogError, Exercise, Task

HIDDEN_METADATA = "hidden.toml"


@dataclass(frozen=True)
class HiddenSuite:
    folder: Path
    files: tuple[Path, ...]
    tasks: tuple[Task, ...] = ()
    default_points: float = 1.0

    def task(self, task_id: str | None) -> Task | None:
        return next((task for task in self.tasks if task.id == task_id), None)


def hidden_suite(hidden_root: Path | None, exercise: Exercise) -> HiddenSuite | None:
    """The hidden tests of ``exercise`` under ``hidden_root``, or None when it has none."""
    if hidden_root is None:
        return None
    folder = hidden_root / exercise.name
    files = tuple(sorted(p for p in folder.glob("test_*.py") if p.is_file())) if folder.is_dir() else ()
    if not files:
        return None
    meta_path = folder / HIDDEN_METADATA
    if not meta_path.is_file():
        return HiddenSuite(folder=folder.resolve(), files=tuple(p.resolve() for p in files))
    try:
        meta = tomllib.loads(meta_path.read_text(encoding="utf-8"))
        tasks = tuple(
            Task(id=str(t["id"]), title=str(t.get("title", t["id"])), points=float(t["points"]))
            for t in meta.get("tasks", [])
        )
        default_points = float(meta.get("default_points", 1.0))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"{meta_path}: {exc}") from None
    return HiddenSuite(folder=folder.resolve(), files=tuple(p.resolve() for p in files), tasks=tasks,
                       default_points=default_points)
