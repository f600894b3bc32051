"""The instructor's commands: ``grader grade`` a class of submissions, ``grader merge`` shards.

    grader grade submissions/ --hidden hidden/ --out grading-report --jobs 4
    grader grade submissions/ --shard 2/8 --out part-2          # one machine of a CI matrix
    grader merge part-*/report.json --out grading-report        # one set of reports

Registered on the main ``grader`` app by ``grader.cli`` (``register``); also runs on its own
as ``python -m grader.cli_grade``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from grader.catalog import CatalogError, course_root
from grader.engine import EngineError
from grader.grading import GradingOptions, default_jobs, grade, parse_shard
from grader.merging import MergeError, merge_files
from grader.reports import write_reports
from grader.reports.escaping import ci_log
from grader.reports.markdown import MARK, render
from grader.results import ClassResult

console = Console(highlight=False)
STYLE = {"passed": "green", "failed": "red", "error": "magenta", "timeout": "yellow", "tampering": "bold red",
         "missing": "dim"}


def _safe(text: str) -> str:
    return escape(ci_log(text))


def _summary(result: ClassResult, out: Path) -> None:
    table = Table(title=f"{len(result.learners)} learners", title_justify="left")
    table.add_column("learner", overflow="fold")
    for exercise in result.exercises:
        table.add_column(exercise.name[:2], justify="right")
    table.add_column("total", justify="right")
    for learner in result.learners:
        cells = []
        for exercise in learner.exercises:
            cells.append(f"[{STYLE.get(exercise.status, '')}]{MARK.get(exercise.status, '')} {exercise.points:g}[/]")
        table.add_row(_safe(learner.learner), *cells, f"[bold]{learner.points:g}[/]/{learner.max_points:g}")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {_safe(warning)}")
    console.print(f"Reports in [bold]{escape(str(out))}[/]: report.json, grades.csv, junit.xml, summary.md, "
                  "html/index.html, classroom/")


def _write(result: ClassResult, out: Path) -> Path:
    failures = write_reports(result, out)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(render(result))
    _summary(result, out.resolve())
    for failure in failures:
        console.print(f"[red]report failed:[/] {_safe(failure)}")
    if failures:
        raise typer.Exit(1)
    return out


def grade_command(
    submissions: Annotated[Path, typer.Argument(help="a folder with one submission per learner: folder, .zip or .tar(.gz)")],
    hidden: Annotated[Path | None, typer.Option("--hidden", help="instructor-only tests: DIR/NN_topic/test_*.py")] = None,
    out: Annotated[Path, typer.Option("--out", help="where the reports go (replaced as a whole)")] = Path("grading-report"),
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1,
                                             help="test runs at a time (default: the cores, plus one)")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="grade part i of n of the learners, e.g. 2/4")] = None,
    exercises: Annotated[str | None, typer.Option("--exercises", help="comma-separated, e.g. 01,02 (default: all)")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=1, help="seconds per run (default: each exercise's own)")] = None,
    share_identical: Annotated[bool, typer.Option(
        "--share-identical/--run-each",
        help="byte-identical submissions of an exercise share one run and its result (default), "
             "or each gets a run of its own")] = True,
) -> None:
    """Grade every learner's submission, safely, and write the class's reports.
    Example: [bold]grader grade submissions/ --hidden hidden/ --out grading-report[/]."""
    if not submissions.is_dir():
        console.print(f"[red]grader:[/] {escape(str(submissions))} is not a folder of submissions.")
        raise typer.Exit(2)
    if hidden is not None and not hidden.is_dir():
        console.print(f"[red]grader:[/] --hidden {escape(str(hidden))} is not a folder.")
        raise typer.Exit(2)
    try:
        options = GradingOptions(
            course_root=course_root(), submissions=submissions.resolve(), hidden=hidden.resolve() if hidden else None,
            exercises=[key.strip() for key in (exercises or "").split(",") if key.strip()],
            jobs=jobs or default_jobs(), timeout=timeout,
            shard=parse_shard(shard) if shard else None, extra_hide=[out.resolve()], share_identical=share_identical,
        )
    except (ValueError, CatalogError) as exc:
        console.print(f"[red]grader:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None

    progress = Progress(TextColumn("[bold]grading"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)

    def start(total: int):
        task = progress.add_task("grading", total=total, last="")

        def advance(learner: str, exercise: str, status: str) -> None:
            progress.update(task, advance=1, last=f"{_safe(learner)[:24]} {exercise[:2]} [{STYLE.get(status, '')}]{status}[/]")
        return advance

    try:
        with progress:
            result = grade(options, start)
    except (CatalogError, EngineError) as exc:
        console.print(f"[red]grader:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    _write(result, out)


def merge_command(
    parts: Annotated[list[Path], typer.Argument(help="report.json files (or report folders) of the shards")],
    out: Annotated[Path, typer.Option("--out", help="where the joined reports go")] = Path("grading-report"),
) -> None:
    """Join the reports of a sharded run into one set of reports. Example: [bold]grader merge part-*/report.json[/]."""
    try:
        result = merge_files(parts)
    except MergeError as exc:
        console.print(f"[red]grader:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    _write(result, out)


INSTRUCTOR = "Instructor: grading a class"  # the help panel of these commands in `grader`


def register(app: typer.Typer, panel: str = INSTRUCTOR) -> None:
    """Adds the instructors' commands to ``app``, listed under ``panel`` in its help."""
    app.command("grade", rich_help_panel=panel)(grade_command)
    app.command("merge", rich_help_panel=panel)(merge_command)


def main() -> None:
    app = typer.Typer(help="Grade a class of submissions.", add_completion=False, no_args_is_help=True)
    register(app)
    app(prog_name="grader")


if __name__ == "__main__":
    sys.exit(main())
