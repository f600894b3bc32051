"""``summary.md``: the class at a glance, for ``$GITHUB_STEP_SUMMARY`` or a pull request comment.

Every learner-controlled string is flattened to plain text: no Markdown or HTML of the
learner's reaches the page, and no line can act as a CI workflow command.
"""

from __future__ import annotations

from pathlib import Path

from grader.reports.escaping import markdown_text
from grader.results import ClassResult

FILE = "summary.md"
MARK = {"passed": "✅", "failed": "❌", "error": "💥", "timeout": "⏱️", "tampering": "🚫", "missing": "➖",
        "not_started": "➖"}


def _cell(points: float, max_points: float, status: str) -> str:
    return f"{MARK.get(status, '')} {points:g}/{max_points:g}"


def render(result: ClassResult) -> str:
    lines = [f"## Grades: {len(result.learners)} learners × {len(result.exercises)} exercises", ""]
    header = ["learner", *(e.name[:2] for e in result.exercises), "total"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for learner in result.learners:
        cells = [markdown_text(learner.learner)]
        for exercise in result.exercises:
            graded = learner.exercise(exercise.name)
            cells.append(_cell(graded.points, graded.max_points, graded.status) if graded else "")
        cells.append(f"**{learner.points:g}**/{learner.max_points:g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Exercises: " + ", ".join(f"{e.name[:2]} = {markdown_text(e.title)} ({e.max_points:g} pts)" for e in result.exercises),
              "", "✅ passed · ❌ failed · 💥 error · ⏱️ timeout · 🚫 tampering · ➖ missing"]
    counts: dict[str, int] = {}
    for learner in result.learners:
        for exercise in learner.exercises:
            counts[exercise.status] = counts.get(exercise.status, 0) + 1
    lines += ["", "Runs: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))]
    if result.warnings:
        lines += ["", "### Warnings", ""] + [f"- {markdown_text(w)}" for w in result.warnings]
    inactive = [p for p in result.protections if not p.active]
    if inactive:
        lines += ["", "Protections not available here: " + ", ".join(markdown_text(p.name) for p in inactive)]
    lines += ["", f"Graded in {result.duration:.1f} s by grader {markdown_text(result.grader_version)}"
              + (f", shards {', '.join(result.shards)}" if result.shards else "") + "."]
    return "\n".join(lines) + "\n"


def write(result: ClassResult, folder: Path) -> None:
    (folder / FILE).write_text(render(result), encoding="utf-8")
