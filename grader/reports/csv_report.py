"""``grades.csv``: one row per learner, one column of points per exercise, then the total.

Learner names are learner-controlled (a folder name): a cell that a spreadsheet would read as
a formula (``=``, ``+``, ``-``, ``@`` …) is prefixed with a quote.
"""

from __future__ import annotations

import csv
from pathlib import Path

from grader.reports.escaping import csv_cell
from grader.results import ClassResult

FILE = "grades.csv"


def _number(value: float) -> str:
    return f"{value:g}"


def write(result: ClassResult, folder: Path) -> None:
    with open(folder / FILE, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["learner", *(e.name for e in result.exercises), "total", "max_total"])
        for learner in result.learners:
            points = {r.exercise: r.points for r in learner.exercises}
            writer.writerow([csv_cell(learner.learner), *(_number(points.get(e.name, 0.0)) for e in result.exercises),
                             _number(learner.points), _number(learner.max_points)])
